//! Checksum offload and GSO metadata through the in-kernel hub: "VMs" on taps with a virtio-net
//! header (`IFF_VNET_HDR`) hand the hub partial checksums and TSO super-frames; each receiving tap
//! gets what its VM accepts (`TUNSETOFFLOAD`): the metadata as is, or the work done in software.
//! Needs root.

use dataplane_tests::{
    Daemon, Netns, TUN_F_CSUM, TUN_F_TSO4, TapVm, VirtioNetHdr, contains, settle, switch_with_daemon, test_frame, unique,
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

const SRC_IP: [u8; 4] = [10, 0, 0, 1];
const DST_IP: [u8; 4] = [10, 0, 0, 2];
const SRC_PORT: u16 = 40_000;
const DST_PORT: u16 = 5001;
/// Ethernet (14) + IPv4 (20): where the TCP header starts.
const CSUM_START: u16 = 34;
/// The checksum field's offset inside the TCP header.
const CSUM_OFFSET: u16 = 16;
/// Ethernet + IPv4 + TCP without options.
const HEADERS: usize = 54;

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0xab, 0xcd, n]
}

/// A tap netdev on a hubport of hub 0, with a VM attached (with or without a virtio-net header).
fn vm_on_hub(switch: &Netns, daemon: &Daemon, vnet_hdr: bool) -> TapVm {
    let tap = unique("v");
    daemon.add(&format!("tap,id={tap},ifname={tap},script=no,downscript=no"));
    daemon.add(&format!("hubport,id=p{tap},hubid=0,netdev={tap}"));
    let vm = TapVm::open(switch, &tap, vnet_hdr);
    // Frames sent to the tap before the kernel has activated its qdisc are dropped.
    switch.wait_link_ready(&tap, dataplane_tests::settle::DEADLINE);
    vm
}

/// A TCP/IPv4 frame from VM 0 to VM 1 with correct checksums, built by etherparse.
fn tcp_frame(seq: u32, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(mac(0), mac(1))
        .ipv4(SRC_IP, DST_IP, 64)
        .tcp(SRC_PORT, DST_PORT, seq, 64_240)
        .ack(1)
        .psh();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build a TCP/IPv4 frame");
    frame
}

/// Ones'-complement sum of `bytes` as big-endian 16-bit words (odd tail padded), folded.
fn ones_complement_sum(initial: u32, bytes: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// The TCP pseudo-header sum (not complemented), what a driver leaves in the checksum field of a
/// `CHECKSUM_PARTIAL` / `VIRTIO_NET_HDR_F_NEEDS_CSUM` frame. For a GSO frame, over its full length.
fn pseudo_header_sum(frame: &[u8]) -> u16 {
    let tcp_len = u32::try_from(frame.len() - usize::from(CSUM_START)).expect("small frame");
    ones_complement_sum(6 + tcp_len, &frame[26..34])
}

/// `frame` with its TCP checksum replaced by the pseudo-header sum: only partially computed.
fn with_partial_checksum(frame: &[u8]) -> Vec<u8> {
    let mut partial = frame.to_vec();
    let field = usize::from(CSUM_START + CSUM_OFFSET);
    partial[field..field + 2].copy_from_slice(&pseudo_header_sum(frame).to_be_bytes());
    partial
}

/// What a device does for `NEEDS_CSUM`: sums from `csum_start` to the end (the field included) and
/// stores the complement at `csum_start + csum_offset`.
fn finish_checksum(frame: &[u8], header: VirtioNetHdr) -> Vec<u8> {
    let mut done = frame.to_vec();
    let start = usize::from(header.csum_start);
    let field = start + usize::from(header.csum_offset);
    let sum = ones_complement_sum(0, &done[start..]);
    done[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    done
}

/// A parsed TCP/IPv4 frame whose IPv4 and TCP checksums etherparse verified.
struct Verified {
    ip_total_len: u16,
    ip_id: u16,
    seq: u32,
    psh: bool,
    payload: Vec<u8>,
}

/// Parses `frame` as Ethernet/IPv4/TCP and checks both checksums with etherparse, or says why not.
fn verify(frame: &[u8]) -> Result<Verified, String> {
    let packet = SlicedPacket::from_ethernet(frame).map_err(|e| format!("does not parse: {e}"))?;
    let Some(NetSlice::Ipv4(ip)) = &packet.net else { return Err("not IPv4".to_owned()) };
    let header = ip.header();
    let expected_ip = header.to_header().calc_header_checksum();
    if header.header_checksum() != expected_ip {
        return Err(format!("IPv4 header checksum {:#06x}, correct is {expected_ip:#06x}", header.header_checksum()));
    }
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else { return Err("not TCP".to_owned()) };
    let expected_tcp = tcp
        .calc_checksum_ipv4(header.source(), header.destination())
        .map_err(|e| format!("TCP checksum not computable: {e}"))?;
    if tcp.checksum() != expected_tcp {
        return Err(format!("TCP checksum {:#06x}, correct is {expected_tcp:#06x}", tcp.checksum()));
    }
    Ok(Verified {
        ip_total_len: header.total_len(),
        ip_id: header.identification(),
        seq: tcp.sequence_number(),
        psh: tcp.psh(),
        payload: tcp.payload().to_vec(),
    })
}

/// Sends a broadcast end marker from `vm` and returns it: a receiver that reads it has read
/// everything `vm` sent before (a tap's queue keeps the order in which frames were enqueued).
fn send_end(vm: &mut TapVm) -> Vec<u8> {
    let end = format!("<{}>", unique("end")).into_bytes();
    vm.send(&test_frame([0xff; 6], mac(9), &end));
    end
}

/// Everything a vnet_hdr VM reads before the marker `end`, split into header and frame.
fn recv_with_headers(vm: &mut TapVm, end: &[u8]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
    let deadline = std::time::Instant::now() + settle::DEADLINE;
    let mut got = Vec::new();
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now()).unwrap_or_default();
        let packet = vm.recv_raw(left).expect("the end marker arrives");
        let header = VirtioNetHdr::parse(&packet).expect("a virtio-net header before each frame");
        let frame = packet[VirtioNetHdr::LEN..].to_vec();
        if contains(&frame, end) {
            return got;
        }
        got.push((header, frame));
    }
}

