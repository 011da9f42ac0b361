//! The L2TPv3 data header (RFC 3931) in QEMU's layout: building and checking it.
//!
//! Layout, all fields big-endian (the kernel's eBPF fast path uses the same one):
//!
//! ```text
//! [u32 0x00030000, UDP only] [u32 session] [cookie: 0, 4 or 8 bytes] [u32 counter, if counted]
//! [`offset` zero bytes] [Ethernet frame]
//! ```
//!
//! QEMU quirks kept for wire compatibility: the first word is never checked on receive, nor is
//! the counter; `pincounter` without `counter` occupies no bytes; a 4-byte cookie is the low half
//! of the configured value, and on receive it is compared with the whole configured `rxcookie`.

/// The L2TPv3 data header as QEMU lays it out (see `netdev::l2tpv3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2tpHeader {
    pub tx_session: u32,
    pub rx_session: u32,
    /// 0, 4 or 8 bytes.
    pub cookie_len: u8,
    pub tx_cookie: u64,
    pub rx_cookie: u64,
    /// A 4-byte counter follows the cookie (`counter`), sent as 0 with `pincounter`.
    pub counter: bool,
    pub pin_counter: bool,
    /// Zero bytes between the header and the frame.
    pub offset: u16,
}

/// The first word of a data packet over UDP: T bit clear, version 3.
pub const DATA_PACKET: u32 = 0x0003_0000;

/// Why a received datagram is not one of this tunnel's data packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2tpMismatch {
    /// Shorter than the header.
    Truncated,
    Session {
        received: u32,
    },
    Cookie {
        received: u64,
    },
}

/// Bytes before the frame.
#[must_use]
pub fn header_len(header: &L2tpHeader, over_udp: bool) -> usize {
    let udp_word = if over_udp { 4 } else { 0 };
    let counter = if header.counter { 4 } else { 0 };
    udp_word + 4 + usize::from(header.cookie_len) + counter + usize::from(header.offset)
}

/// The counter a tunnel sends next: 1, 2, … per packet, or always 0 when pinned.
#[derive(Debug, Default)]
pub struct TxCounter {
    sent: u32,
}

impl TxCounter {
    pub fn next(&mut self, header: &L2tpHeader) -> u32 {
        if header.pin_counter {
            return 0;
        }
        self.sent = self.sent.wrapping_add(1);
        self.sent
    }
}

/// Appends the header for one packet to `out` (the frame goes after it).
pub fn encode(header: &L2tpHeader, over_udp: bool, counter: u32, out: &mut Vec<u8>) {
    if over_udp {
        out.extend_from_slice(&DATA_PACKET.to_be_bytes());
    }
    out.extend_from_slice(&header.tx_session.to_be_bytes());
    match header.cookie_len {
        8 => out.extend_from_slice(&header.tx_cookie.to_be_bytes()),
        4 => out.extend_from_slice(&low_half(header.tx_cookie).to_be_bytes()),
        _ => {}
    }
    if header.counter {
        let value = if header.pin_counter { 0 } else { counter };
        out.extend_from_slice(&value.to_be_bytes());
    }
    out.resize(out.len() + usize::from(header.offset), 0);
}

/// Checks session and cookie of a received packet (without any IP header) and returns where its
/// frame starts.
pub fn frame_offset(
    header: &L2tpHeader,
    over_udp: bool,
    datagram: &[u8],
) -> Result<usize, L2tpMismatch> {
    let len = header_len(header, over_udp);
    if datagram.len() < len {
        return Err(L2tpMismatch::Truncated);
    }
    let session_at = if over_udp { 4 } else { 0 };
    let session = read_u32(datagram, session_at).ok_or(L2tpMismatch::Truncated)?;
    if session != header.rx_session {
        return Err(L2tpMismatch::Session { received: session });
    }
    let cookie_at = session_at + 4;
    let cookie = match header.cookie_len {
        8 => read_u64(datagram, cookie_at),
        4 => read_u32(datagram, cookie_at).map(u64::from),
        _ => None,
    };
    if let Some(cookie) = cookie
        && cookie != header.rx_cookie
    {
        return Err(L2tpMismatch::Cookie { received: cookie });
    }
    Ok(len)
}

