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
        prop_assert_eq!(&netdev.options, &NetdevOptions::Hubport(hubport::HubPortOptions { hubid, netdev: peer, ..Default::default() }));
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

// ---------------------------------------------------------------------------------------------
// Inputs that parse: built from the schema's members and their value kinds
// ---------------------------------------------------------------------------------------------

/// How a member's value is written: the same choice gives the JSON and the keyval form.
#[derive(Clone, Copy, Debug)]
enum ValueKind {
    /// A string, one of these (commas included: keyval must escape them).
    Text(&'static [&'static str]),
    Flag,
    /// An integer in `lo..=hi`.
    Int(i64, i64),
    /// A QAPI `size`: a number of bytes, in keyval optionally with a `k` suffix.
    Size,
    /// A `['String']` list: `[{"str": ..}]` in JSON, the key repeated in keyval.
    List(&'static [&'static str]),
    /// A `SocketAddress` flat union.
    Address,
}

use ValueKind::{Address, Flag, Int, List, Size, Text};

/// (member, kind, required) for each type the generator covers; names and widths follow the
/// option structs in `netdev/*.rs`.
type Members = &'static [(&'static str, ValueKind, bool)];

const IPV4S: &[&str] = &["10.0.2.2", "192.168.76.3", "127.0.0.1", "300.1.2.3"];
const PATHS: &[&str] = &["/tmp/x", "/srv/tftp", "no", "a,b", ""];
const U32_MAX: i64 = u32::MAX as i64;

const PARSING_TYPES: &[(&str, Members)] = &[
    ("none", &[]),
    ("hubport", &[("hubid", Int(i32::MIN as i64, i32::MAX as i64), true), ("netdev", Text(&["h0", "n.1"]), false)]),
    (
        "user",
        &[
            ("hostname", Text(&["guest", ""]), false),
            ("restrict", Flag, false),
            ("ipv4", Flag, false),
            ("ipv6", Flag, false),
            ("net", Text(&["10.0.2.0/24", "192.168.76.0/24", "10.0.0.0/33", "10.0.2.0"]), false),
            ("host", Text(IPV4S), false),
            ("dhcpstart", Text(IPV4S), false),
            ("dns", Text(IPV4S), false),
            ("tftp", Text(PATHS), false),
            ("bootfile", Text(&["pxelinux.0", "a,,b"]), false),
            ("dnssearch", List(&["example.org", "a.b", ""]), false),
            ("domainname", Text(&["example.org"]), false),
            ("ipv6-prefix", Text(&["fd00::", "fec0::", "nonsense"]), false),
            ("ipv6-prefixlen", Int(-1, 130), false),
            ("hostfwd", List(&["tcp::2222-:22", "udp:127.0.0.1:5353-:53", "bad"]), false),
            ("guestfwd", List(&["tcp:10.0.2.100:1234-cmd:nc a,b", "tcp:10.0.2.100:1-127.0.0.1:2"]), false),
            ("tftp-server-name", Text(&["boot"]), false),
            ("x-mtu", Int(0, 70_000), false),
        ],
    ),
    (
        "tap",
        &[
            ("ifname", Text(&["tap0", "x"]), false),
            ("fds", Text(&["3:4", "3"]), false),
            ("script", Text(PATHS), false),
            ("downscript", Text(PATHS), false),
            ("sndbuf", Size, false),
            ("vnet_hdr", Flag, false),
            ("vhost", Flag, false),
            ("vhostforce", Flag, false),
            ("queues", Int(0, 16), false),
            ("poll-us", Int(0, U32_MAX), false),
        ],
    ),
    (
        "socket",
        &[
            ("listen", Text(&[":1234", "127.0.0.1:1", "127.0.0.1"]), false),
            ("connect", Text(&["127.0.0.1:1234", "localhost:1"]), false),
            ("mcast", Text(&["230.0.0.1:1234", "127.0.0.1:1"]), false),
            ("localaddr", Text(&["127.0.0.1", ":1"]), false),
            ("udp", Text(&["127.0.0.1:2"]), false),
            ("fd", Text(&["3"]), false),
        ],
    ),
    ("stream", &[("addr", Address, true), ("server", Flag, false), ("reconnect-ms", Int(-1, 100_000), false)]),
    ("dgram", &[("local", Address, false), ("remote", Address, false)]),
    (
        "l2tpv3",
        &[
            ("src", Text(&["127.0.0.1", "::1", "localhost"]), true),
            ("dst", Text(&["127.0.0.1", "::1"]), true),
            ("srcport", Text(&["1701", "x"]), false),
            ("dstport", Text(&["1702"]), false),
            ("ipv6", Flag, false),
            ("udp", Flag, false),
            ("cookie64", Flag, false),
            ("counter", Flag, false),
            ("pincounter", Flag, false),
            ("txcookie", Int(0, i64::MAX), false),
            ("rxcookie", Int(0, i64::MAX), false),
            ("txsession", Int(0, U32_MAX), true),
            ("rxsession", Int(0, U32_MAX), false),
            ("offset", Int(0, U32_MAX), false),
        ],
    ),
];

