//! Property tests.

use super::{valid_forms::valid_forms, *};

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// Member names of every netdev type and of `SocketAddress`, plus the base members.
const MEMBER_NAMES: &[&str] = &[
    "id", "type", "hubid", "netdev", "fd", "listen", "connect", "mcast", "localaddr", "udp", "addr", "server",
    "reconnect", "reconnect-ms", "local", "remote", "host", "port", "path", "str", "cid", "to", "numeric", "ipv4",
    "ipv6", "abstract", "tight", "keep-alive", "mptcp", "ifname", "fds", "script", "downscript", "br", "helper",
    "sndbuf", "vnet_hdr", "vhost", "vhostfd", "vhostfds", "vhostforce", "queues", "poll-us", "hostname",
    "restrict", "ip", "net", "tftp", "bootfile", "dhcpstart", "dns", "dnssearch", "domainname", "ipv6-prefix",
    "ipv6-prefixlen", "ipv6-host", "ipv6-dns", "smb", "smbserver", "hostfwd", "guestfwd", "tftp-server-name",
    "src", "dst", "srcport", "dstport", "cookie64", "counter", "pincounter", "txcookie", "rxcookie", "txsession",
    "rxsession", "offset", "sock", "group", "mode", "devname", "chardev", "vhostdev", "x-svq", "force-copy",
    "start-queue", "inhibit", "sock-fds", "map-path", "map-start-index", "quiet", "vhost-user", "mtu", "mac",
    "search", "tcp-ports", "macaddr", "model", "vectors", "start-address", "isolated", "nat66-prefix",
];

/// String values that mean something somewhere (type names, enum values, addresses, numbers).
const WORDS: &[&str] = &[
    "none", "nic", "user", "tap", "l2tpv3", "socket", "stream", "dgram", "vde", "bridge", "hubport", "netmap",
    "vhost-user", "vhost-vdpa", "af-xdp", "passt", "vmnet-host", "vmnet-shared", "vmnet-bridged", "inet", "unix",
    "vsock", "fd", "native", "skb", "on", "off", "yes", "0", "-1", "0x10", "1k", "n0", "1bad", "eth0", "3:4",
    "127.0.0.1", "224.0.0.1", "10.0.2.0/24", "10.0.0.0/33", "127.0.0.1:1234", ":1", "230.0.0.1:5000", "/tmp/x",
    "fec0::", "", "tcp::2222-:22",
];

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(MEMBER_NAMES).prop_map(str::to_owned),
        1 => "[a-z_.-]{0,8}",
    ]
}

/// Any JSON value, biased towards the names and values of the netdev schema.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..70_000).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..8).prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// Objects shaped like `netdev_add` arguments: an id, a (mostly known) type and random members.
fn arb_netdev_args() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => "[a-z][a-z0-9._-]{0,6}", 1 => any::<String>()],
        prop_oneof![6 => prop::sample::select(&ALL_TYPES[..]).prop_map(str::to_owned), 1 => any::<String>()],
        prop::collection::vec((arb_key(), arb_json()), 0..6),
    )
        .prop_map(|(id, kind, members)| {
            let mut object: serde_json::Map<String, Value> = members.into_iter().collect();
            object.insert("id".into(), Value::String(id));
            object.insert("type".into(), Value::String(kind));
            Value::Object(object)
        })
}

/// A valid form with one member removed, replaced or added.
fn arb_mutated_valid_form() -> impl Strategy<Value = Value> {
    let forms: Vec<Value> = valid_forms().into_iter().map(|(args, _)| args).collect();
    (prop::sample::select(forms), any::<prop::sample::Index>(), arb_key(), arb_json(), 0..3u8).prop_map(
        |(mut args, index, key, value, action)| {
            if let Value::Object(object) = &mut args {
                let existing: Vec<String> = object.keys().cloned().collect();
                let victim = index.get(&existing).clone();
                match action {
                    0 => {
                        object.shift_remove(&victim);
                    }
                    1 => {
                        object.insert(victim, value);
                    }
                    _ => {
                        object.insert(key, value);
                    }
                }
            }
            args
        },
    )
}

/// Whatever parses validates without panicking and survives `to_json` unchanged.
fn check_parsed(netdev: &Netdev) -> Result<(), TestCaseError> {
    let _ = netdev.validate();
    let json = netdev.to_json();
    let again = Netdev::from_json(&json);
    prop_assert_eq!(again.as_ref(), Ok(netdev), "to_json gave {}", json);
    prop_assert_eq!(json["type"].as_str(), Some(netdev.kind()));
    Ok(())
}

