//! The virtio-net offloads of the `user` netdev's tap, both ways.
//!
//! Towards the guest, [`Coalescer`] joins the TCP segments libslirp sends into GSO frames, as GRO
//! does on a NIC's receive path. libslirp emits one frame per segment, each a write to the tap and
//! a pass through the guest's stack (its TCP receive and a wake-up of the reader). Consecutive
//! segments of one connection that differ only in sequence number (and IP id) are joined into one
//! frame of up to 64 KiB and written with a virtio-net header: the kernel takes it as one skb that
//! the guest's stack receives whole, and that is cut back into segments (checksummed in software)
//! wherever it leaves through a port without offloads. Everything else is written as it came, in
//! order.
//!
//! From the guest, the tap hands over what the guest's stack sent without segmenting or
//! checksumming it (the tap takes checksum and TSO offloads): a TCP segment of up to 64 KiB is
//! one read and one `slirp_input` (libslirp's TCP takes a segment of any length within its
//! window), instead of one per MSS. [`complete_checksum`] fills in the checksum the guest left to
//! the device, since libslirp verifies every checksum.

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice};

pub use crate::port::tun::VNET_HDR_LEN;
/// The virtio-net header's flag and GSO type used here (its 16-bit fields are in the host's byte
/// order).
const VNET_HDR_F_NEEDS_CSUM: u8 = 1;
const VNET_HDR_GSO_TCPV4: u8 = 1;
/// `csum_offset` of a UDP checksum, which may not be sent as zero.
const UDP_CHECKSUM_OFFSET: usize = 6;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_PSH: u8 = 0x08;
/// The IP total length field's limit.
const MAX_IP_LEN: usize = 65535;

/// A frame being built: the first segment's headers followed by the payloads joined so far.
struct Pending {
    /// Offset of the TCP header and of the payload in the frame.
    l4: usize,
    payload: usize,
    /// Payload length of the first segment: every segment but the last has it.
    gso_size: usize,
    segments: u32,
    next_seq: u32,
    /// A short segment or one with PSH ends the frame.
    closed: bool,
    /// Whether a joined segment carried PSH (the frame then carries it).
    push: bool,
}

/// Where frames go: the virtio-net header, the frame, and how many segments it joins (1 for a
/// frame written as it came).
pub type Writer<'w> = dyn FnMut(&[u8; VNET_HDR_LEN], &[u8], u32) + 'w;

/// The header of a frame written as it came: no offload asked for.
const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// The coalescer: frames go in with [`Coalescer::push`] and come out through the writer given;
/// [`Coalescer::flush`] writes what is still held.
#[derive(Default)]
pub struct Coalescer {
    /// The frame being built.
    frame: Vec<u8>,
    pending: Option<Pending>,
}

impl Coalescer {
    /// Takes one frame from libslirp. Frames reach `write` in the order they came; one that can
    /// start a GSO frame is held (copied) until the next push or flush, any other is written at
    /// once, from the caller's buffer.
    pub fn push(&mut self, frame: &[u8], write: &mut Writer<'_>) {
        if self.try_join(frame) {
            return;
        }
        self.flush(write);
        match candidate(frame) {
            // Held only if another segment as big could still join it.
            Some(pending) if frame.len() - ETH_LEN + pending.gso_size <= MAX_IP_LEN && !pending.closed => {
                self.frame.extend_from_slice(frame);
                self.pending = Some(pending);
            }
            _ => write(&PLAIN, frame, 1),
        }
    }

    /// Writes the frame being built, if any.
    pub fn flush(&mut self, write: &mut Writer<'_>) {
        let Some(pending) = self.pending.take() else { return };
        if pending.segments > 1 {
            let header = self.finish(&pending);
            write(&header, &self.frame, pending.segments);
        } else {
            write(&PLAIN, &self.frame, 1);
        }
        self.frame.clear();
    }

    /// Appends `frame`'s payload to the pending frame if it is the next segment of its
    /// connection with the same headers.
    fn try_join(&mut self, frame: &[u8]) -> bool {
        let Some(pending) = self.pending.as_mut() else {
            return false;
        };
        let held = &self.frame[..];
        if pending.closed
            || frame.len() <= pending.payload
            || !same_headers(held, frame, pending.l4, pending.payload)
        {
            return false;
        }
        let Ok(tcp) = TcpHeaderSlice::from_slice(&frame[pending.l4..]) else {
            return false;
        };
        let flags = frame[pending.l4 + 13];
        let data = &frame[pending.payload..];
        if tcp.sequence_number() != pending.next_seq
            || flags & !TCP_FLAG_PSH != TCP_FLAG_ACK
            || data.len() > pending.gso_size
            || held.len() - ETH_LEN + data.len() > MAX_IP_LEN
        {
            return false;
        }
        self.frame.extend_from_slice(data);
        pending.segments += 1;
        pending.next_seq = pending.next_seq.wrapping_add(data.len() as u32);
        pending.push |= flags & TCP_FLAG_PSH != 0;
        pending.closed = pending.push || data.len() < pending.gso_size;
        true
    }