/// A member's value in both forms.
#[derive(Clone, Debug)]
struct Written {
    json: Value,
    /// `(key suffix, already comma-escaped value)` pairs; the suffix follows the member name.
    keyval: Vec<(String, String)>,
}

fn escaped(text: &str) -> String {
    text.replace(',', ",,")
}

fn flag(on: bool) -> Written {
    Written { json: json!(on), keyval: vec![(String::new(), if on { "on" } else { "off" }.to_owned())] }
}

fn arb_address() -> BoxedStrategy<Written> {
    let inet = (
        prop::sample::select(&["127.0.0.1", "localhost", "::1", "[::1]", ""][..]),
        prop::sample::select(&["0", "1234", "65535"][..]),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(host, port, ipv4, to)| {
            let mut json = json!({"type": "inet", "host": host, "port": port});
            let mut keyval = vec![(".type".to_owned(), "inet".to_owned()), (".host".to_owned(), host.to_owned()), (".port".to_owned(), port.to_owned())];
            if let Some(ipv4) = ipv4 {
                json["ipv4"] = json!(ipv4);
                keyval.push((".ipv4".to_owned(), if ipv4 { "on" } else { "off" }.to_owned()));
            }
            if let Some(to) = to {
                json["to"] = json!(to);
                keyval.push((".to".to_owned(), to.to_string()));
            }
            Written { json, keyval }
        });
    let unix = (prop::sample::select(&["/tmp/x.sock", "/tmp/a,b", "x"][..]), proptest::option::of(any::<bool>())).prop_map(|(path, abstract_)| {
        let mut json = json!({"type": "unix", "path": path});
        let mut keyval = vec![(".type".to_owned(), "unix".to_owned()), (".path".to_owned(), escaped(path))];
        if let Some(abstract_) = abstract_ {
            json["abstract"] = json!(abstract_);
            keyval.push((".abstract".to_owned(), if abstract_ { "on" } else { "off" }.to_owned()));
        }
        Written { json, keyval }
    });
    let fd = prop::sample::select(&["3", "fdname"][..]).prop_map(|name| Written {
        json: json!({"type": "fd", "str": name}),
        keyval: vec![(".type".to_owned(), "fd".to_owned()), (".str".to_owned(), name.to_owned())],
    });
    prop_oneof![3 => inet, 2 => unix, 1 => fd].boxed()
}

fn arb_written(kind: ValueKind) -> BoxedStrategy<Written> {
    match kind {
        Text(choices) => prop::sample::select(choices)
            .prop_map(|text| Written { json: json!(text), keyval: vec![(String::new(), escaped(text))] })
            .boxed(),
        Flag => any::<bool>().prop_map(flag).boxed(),
        Int(lo, hi) => (lo..=hi).prop_map(|n| Written { json: json!(n), keyval: vec![(String::new(), n.to_string())] }).boxed(),
        Size => (0..1_u64 << 20, any::<bool>())
            .prop_map(|(n, suffixed)| {
                let (bytes, text) = if suffixed { (n * 1024, format!("{n}k")) } else { (n, n.to_string()) };
                Written { json: json!(bytes), keyval: vec![(String::new(), text)] }
            })
            .boxed(),
        List(choices) => prop::collection::vec(prop::sample::select(choices), 1..4)
            .prop_map(|items| Written {
                json: Value::Array(items.iter().map(|item| json!({"str": item})).collect()),
                keyval: items.iter().map(|item| (String::new(), escaped(item))).collect(),
            })
            .boxed(),
        Address => arb_address(),
    }
}

