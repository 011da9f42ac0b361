//! Keyval text (`-netdev` syntax, `netdevctl` arguments, the configuration file's netdevs): the
//! keyval parser, the QAPI visitor over its result, QEMU's validation, and each command's
//! keyval form.
#![no_main]

use dataplane::{netdev::Netdev, qapi::keyval, qmp::commands};
use libfuzzer_sys::fuzz_target;

/// Commands whose arguments netdevctl reads as keyval.
const COMMANDS: &[&str] = &[
    "netdev_add",
    "netdev_del",
    "set_link",
    "query-rx-filter",
    "x-set-rx-filter",
    "x-hostfwd-add",
    "x-hostfwd-remove",
    "getfd",
    "announce-self",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let _ = keyval::parse(text, None);
    if let Ok(netdev) = Netdev::from_keyval(text) {
        let _ = netdev.validate();
        // What the daemon answers with must read back as the same netdev.
        let json = netdev.to_json();
        let again = Netdev::from_json(&json).expect("a parsed netdev's JSON parses");
        assert_eq!(again.to_json(), json, "JSON round trip of a parsed netdev");
    }
    let name = COMMANDS[usize::from(selector) % COMMANDS.len()];
    let _ = commands::arguments_from_keyval(name, text);
});