    /// Turns the joined frame into a GSO frame (IP length and checksum; the TCP checksum left to
    /// the kernel, with the pseudo-header sum in place as `CHECKSUM_PARTIAL` wants) and gives its
    /// virtio-net header.
    fn finish(&mut self, pending: &Pending) -> [u8; VNET_HDR_LEN] {
        let frame = &mut self.frame[..];
        let ip_len = frame.len() - ETH_LEN;
        let tcp_len = frame.len() - pending.l4;
        frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        frame[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let ip_checksum = !fold(sum_words(&frame[ETH_LEN..pending.l4]));
        frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_checksum.to_be_bytes());
        if pending.push {
            frame[pending.l4 + 13] |= TCP_FLAG_PSH;
        }
        // Source and destination address, protocol, TCP length: the pseudo-header.
        let pseudo = sum_words(&frame[ETH_LEN + 12..ETH_LEN + 20]) + 6 + tcp_len as u64;
        frame[pending.l4 + 16..pending.l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());

        let mut header = [0u8; VNET_HDR_LEN];
        header[0] = VNET_HDR_F_NEEDS_CSUM;
        header[1] = VNET_HDR_GSO_TCPV4;
        header[2..4].copy_from_slice(&(pending.payload as u16).to_ne_bytes());
        header[4..6].copy_from_slice(&(pending.gso_size as u16).to_ne_bytes());
        header[6..8].copy_from_slice(&(pending.l4 as u16).to_ne_bytes());
        header[8..10].copy_from_slice(&16u16.to_ne_bytes());
        header
    }
}