/// One `netdev_add` argument object of a covered type and the equivalent `-netdev` text.
fn arb_parsing_netdev() -> impl Strategy<Value = (Value, String)> {
    let per_type: Vec<BoxedStrategy<(Value, String)>> = PARSING_TYPES
        .iter()
        .map(|&(kind, members)| {
            let chosen: Vec<BoxedStrategy<Option<(&'static str, Written)>>> = members
                .iter()
                .map(|&(name, value, required)| {
                    if required {
                        arb_written(value).prop_map(move |w| Some((name, w))).boxed()
                    } else {
                        proptest::option::of(arb_written(value).prop_map(move |w| (name, w))).boxed()
                    }
                })
                .collect();
            (arb_id(), chosen)
                .prop_map(move |(id, chosen)| {
                    let mut args = json!({"id": id, "type": kind});
                    let mut text = format!("{kind},id={id}");
                    for (name, written) in chosen.into_iter().flatten() {
                        args[name] = written.json;
                        for (suffix, value) in written.keyval {
                            text.push_str(&format!(",{name}{suffix}={value}"));
                        }
                    }
                    (args, text)
                })
                .boxed()
        })
        .collect();
    proptest::strategy::Union::new(per_type)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Inputs built from the schema parse in both forms to the same netdev, which validates
    /// without panicking and survives `to_json` unchanged.
    #[test]
    fn schema_built_netdevs_parse_and_both_forms_agree((args, text) in arb_parsing_netdev()) {
        let from_json = Netdev::from_json(&args).map_err(|e| TestCaseError::fail(format!("{args}: {e}")))?;
        let from_kv = Netdev::from_keyval(&text).map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        prop_assert_eq!(&from_json, &from_kv, "{} vs {:?}", args, text);
        prop_assert_eq!(Some(from_json.kind()), args["type"].as_str());
        prop_assert_eq!(Some(from_json.id.as_str()), args["id"].as_str());
        check_parsed(&from_json)?;
        // Validation is a pure function of the input: asking twice gives the same answer.
        prop_assert_eq!(from_json.validate().map_err(|e| e.to_string()), from_kv.validate().map_err(|e| e.to_string()));
    }

    /// The same inputs as `netdev_add` commands on a QMP stream, cut at arbitrary points: each
    /// command decodes whole and in order, and its arguments parse to the netdev built directly.
    #[test]
    fn schema_built_netdev_adds_survive_a_chunked_qmp_stream(
        netdevs in prop::collection::vec(arb_parsing_netdev(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        use crate::qmp::codec::{Decoder, Inbound, encode};
        let commands: Vec<Value> = netdevs
            .iter()
            .enumerate()
            .map(|(n, (args, _))| json!({"execute": "netdev_add", "arguments": args, "id": n}))
            .collect();
        let stream: Vec<u8> = commands.iter().flat_map(encode).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len())).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut decoder = Decoder::new(1 << 16);
        let mut buf = bytes::BytesMut::new();
        let mut decoded = Vec::new();
        let mut start = 0;
        for end in cuts {
            buf.extend_from_slice(&stream[start..end]);
            start = end;
            while let Some(inbound) = decoder.decode(&mut buf) {
                decoded.push(inbound);
            }
        }
        let expected: Vec<Inbound> = commands.iter().cloned().map(Inbound::Value).collect();
        prop_assert_eq!(&decoded, &expected);
        for ((args, text), command) in netdevs.iter().zip(&commands) {
            let from_stream = Netdev::from_json(&command["arguments"]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(Netdev::from_json(args).ok(), Some(from_stream.clone()));
            prop_assert_eq!(Netdev::from_keyval(text).ok(), Some(from_stream));
        }
    }
}
