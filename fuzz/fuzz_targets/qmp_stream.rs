//! The QMP control socket's input: a byte stream cut into reads of any size, split into JSON
//! values by the decoder; every `arguments` object is read as `netdev_add` arguments (the QAPI
//! visitor) and validated, as the daemon does before it plans anything.
#![no_main]

use bytes::BytesMut;
use dataplane::{netdev::Netdev, qmp::codec::{Decoder, Inbound}};
use fuzz_input::Input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // A small limit now and then, so the skipping of an oversized value is reached too.
    let limit = match input.byte() % 4 {
        0 => 32,
        1 => 300,
        _ => dataplane::qmp::server::DEFAULT_MAX_MESSAGE_BYTES,
    };
    let mut decoder = Decoder::new(limit);
    let mut buf = BytesMut::new();
    while let Some(read) = input.piece() {
        buf.extend_from_slice(read);
        while let Some(inbound) = decoder.decode(&mut buf) {
            if let Inbound::Value(value) = inbound
                && let Some(arguments) = value.get("arguments")
                && let Ok(netdev) = Netdev::from_json(arguments)
            {
                let _ = netdev.validate();
                let _ = netdev.to_json();
            }
        }
    }
});