/// A keyval element list built from schema tokens, so that many inputs get past the parser.
fn arb_keyval_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        4 => prop::sample::select(MEMBER_NAMES).prop_map(str::to_owned),
        2 => (prop::sample::select(vec!["addr", "local", "remote", "dnssearch", "hostfwd"]), prop::sample::select(vec!["type", "host", "port", "path", "str", "0", "1", "0.str"]))
            .prop_map(|(a, b)| format!("{a}.{b}")),
        1 => "[a-z0-9.=_-]{0,6}",
    ];
    let value = prop_oneof![4 => prop::sample::select(WORDS).prop_map(str::to_owned), 1 => "[ -~]{0,10}"];
    (
        prop::sample::select(&ALL_TYPES[..]),
        prop::collection::vec((key, value), 0..8),
    )
        .prop_map(|(kind, pairs)| {
            let mut text = format!("{kind},id=k0");
            for (key, value) in pairs {
                text.push(',');
                text.push_str(&key);
                text.push('=');
                text.push_str(&value.replace(',', ",,"));
            }
            text
        })
}

fn arb_id() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9._-]{0,15}"
}

proptest! {
    #[test]
    fn keyval_parse_never_panics(text in any::<String>()) {
        let _ = crate::qapi::keyval::parse(&text, Some("type"));
        let _ = crate::qapi::keyval::parse(&text, None);
        if let Ok(netdev) = Netdev::from_keyval(&text) {
            check_parsed(&netdev)?;
        }
    }

    #[test]
    fn keyval_like_text_never_panics(text in "[a-z0-9=,._ -]{0,48}") {
        let _ = crate::qapi::keyval::parse(&text, Some("type"));
        if let Ok(netdev) = Netdev::from_keyval(&text) {
            check_parsed(&netdev)?;
        }
    }

    #[test]
    fn schema_keyval_never_panics(text in arb_keyval_text()) {
        if let Ok(netdev) = Netdev::from_keyval(&text) {
            check_parsed(&netdev)?;
        }
    }

    #[test]
    fn arbitrary_json_never_panics(value in arb_json()) {
        if let Ok(netdev) = Netdev::from_json(&value) {
            check_parsed(&netdev)?;
        }
    }

    #[test]
    fn netdev_shaped_json_never_panics(args in arb_netdev_args()) {
        if let Ok(netdev) = Netdev::from_json(&args) {
            prop_assert_eq!(Some(netdev.kind()), args["type"].as_str());
            check_parsed(&netdev)?;
        }
    }

    #[test]
    fn mutated_valid_forms_never_panic(args in arb_mutated_valid_form()) {
        match Netdev::from_json(&args) {
            Ok(netdev) => check_parsed(&netdev)?,
            // Every refusal is QEMU-style text naming a parameter or the id rule.
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn hubport_json_and_keyval_agree(
        id in arb_id(),
        hubid in any::<i32>(),
        peer in proptest::option::of(arb_id()),
        radix in 0..3u8,
    ) {
        let mut args = json!({"id": id, "type": "hubport", "hubid": hubid});
        let number = match radix {
            0 => hubid.to_string(),
            1 if hubid < 0 => format!("-{:#x}", hubid.unsigned_abs()),
            1 => format!("{hubid:#x}"),
            _ if hubid < 0 => format!("-0{:o}", hubid.unsigned_abs()),
            _ => format!("0{hubid:o}"),
        };
        let mut text = format!("hubport,id={id},hubid={number}");
        if let Some(peer) = &peer {
            args["netdev"] = json!(peer);
            text.push_str(&format!(",netdev={peer}"));
        }
        let from_json = Netdev::from_json(&args);
        let from_kv = Netdev::from_keyval(&text);
        prop_assert_eq!(&from_json, &from_kv, "{} vs {}", args, text);
        let netdev = from_json.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&netdev.id, &id);
        prop_assert_eq!(&netdev.options, &NetdevOptions::Hubport(hubport::HubPortOptions { hubid, netdev: peer }));
        prop_assert!(netdev.validate().is_ok());
        check_parsed(&netdev)?;
    }

    #[test]
    fn keyval_comma_escaping_round_trips(value in any::<String>()) {
        let text = format!("user,id=u,bootfile={},restrict=on", value.replace(',', ",,"));
        let netdev = Netdev::from_keyval(&text).map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        let NetdevOptions::User(user) = netdev.options else { return Err(TestCaseError::fail("not user")) };
        prop_assert_eq!(user.bootfile.as_deref(), Some(value.as_str()));
        prop_assert_eq!(user.restrict, Some(true));
    }
}
