//! L2TPv3 input: a received datagram (after any IP header) checked against a tunnel's session,
//! cookie and layout, the configuration drawn from the input too; and the header this side
//! sends must be read back by a peer configured the other way round.
#![no_main]

use dataplane::model::tunnel::l2tp::{self, L2tpHeader, TxCounter};
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let header = L2tpHeader {
        tx_session: input.u32(),
        rx_session: input.u32(),
        cookie_len: [0, 4, 8][usize::from(flags & 3) % 3],
        tx_cookie: input.u64(),
        rx_cookie: input.u64(),
        counter: flags & 4 != 0,
        pin_counter: flags & 8 != 0,
        offset: input.u16() % 512,
    };
    let over_udp = flags & 16 != 0;
    let datagram = input.rest();
    if let Ok(offset) = l2tp::frame_offset(&header, over_udp, datagram) {
        assert!(offset <= datagram.len(), "frame offset past the datagram");
    }

    // What we send: decoded by the peer (tx and rx swapped), the frame starts after the header.
    let mut peer = header.clone();
    peer.rx_session = header.tx_session;
    peer.rx_cookie = if header.cookie_len == 4 { header.tx_cookie & u64::from(u32::MAX) } else { header.tx_cookie };
    let mut packet = Vec::new();
    let counter = TxCounter::default().next(&header);
    l2tp::encode(&header, over_udp, counter, &mut packet);
    assert_eq!(packet.len(), l2tp::header_len(&header, over_udp));
    packet.extend_from_slice(datagram);
    assert_eq!(l2tp::frame_offset(&peer, over_udp, &packet), Ok(l2tp::header_len(&header, over_udp)));
});