#[test]
fn partial_checksum_is_completed_or_passed_on() {
    let (switch, daemon) = switch_with_daemon();
    let mut sender = vm_on_hub(&switch, &daemon, true);
    let mut plain = vm_on_hub(&switch, &daemon, false);
    let mut offload = vm_on_hub(&switch, &daemon, true);
    offload.set_offload(TUN_F_CSUM);
    let mut no_offload = vm_on_hub(&switch, &daemon, true);

    let marker = format!("<{}>", unique("csum")).into_bytes();
    let mut payload = marker.clone();
    payload.extend((0..200u8).map(|i| i.wrapping_mul(7)));
    let correct = tcp_frame(1_000, &payload);
    verify(&correct).expect("etherparse builds a correct frame");
    let partial = with_partial_checksum(&correct);
    assert!(verify(&partial).is_err(), "the frame as sent has an incomplete TCP checksum");
    let header = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        csum_start: CSUM_START,
        csum_offset: CSUM_OFFSET,
        ..VirtioNetHdr::default()
    };
    sender.send_with(header, &partial);
    let end = send_end(&mut sender);

    // Without a virtio-net header the VM cannot be told to finish the checksum: the kernel does.
    let got = plain.recv_until_marker(&marker, &end);
    assert_eq!(got.len(), 1, "the VM without vnet_hdr gets the frame");
    verify(&got[0]).unwrap_or_else(|e| panic!("the VM without vnet_hdr gets correct checksums: {e}"));
    assert_eq!(got[0], correct, "the VM without vnet_hdr gets exactly the frame with its checksum completed");

    // With TUN_F_CSUM the VM takes the partial checksum: same frame, same NEEDS_CSUM header.
    let got: Vec<_> = recv_with_headers(&mut offload, &end).into_iter().filter(|(_, f)| contains(f, &marker)).collect();
    assert_eq!(got.len(), 1, "the VM with vnet_hdr and TUN_F_CSUM gets the frame once");
    let (received_header, frame) = &got[0];
    assert_eq!(
        *received_header,
        VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: CSUM_START,
            csum_offset: CSUM_OFFSET,
        },
        "the VM with TUN_F_CSUM is asked to finish the checksum where the sender left it"
    );
    assert_eq!(frame, &partial, "the VM with TUN_F_CSUM gets the frame as sent, pseudo-header sum in place");
    let finished = finish_checksum(frame, *received_header);
    verify(&finished)
        .unwrap_or_else(|e| panic!("finishing the checksum as the header says gives a correct frame: {e}"));
    assert_eq!(finished, correct, "finishing the checksum gives the correct frame");

    // With vnet_hdr but no offloads the kernel finishes the checksum and says nothing.
    let got: Vec<_> =
        recv_with_headers(&mut no_offload, &end).into_iter().filter(|(_, f)| contains(f, &marker)).collect();
    assert_eq!(got.len(), 1, "the VM with vnet_hdr but no offloads gets the frame once");
    let (received_header, frame) = &got[0];
    assert_eq!(
        *received_header,
        VirtioNetHdr::default(),
        "the VM without TUN_F_CSUM gets no checksum flags (the checksum was completed in software)"
    );
    verify(frame).unwrap_or_else(|e| panic!("the VM with vnet_hdr but no offloads gets correct checksums: {e}"));
    assert_eq!(frame, &correct, "the VM with vnet_hdr but no offloads gets the completed frame");

    // Never back to the sender (each VM got it once: read up to the sender's end marker above).
    let end = send_end(&mut plain);
    assert!(sender.recv_until_marker(&marker, &end).is_empty(), "the sender does not get its frame back");
}