/// The checksum of a frame read from the tap, filled in where the virtio-net header says the
/// device must compute it (`NEEDS_CSUM`: the field holds the pseudo-header sum, and everything from
/// `csum_start` is summed into it). `Err` for a header pointing outside the frame.
pub fn complete_checksum(header: &[u8], frame: &mut [u8]) -> Result<(), ()> {
    let [flags, _, _, _, _, _, s0, s1, o0, o1] = header.first_chunk::<VNET_HDR_LEN>().copied().ok_or(())?;
    if flags & VNET_HDR_F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(u16::from_ne_bytes([s0, s1]));
    let offset = usize::from(u16::from_ne_bytes([o0, o1]));
    let at = start + offset;
    if start >= frame.len() || at + 2 > frame.len() {
        return Err(());
    }
    let mut checksum = !fold(sum_words(&frame[start..]));
    if checksum == 0 && offset == UDP_CHECKSUM_OFFSET {
        checksum = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// A frame that can start a GSO frame: IPv4 without fragmentation carrying a TCP segment with
/// data and no other flag than ACK (or ACK and PSH, which then ends it at once).
fn candidate(frame: &[u8]) -> Option<Pending> {
    if frame.get(12..ETH_LEN)? != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = Ipv4HeaderSlice::from_slice(&frame[ETH_LEN..]).ok()?;
    if ip.protocol() != etherparse::IpNumber::TCP
        || ip.more_fragments()
        || ip.fragments_offset().value() != 0
        || usize::from(ip.total_len()) != frame.len() - ETH_LEN
    {
        return None;
    }
    let l4 = ETH_LEN + ip.slice().len();
    let tcp = TcpHeaderSlice::from_slice(&frame[l4..]).ok()?;
    let payload = l4 + tcp.slice().len();
    let flags = frame[l4 + 13];
    let gso_size = frame.len() - payload;
    if gso_size == 0 || flags & !TCP_FLAG_PSH != TCP_FLAG_ACK {
        return None;
    }
    let push = flags & TCP_FLAG_PSH != 0;
    Some(Pending {
        l4,
        payload,
        gso_size,
        segments: 1,
        next_seq: tcp.sequence_number().wrapping_add(gso_size as u32),
        closed: push,
        push,
    })
}

/// Whether two frames' headers (up to `payload`) are equal but for what differs between
/// segments of one stream: IP total length, id and checksum; TCP sequence number, PSH and
/// checksum.
fn same_headers(held: &[u8], frame: &[u8], l4: usize, payload: usize) -> bool {
    let varying = |at: usize| {
        (ETH_LEN + 2..ETH_LEN + 6).contains(&at)
            || (ETH_LEN + 10..ETH_LEN + 12).contains(&at)
            || (l4 + 4..l4 + 8).contains(&at)
            || (l4 + 16..l4 + 18).contains(&at)
    };
    held[..payload]
        .iter()
        .zip(&frame[..payload])
        .enumerate()
        .all(|(at, (a, b))| {
            if at == l4 + 13 {
                (a | TCP_FLAG_PSH) == (b | TCP_FLAG_PSH)
            } else {
                a == b || varying(at)
            }
        })
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte padded with zero), not yet
/// folded.
fn sum_words(bytes: &[u8]) -> u64 {
    let pairs = bytes.chunks_exact(2);
    let last = pairs.remainder().first().map_or(0, |byte| u64::from(*byte) << 8);
    pairs.map(|pair| u64::from(u16::from_be_bytes([pair[0], pair[1]]))).sum::<u64>() + last
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn segment(seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
        let builder =
            PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [0x52, 0x54, 0, 0x12, 0x34, 0x56])
                .ipv4([10, 0, 2, 2], [10, 0, 2, 15], 64)
                .tcp(5201, 40000, seq, 65535)
                .ack(7);
        let builder = if psh { builder.psh() } else { builder };
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).expect("frame built");
        frame
    }

    fn run(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut coalescer = Coalescer::default();
        for frame in frames {
            coalescer.push(frame, &mut |header, bytes, _| out.push([&header[..], bytes].concat()));
        }
        coalescer.flush(&mut |header, bytes, _| out.push([&header[..], bytes].concat()));
        out
    }

    #[test]
    fn consecutive_segments_become_one_gso_frame_with_valid_headers() {
        let out = run(&[
            segment(1000, &[1; 100], false),
            segment(1100, &[2; 100], false),
            segment(1200, &[3; 40], true),
        ]);
        assert_eq!(out.len(), 1);
        let (header, frame) = out[0].split_at(VNET_HDR_LEN);
        assert_eq!(header[0], VNET_HDR_F_NEEDS_CSUM);
        assert_eq!(header[1], VNET_HDR_GSO_TCPV4);
        assert_eq!(
            u16::from_ne_bytes([header[2], header[3]]),
            54,
            "headers: Ethernet, IPv4, TCP"
        );
        assert_eq!(
            u16::from_ne_bytes([header[4], header[5]]),
            100,
            "segment size"
        );
        assert_eq!(
            u16::from_ne_bytes([header[6], header[7]]),
            34,
            "checksum start"
        );
        assert_eq!(frame.len(), 54 + 240);
        let ip = Ipv4HeaderSlice::from_slice(&frame[ETH_LEN..]).expect("IPv4");
        assert_eq!(usize::from(ip.total_len()), 20 + 20 + 240);
        assert_eq!(ip.to_header().calc_header_checksum(), ip.header_checksum());
        let tcp = TcpHeaderSlice::from_slice(&frame[34..]).expect("TCP");
        assert_eq!(tcp.sequence_number(), 1000);
        assert!(tcp.psh(), "the last segment's PSH is kept");
        assert_eq!(&frame[54..154], &[1; 100]);
        assert_eq!(&frame[254..], &[3; 40]);
        // The checksum field holds the pseudo-header sum the kernel completes.
        let pseudo = fold(sum_words(&[10, 0, 2, 2, 10, 0, 2, 15]) + 6 + 260);
        assert_eq!(tcp.checksum(), pseudo);
    }

    #[test]
    fn a_lone_segment_and_other_frames_pass_unchanged_in_order() {
        let arp = {
            let mut frame = vec![0xff; 6];
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
            frame.extend_from_slice(&[0; 28]);
            frame
        };
        let one = segment(1000, &[1; 100], false);
        let gap = segment(5000, &[2; 100], false);
        let out = run(&[one.clone(), arp.clone(), gap.clone()]);
        let plain: Vec<Vec<u8>> = [&one, &arp, &gap]
            .iter()
            .map(|f| [vec![0; VNET_HDR_LEN], (*f).clone()].concat())
            .collect();
        assert_eq!(out, plain);
    }

    #[test]
    fn gaps_other_connections_and_flags_end_a_frame() {
        let mut other_port = segment(1100, &[2; 100], false);
        other_port[34..36].copy_from_slice(&5202u16.to_be_bytes());
        let out = run(&[
            segment(1000, &[1; 100], false),
            other_port,
            segment(1200, &[3; 100], false),
            segment(1300, &[4; 50], false),
            segment(1350, &[5; 50], false),
        ]);
        // Nothing joins the first two; the third and fourth join; a short segment ends the frame.
        assert_eq!(out.len(), 4);
        assert_eq!(out[2][1], VNET_HDR_GSO_TCPV4);
        assert_eq!(out[3][1], 0);
    }

    #[test]
    fn frames_stop_short_of_the_ip_length_limit() {
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| segment(i * 30000, &[7; 30000], false))
            .collect();
        let out = run(&frames);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), VNET_HDR_LEN + 54 + 60000);
    }

    #[test]
    fn a_partial_checksum_from_the_guest_is_completed() {
        let mut frame = segment(1000, &[9; 301], true);
        let expected = TcpHeaderSlice::from_slice(&frame[34..]).expect("TCP").checksum();
        // What a stack leaves for the device: the pseudo-header sum over source, destination,
        // protocol and TCP length.
        let pseudo = fold(sum_words(&[10, 0, 2, 2, 10, 0, 2, 15]) + 6 + 20 + 301);
        frame[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let mut header = [0u8; VNET_HDR_LEN];
        header[0] = VNET_HDR_F_NEEDS_CSUM;
        header[6..8].copy_from_slice(&34u16.to_ne_bytes());
        header[8..10].copy_from_slice(&16u16.to_ne_bytes());
        complete_checksum(&header, &mut frame).expect("completed");
        assert_eq!(TcpHeaderSlice::from_slice(&frame[34..]).expect("TCP").checksum(), expected);
        header[6..8].copy_from_slice(&2000u16.to_ne_bytes());
        assert!(complete_checksum(&header, &mut frame).is_err(), "a start past the frame");
    }
}
