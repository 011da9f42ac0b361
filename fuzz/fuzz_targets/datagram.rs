//! `dgram`/`socket` UDP and L2TPv3 payloads as the datagram backend takes them: for a raw IP
//! socket the IPv4 header (with options) is skipped first, then the L2TPv3 header is checked,
//! then the frame's size; a plain UDP payload is the frame.
#![no_main]

use dataplane::{
    backend::datagram::ipv4_header_len,
    model::tunnel::l2tp::{self, L2tpHeader},
    port::pipe::MAX_FRAME,
};
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;

/// The smallest Ethernet frame the backends pass on (a header).
const MIN_FRAME: usize = 14;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let mut datagram = input.rest();
    if flags & 1 != 0 {
        let Some(len) = ipv4_header_len(datagram) else { return };
        assert!((20..=60).contains(&len) && len <= datagram.len(), "IPv4 header length {len}");
        datagram = &datagram[len..];
    }
    if flags & 2 != 0 {
        // The QEMU defaults: session 0 both ways, no cookie, UDP framing if asked.
        let header = L2tpHeader {
            tx_session: 0,
            rx_session: 0,
            cookie_len: if flags & 4 != 0 { 4 } else { 0 },
            tx_cookie: 0,
            rx_cookie: 0,
            counter: flags & 8 != 0,
            pin_counter: false,
            offset: 0,
        };
        let Ok(offset) = l2tp::frame_offset(&header, flags & 16 != 0, datagram) else { return };
        datagram = &datagram[offset..];
    }
    let _frame_passes = (MIN_FRAME..=MAX_FRAME).contains(&datagram.len());
});