#[test]
fn gso_frame_is_segmented_or_passed_whole() {
    const SEQ: u32 = 0x1234_5678;
    const PAYLOAD: usize = 3000;
    const MSS: u16 = 1000;
    let (switch, daemon) = switch_with_daemon();
    let mut sender = vm_on_hub(&switch, &daemon, true);
    let mut plain = vm_on_hub(&switch, &daemon, false);
    let mut offload = vm_on_hub(&switch, &daemon, true);
    offload.set_offload(TUN_F_CSUM | TUN_F_TSO4);

    let marker = format!("<{}>", unique("gso")).into_bytes();
    let mut payload = marker.clone();
    payload.extend((0..PAYLOAD - marker.len()).map(|i| u8::try_from(i % 251).expect("byte")));
    let correct = tcp_frame(SEQ, &payload);
    let frame = with_partial_checksum(&correct);
    let header = VirtioNetHdr {
        flags: VirtioNetHdr::F_NEEDS_CSUM,
        gso_type: VirtioNetHdr::GSO_TCPV4,
        hdr_len: u16::try_from(HEADERS).expect("small"),
        gso_size: MSS,
        csum_start: CSUM_START,
        csum_offset: CSUM_OFFSET,
    };
    sender.send_with(header, &frame);
    let end = send_end(&mut sender);

    // Without vnet_hdr: three MSS-sized segments, each with correct checksums, and nothing else.
    let segments: Vec<Vec<u8>> = plain
        .recv_until_marker(b"", &end)
        .into_iter()
        .collect();
    assert_eq!(
        segments.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![HEADERS + 1000; 3],
        "the VM without vnet_hdr gets the 3000-byte TSO frame as 3 segments of 1000 payload bytes"
    );
    let mut joined = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let parsed = verify(segment).unwrap_or_else(|e| panic!("segment {i} has correct checksums: {e}"));
        assert_eq!(segment[..14], correct[..14], "segment {i} keeps the Ethernet header");
        assert_eq!(parsed.ip_total_len, 1040, "segment {i}: IPv4 total length");
        let offset = u32::try_from(i * 1000).expect("small");
        assert_eq!(parsed.seq, SEQ.wrapping_add(offset), "segment {i}: consecutive sequence numbers");
        assert_eq!(parsed.psh, i == 2, "segment {i}: PSH only on the last segment");
        assert_eq!(usize::from(parsed.ip_id), i, "segment {i}: IPv4 ids count up from the original's 0");
        joined.extend_from_slice(&parsed.payload);
    }
    assert!(joined == payload, "the segments' payloads concatenate to the original payload");

    // With TUN_F_CSUM | TUN_F_TSO4: the super-frame whole, with its GSO header.
    let got = recv_with_headers(&mut offload, &end);
    assert_eq!(
        got.len(),
        1,
        "the VM with TSO4 gets one frame, not segments: {:?}",
        got.iter().map(|(h, f)| (h, f.len())).collect::<Vec<_>>()
    );
    let (received_header, received) = &got[0];
    assert_eq!(received_header.gso_type, VirtioNetHdr::GSO_TCPV4, "gso_type TCPV4: {received_header:?}");
    assert_eq!(received_header.gso_size, MSS, "gso_size 1000: {received_header:?}");
    assert_eq!(received_header.flags, VirtioNetHdr::F_NEEDS_CSUM, "NEEDS_CSUM: {received_header:?}");
    assert_eq!(
        (received_header.csum_start, received_header.csum_offset),
        (CSUM_START, CSUM_OFFSET),
        "the checksum is still to be done where the sender left it: {received_header:?}"
    );
    assert!(
        usize::from(received_header.hdr_len) >= HEADERS && usize::from(received_header.hdr_len) <= received.len(),
        "hdr_len covers the Ethernet, IPv4 and TCP headers: {received_header:?}"
    );
    assert_eq!(received.len(), HEADERS + PAYLOAD, "the whole 3000-byte payload in one frame");
    assert!(received[HEADERS..] == payload[..], "the payload unchanged");
    assert!(*received == frame, "the frame exactly as the sender wrote it");

    // Nothing more for the receivers (they read everything up to the sender's end marker), and
    // nothing back to the sender.
    let end = send_end(&mut plain);
    assert!(sender.recv_until_marker(b"", &end).is_empty(), "the sender does not get its frame back");
}