fn low_half(value: u64) -> u32 {
    u32::try_from(value & u64::from(u32::MAX)).unwrap_or_default()
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes(field.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at + 8)?;
    Some(u64::from_be_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(session: u32) -> L2tpHeader {
        L2tpHeader {
            tx_session: session,
            rx_session: session,
            cookie_len: 0,
            tx_cookie: 0,
            rx_cookie: 0,
            counter: false,
            pin_counter: false,
            offset: 0,
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn packet(header: &L2tpHeader, over_udp: bool, counter: u32, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(header, over_udp, counter, &mut out);
        assert_eq!(out.len(), header_len(header, over_udp));
        out.extend_from_slice(frame);
        out
    }

    #[test]
    fn no_cookie_no_counter_matches_qemu() {
        let header = plain(0x11);
        assert_eq!(
            packet(&header, true, 1, b"frame"),
            [hex("00030000 00000011"), b"frame".to_vec()].concat()
        );
        assert_eq!(
            packet(&header, false, 1, b"frame"),
            [hex("00000011"), b"frame".to_vec()].concat()
        );
    }

    #[test]
    fn cookie32_with_counter_matches_qemu() {
        let header = L2tpHeader {
            cookie_len: 4,
            tx_cookie: 0x1234_5678,
            rx_cookie: 0x1234_5678,
            counter: true,
            ..plain(0x12)
        };
        let mut counter = TxCounter::default();
        let first = counter.next(&header);
        assert_eq!(first, 1);
        let bytes = packet(&header, true, first, b"frame");
        assert_eq!(
            bytes,
            [
                hex("00030000 00000012 12345678 00000001"),
                b"frame".to_vec()
            ]
            .concat()
        );
        assert_eq!(frame_offset(&header, true, &bytes), Ok(16));
        assert_eq!(counter.next(&header), 2);
    }

    #[test]
    fn cookie64_counter_and_offset_match_qemu() {
        let cookie = 0x0123_4567_89ab_cdef;
        let header = L2tpHeader {
            cookie_len: 8,
            tx_cookie: cookie,
            rx_cookie: cookie,
            counter: true,
            offset: 2,
            ..plain(0x14)
        };
        let bytes = packet(&header, true, 1, b"frame");
        assert_eq!(
            bytes,
            [
                hex("00030000 00000014 0123456789abcdef 00000001 0000"),
                b"frame".to_vec()
            ]
            .concat()
        );
        assert_eq!(frame_offset(&header, true, &bytes), Ok(22));
        assert_eq!(frame_offset(&header, false, &bytes[4..]), Ok(18));
    }

    #[test]
    fn pinned_counter_is_zero_and_takes_no_room_without_counter() {
        let pinned = L2tpHeader {
            counter: true,
            pin_counter: true,
            ..plain(7)
        };
        let mut counter = TxCounter::default();
        assert_eq!(counter.next(&pinned), 0);
        assert_eq!(packet(&pinned, false, 5, b""), hex("00000007 00000000"));
        let pin_only = L2tpHeader {
            pin_counter: true,
            ..plain(7)
        };
        assert_eq!(header_len(&pin_only, false), 4);
    }

    #[test]
    fn mismatches_are_reported() {
        let header = L2tpHeader {
            rx_session: 0x22,
            cookie_len: 4,
            tx_cookie: 1,
            rx_cookie: 2,
            ..plain(0x11)
        };
        let mine = packet(&header, true, 0, b"frame");
        assert_eq!(
            frame_offset(&header, true, &mine),
            Err(L2tpMismatch::Session { received: 0x11 })
        );
        let peer = L2tpHeader {
            tx_session: 0x22,
            ..header.clone()
        };
        let theirs = packet(&peer, true, 0, b"frame");
        assert_eq!(
            frame_offset(&header, true, &theirs),
            Err(L2tpMismatch::Cookie { received: 1 })
        );
        assert_eq!(
            frame_offset(&header, true, &theirs[..10]),
            Err(L2tpMismatch::Truncated)
        );
        let right = L2tpHeader {
            tx_cookie: 2,
            ..peer
        };
        assert_eq!(
            frame_offset(&header, true, &packet(&right, true, 0, b"frame")),
            Ok(12)
        );
    }
}
