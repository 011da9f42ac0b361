//! Schema, keyval and validation tests for every netdev type, against QEMU's error texts
//! (reference: `qemu-netdev.md` §2.4, §3.4, §5, §7).
//!
//! Conventions: every error text is compared verbatim with `to_string()`, which is what `netdev_add`
//! answers as the `desc` of a `GenericError` (the only class `netdev_add` uses). Schema errors must
//! come from parsing ([`NetdevError::Qapi`], [`NetdevError::Keyval`] or the id check), rule errors
//! from [`Netdev::validate`] ([`NetdevError::Invalid`]); the helpers below check that, so a message
//! produced at the wrong stage fails too.

use std::fmt::Debug;
use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::af_xdp::AfXdpMode;
use super::sockaddr::{InetSocketAddress, SocketAddress, UnixSocketAddress};
use super::user::AddressPlan;
use super::*;
use crate::qapi::{QapiString, Size};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Every `NetClientDriver` value of QEMU's schema (head).
static ALL_TYPES: [&str; 19] = [
    "none",
    "nic",
    "user",
    "tap",
    "l2tpv3",
    "socket",
    "stream",
    "dgram",
    "vde",
    "bridge",
    "hubport",
    "netmap",
    "vhost-user",
    "vhost-vdpa",
    "af-xdp",
    "passt",
    "vmnet-host",
    "vmnet-shared",
    "vmnet-bridged",
];

/// `netdev_add` arguments: `{"id": "n0", "type": kind, ...members}`.
fn nd(kind: &str, members: Value) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("id".into(), json!("n0"));
    object.insert("type".into(), json!(kind));
    if let Value::Object(members) = members {
        object.extend(members);
    }
    Value::Object(object)
}

fn parse_json(args: &Value) -> Netdev {
    Netdev::from_json(args).unwrap_or_else(|e| panic!("{args} was refused: {e}"))
}

fn parse_kv(text: &str) -> Netdev {
    Netdev::from_keyval(text).unwrap_or_else(|e| panic!("{text:?} was refused: {e}"))
}

/// Parses and validates; panics on any error.
fn valid(args: &Value) -> Netdev {
    let netdev = parse_json(args);
    if let Err(e) = netdev.validate() {
        panic!("{args} failed validation: {e}");
    }
    netdev
}

/// The text of a parse (schema) error, or a description of what went wrong instead.
fn json_err(args: Value) -> String {
    match Netdev::from_json(&args) {
        Ok(netdev) => format!("<parsed: {netdev:?}>"),
        Err(e @ (NetdevError::Qapi(_) | NetdevError::MalformedId { .. })) => e.to_string(),
        Err(e) => format!("<not a schema error: {e:?}>"),
    }
}

/// The text of a keyval parse error (syntax or schema).
fn kv_err(text: &str) -> String {
    match Netdev::from_keyval(text) {
        Ok(netdev) => format!("<parsed: {netdev:?}>"),
        Err(e @ (NetdevError::Qapi(_) | NetdevError::Keyval(_) | NetdevError::MalformedId { .. })) => e.to_string(),
        Err(e) => format!("<not a schema error: {e:?}>"),
    }
}

/// The text of a validation error of arguments that parse; the error must carry the netdev's id.
fn invalid(args: Value) -> String {
    let netdev = match Netdev::from_json(&args) {
        Ok(netdev) => netdev,
        Err(e) => return format!("<parse error: {e}>"),
    };
    match netdev.validate() {
        Ok(()) => "<valid>".to_owned(),
        Err(NetdevError::Invalid { id, reason }) if id == netdev.id => reason,
        Err(e) => format!("<not a validation error of '{}': {e:?}>", netdev.id),
    }
}

/// [`invalid`] for keyval input.
fn kv_invalid(text: &str) -> String {
    match Netdev::from_keyval(text) {
        Ok(netdev) => match netdev.validate() {
            Ok(()) => "<valid>".to_owned(),
            Err(NetdevError::Invalid { reason, .. }) => reason,
            Err(e) => format!("<not a validation error: {e:?}>"),
        },
        Err(e) => format!("<parse error: {e}>"),
    }
}

/// Runs `f` on every row and reports all mismatches at once.
#[track_caller]
fn check<I: Clone + Debug>(f: impl Fn(I) -> String, rows: &[(I, &str)]) {
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|(input, want)| {
            let got = f(input.clone());
            (got != *want).then(|| format!("  {input:?}\n     got: {got}\n    want: {want}"))
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

fn inet(host: &str, port: &str) -> Value {
    json!({"type": "inet", "host": host, "port": port})
}

fn unix(path: &str) -> Value {
    json!({"type": "unix", "path": path})
}

fn fd(name: &str) -> Value {
    json!({"type": "fd", "str": name})
}

fn vsock() -> Value {
    json!({"type": "vsock", "cid": "2", "port": "1234"})
}

fn fat(items: &[&str]) -> Option<Vec<QapiString>> {
    Some(items.iter().map(|s| QapiString { str: (*s).to_owned() }).collect())
}

// ---------------------------------------------------------------------------------------------
// Valid forms: JSON and keyval agree, for every type
// ---------------------------------------------------------------------------------------------

/// One valid `netdev_add` per row and the equivalent `-netdev` string; together they use every
/// member kind (strings, booleans, each integer width, sizes, enums, lists, socket addresses).
fn valid_forms() -> Vec<(Value, &'static str)> {
    vec![
        (json!({"id": "n0", "type": "none"}), "none,id=n0"),
        (
            json!({"id": "c0", "type": "nic", "netdev": "h0", "macaddr": "52:54:00:12:34:56", "model": "virtio-net-pci", "addr": "0x4", "vectors": 4}),
            "nic,id=c0,netdev=h0,macaddr=52:54:00:12:34:56,model=virtio-net-pci,addr=0x4,vectors=4",
        ),
        (json!({"id": "u0", "type": "user"}), "user,id=u0"),
        (
            json!({
                "id": "u1", "type": "user", "hostname": "guest", "restrict": false, "ipv4": true, "ipv6": true,
                "net": "192.168.76.0/24", "host": "192.168.76.2", "dhcpstart": "192.168.76.100", "dns": "192.168.76.3",
                "dnssearch": [{"str": "example.org"}, {"str": "example.com"}], "domainname": "example.org",
                "ipv6-prefix": "fd00::", "ipv6-prefixlen": 64, "tftp": "/srv/tftp", "bootfile": "pxelinux.0",
                "hostfwd": [{"str": "tcp::2222-:22"}, {"str": "udp:127.0.0.1:5353-:53"}],
                "guestfwd": [{"str": "tcp:10.0.2.100:1234-cmd:nc a,b"}], "tftp-server-name": "boot"
            }),
            "user,id=u1,hostname=guest,restrict=off,ipv4=on,ipv6=on,net=192.168.76.0/24,host=192.168.76.2,\
             dhcpstart=192.168.76.100,dns=192.168.76.3,dnssearch=example.org,dnssearch=example.com,\
             domainname=example.org,ipv6-prefix=fd00::,ipv6-prefixlen=64,tftp=/srv/tftp,bootfile=pxelinux.0,\
             hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,guestfwd=tcp:10.0.2.100:1234-cmd:nc a,,b,\
             tftp-server-name=boot",
        ),
        (
            json!({"id": "t0", "type": "tap", "ifname": "x", "vnet_hdr": true, "script": "no", "downscript": "no", "sndbuf": 2048, "queues": 2, "poll-us": 50, "vhost": false}),
            "tap,id=t0,ifname=x,vnet_hdr=on,script=no,downscript=no,sndbuf=2k,queues=2,poll-us=50,vhost=off",
        ),
        (
            json!({"id": "t1", "type": "tap", "fds": "3:4", "vhost": true, "vhostfds": "5:6", "vhostforce": true}),
            "tap,id=t1,fds=3:4,vhost=on,vhostfds=5:6,vhostforce=on",
        ),
        (
            json!({
                "id": "l0", "type": "l2tpv3", "src": "127.0.0.1", "dst": "127.0.0.2", "udp": true, "srcport": "1701",
                "dstport": "1702", "ipv6": false, "txsession": 17, "rxsession": 18, "txcookie": 81_985_529_216_486_895_u64,
                "rxcookie": 1, "cookie64": true, "counter": true, "pincounter": false, "offset": 2
            }),
            "l2tpv3,id=l0,src=127.0.0.1,dst=127.0.0.2,udp=on,srcport=1701,dstport=1702,ipv6=off,txsession=17,\
             rxsession=0x12,txcookie=0x0123456789abcdef,rxcookie=1,cookie64=on,counter=on,pincounter=off,offset=2",
        ),
        (json!({"id": "s0", "type": "socket", "listen": ":1234"}), "socket,id=s0,listen=:1234"),
        (
            json!({"id": "s1", "type": "socket", "mcast": "230.0.0.1:1234", "localaddr": "127.0.0.1"}),
            "socket,id=s1,mcast=230.0.0.1:1234,localaddr=127.0.0.1",
        ),
        (
            json!({"id": "st0", "type": "stream", "server": true, "addr": {"type": "inet", "host": "127.0.0.1", "port": "1234", "ipv4": true, "to": 1240, "keep-alive": true}}),
            "stream,id=st0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=1234,addr.ipv4=on,addr.to=1240,addr.keep-alive=on",
        ),
        (
            json!({"id": "st1", "type": "stream", "addr": {"type": "unix", "path": "/tmp/x", "abstract": true, "tight": false}, "reconnect-ms": 500}),
            "stream,id=st1,addr.type=unix,addr.path=/tmp/x,addr.abstract=on,addr.tight=off,reconnect-ms=500",
        ),
        (
            json!({"id": "st2", "type": "stream", "addr": {"type": "fd", "str": "sock0"}}),
            "stream,id=st2,addr.type=fd,addr.str=sock0",
        ),
        (
            json!({"id": "d0", "type": "dgram", "local": inet("127.0.0.1", "1"), "remote": inet("127.0.0.1", "2")}),
            "dgram,id=d0,local.type=inet,local.host=127.0.0.1,local.port=1,remote.type=inet,remote.host=127.0.0.1,remote.port=2",
        ),
        (
            json!({"id": "d1", "type": "dgram", "remote": inet("224.0.0.1", "1234")}),
            "dgram,id=d1,remote.type=inet,remote.host=224.0.0.1,remote.port=1234",
        ),
        (
            json!({"id": "v0", "type": "vde", "sock": "/run/vde.ctl", "port": 2, "group": "kvm", "mode": 432}),
            "vde,id=v0,sock=/run/vde.ctl,port=2,group=kvm,mode=0660",
        ),
        (
            json!({"id": "b0", "type": "bridge", "br": "br1", "helper": "/usr/lib/qemu/qemu-bridge-helper"}),
            "bridge,id=b0,br=br1,helper=/usr/lib/qemu/qemu-bridge-helper",
        ),
        (json!({"id": "h0", "type": "hubport", "hubid": -1, "netdev": "t0"}), "hubport,id=h0,hubid=-1,netdev=t0"),
        (
            json!({"id": "nm0", "type": "netmap", "ifname": "vale0:1", "devname": "/dev/netmap"}),
            "netmap,id=nm0,ifname=vale0:1,devname=/dev/netmap",
        ),
        (
            json!({"id": "vu0", "type": "vhost-user", "chardev": "chr0", "vhostforce": true, "queues": 4}),
            "vhost-user,id=vu0,chardev=chr0,vhostforce=on,queues=4",
        ),
        (
            json!({"id": "vd0", "type": "vhost-vdpa", "vhostdev": "/dev/vhost-vdpa-0", "queues": 2, "x-svq": true}),
            "vhost-vdpa,id=vd0,vhostdev=/dev/vhost-vdpa-0,queues=2,x-svq=on",
        ),
        (
            json!({"id": "x0", "type": "af-xdp", "ifname": "eth0", "mode": "skb", "force-copy": true, "queues": 2, "start-queue": 1, "inhibit": true, "sock-fds": "3:4"}),
            "af-xdp,id=x0,ifname=eth0,mode=skb,force-copy=on,queues=2,start-queue=1,inhibit=on,sock-fds=3:4",
        ),
        (
            json!({"id": "x1", "type": "af-xdp", "ifname": "eth1", "mode": "native", "inhibit": true, "map-path": "/sys/fs/bpf/xsks", "map-start-index": 3}),
            "af-xdp,id=x1,ifname=eth1,mode=native,inhibit=on,map-path=/sys/fs/bpf/xsks,map-start-index=3",
        ),
        (
            json!({
                "id": "p0", "type": "passt", "path": "/usr/bin/passt", "quiet": false, "vhost-user": false, "mtu": 1500,
                "address": "10.0.2.15", "netmask": "24", "mac": "9a:55:9a:55:9a:55", "gateway": "10.0.2.2",
                "search": [{"str": "example.org"}], "tcp": true, "udp": false, "ipv4": true,
                "tcp-ports": [{"str": "2222:22"}, {"str": "8080"}], "param": [{"str": "--no-dhcp-dns"}]
            }),
            "passt,id=p0,path=/usr/bin/passt,quiet=off,vhost-user=off,mtu=1500,address=10.0.2.15,netmask=24,\
             mac=9a:55:9a:55:9a:55,gateway=10.0.2.2,search=example.org,tcp=on,udp=off,ipv4=on,\
             tcp-ports=2222:22,tcp-ports=8080,param=--no-dhcp-dns",
        ),
        (
            json!({"id": "vh0", "type": "vmnet-host", "start-address": "192.168.2.1", "end-address": "192.168.2.254", "subnet-mask": "255.255.255.0", "isolated": true, "net-uuid": "f8f2c6a2-56d2-4e6c-9a9a-2f1c8b6f4b3e"}),
            "vmnet-host,id=vh0,start-address=192.168.2.1,end-address=192.168.2.254,subnet-mask=255.255.255.0,isolated=on,net-uuid=f8f2c6a2-56d2-4e6c-9a9a-2f1c8b6f4b3e",
        ),
        (
            json!({"id": "vs0", "type": "vmnet-shared", "isolated": false, "nat66-prefix": "fd00:1::"}),
            "vmnet-shared,id=vs0,isolated=off,nat66-prefix=fd00:1::",
        ),
        (
            json!({"id": "vb0", "type": "vmnet-bridged", "ifname": "en0", "isolated": true}),
            "vmnet-bridged,id=vb0,ifname=en0,isolated=on",
        ),
    ]
}

#[test]
fn every_type_has_a_valid_json_and_keyval_form() {
    let mut seen = std::collections::BTreeSet::new();
    for (args, text) in valid_forms() {
        let from_json = valid(&args);
        let from_kv = parse_kv(text);
        assert_eq!(from_json, from_kv, "JSON and keyval forms differ:\n  {args}\n  {text}");
        assert_eq!(from_json.id, args["id"].as_str().unwrap_or_default());
        assert_eq!(from_json.kind(), args["type"].as_str().unwrap_or_default());
        seen.insert(from_json.kind());
    }
    let missing: Vec<_> = ALL_TYPES.iter().filter(|kind| !seen.contains(*kind)).collect();
    assert!(missing.is_empty(), "no valid form for {missing:?}");
}

#[test]
fn valid_forms_parse_to_the_expected_values() {
    let tap = parse_kv("tap,id=t0,ifname=x,vnet_hdr=on,sndbuf=2k,queues=2");
    let NetdevOptions::Tap(tap) = tap.options else { panic!("not a tap") };
    assert_eq!((tap.ifname.as_deref(), tap.vnet_hdr, tap.sndbuf, tap.queues), (Some("x"), Some(true), Some(Size(2048)), Some(2)));
    assert_eq!(tap.fd, None);

    let NetdevOptions::Stream(stream) = parse_kv("stream,id=s,addr.type=unix,addr.path=/tmp/x").options else {
        panic!("not a stream")
    };
    assert_eq!(stream.addr, SocketAddress::Unix(UnixSocketAddress { path: "/tmp/x".into(), abstract_: None, tight: None }));
    assert_eq!(stream.server, None);

    let NetdevOptions::Stream(stream) =
        parse_json(&nd("stream", json!({"addr": inet("localhost", "http"), "server": false}))).options
    else {
        panic!("not a stream")
    };
    let SocketAddress::Inet(InetSocketAddress { host, port, to, .. }) = stream.addr else { panic!("not inet") };
    assert_eq!((host.as_str(), port.as_str(), to), ("localhost", "http", None));

    let NetdevOptions::User(user) = parse_kv("user,id=u,hostfwd=tcp::1-:22,hostfwd=udp::2-:53,dnssearch=a.org").options else {
        panic!("not user")
    };
    assert_eq!(user.hostfwd, fat(&["tcp::1-:22", "udp::2-:53"]));
    assert_eq!(user.dnssearch, fat(&["a.org"]));

    let NetdevOptions::AfXdp(xdp) = parse_kv("af-xdp,id=x,ifname=eth0,mode=native").options else { panic!("not af-xdp") };
    assert_eq!(xdp.mode, Some(AfXdpMode::Native));

    let NetdevOptions::Vde(vde) = parse_kv("vde,id=v,port=0x10,mode=0660").options else { panic!("not vde") };
    assert_eq!((vde.port, vde.mode), (Some(16), Some(0o660)));

    let NetdevOptions::L2tpv3(l2tp) = parse_json(&nd("l2tpv3", json!({"src": "a", "dst": "b", "txsession": 4_294_967_295_u32, "txcookie": u64::MAX}))).options
    else {
        panic!("not l2tpv3")
    };
    assert_eq!((l2tp.txsession, l2tp.txcookie, l2tp.rxsession), (u32::MAX, Some(u64::MAX), None));
}

// ---------------------------------------------------------------------------------------------
// to_json round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn to_json_round_trips() {
    for (args, text) in valid_forms() {
        for netdev in [parse_json(&args), parse_kv(text)] {
            let again = Netdev::from_json(&netdev.to_json());
            assert_eq!(again.as_ref(), Ok(&netdev), "round trip of {args} via {}", netdev.to_json());
        }
    }
}

#[test]
fn to_json_is_the_flat_union() {
    let stream = parse_kv("stream,id=s,server=on,addr.type=unix,addr.path=/tmp/x");
    assert_eq!(stream.to_json(), json!({"id": "s", "type": "stream", "server": true, "addr": {"type": "unix", "path": "/tmp/x"}}));

    let stream = parse_kv("stream,id=s,addr.type=inet,addr.host=::1,addr.port=80,addr.ipv6=on,reconnect-ms=100");
    assert_eq!(
        stream.to_json(),
        json!({"id": "s", "type": "stream", "reconnect-ms": 100, "addr": {"type": "inet", "host": "::1", "port": "80", "ipv6": true}})
    );

    let dgram = parse_json(&nd("dgram", json!({"local": fd("3")})));
    assert_eq!(dgram.to_json(), json!({"id": "n0", "type": "dgram", "local": {"type": "fd", "str": "3"}}));

    let user = parse_kv("user,id=u,hostfwd=tcp::1-:22,ipv6=off");
    assert_eq!(user.to_json(), json!({"id": "u", "type": "user", "ipv6": false, "hostfwd": [{"str": "tcp::1-:22"}]}));

    assert_eq!(parse_kv("none,id=n").to_json(), json!({"id": "n", "type": "none"}));
    assert_eq!(parse_kv("tap,id=t,vnet_hdr=off,sndbuf=1M").to_json(), json!({"id": "t", "type": "tap", "vnet_hdr": false, "sndbuf": 1_048_576}));
    assert_eq!(parse_kv("hubport,id=h,hubid=-7").to_json(), json!({"id": "h", "type": "hubport", "hubid": -7}));
}

// ---------------------------------------------------------------------------------------------
// Base members
// ---------------------------------------------------------------------------------------------

#[test]
fn base_member_errors() {
    check(
        json_err,
        &[
            (json!({"type": "hubport", "hubid": 0}), "Parameter 'id' is missing"),
            (json!({}), "Parameter 'id' is missing"),
            (json!({"id": "h"}), "Parameter 'type' is missing"),
            (json!({"id": 5, "type": "hubport", "hubid": 0}), "Invalid parameter type for 'id', expected: string"),
            (json!({"id": null, "type": "hubport", "hubid": 0}), "Invalid parameter type for 'id', expected: string"),
            (json!({"id": "", "type": "hubport", "hubid": 0}), "Parameter 'id' expects an identifier"),
            (json!({"id": "1bad", "type": "hubport", "hubid": 0}), "Parameter 'id' expects an identifier"),
            (json!({"id": "a/b", "type": "hubport", "hubid": 0}), "Parameter 'id' expects an identifier"),
            (json!({"id": "a b", "type": "none"}), "Parameter 'id' expects an identifier"),
            (json!({"id": "h", "type": "foo"}), "Parameter 'type' does not accept value 'foo'"),
            (json!({"id": "h", "type": "Tap"}), "Parameter 'type' does not accept value 'Tap'"),
            (json!({"id": "h", "type": 5}), "Invalid parameter type for 'type', expected: string"),
            (json!({"id": "h", "type": ["tap"]}), "Invalid parameter type for 'type', expected: string"),
            // QEMU's visiting order: `id`, the `type` tag, the variant's members in schema order,
            // then leftover keys; the id check runs on the complete value.
            (json!({"type": "foo"}), "Parameter 'id' is missing"),
            (json!({"id": "1bad", "type": "foo"}), "Parameter 'type' does not accept value 'foo'"),
            (json!({"id": "1bad", "type": "hubport"}), "Parameter 'hubid' is missing"),
            (json!({"id": "h", "type": "hubport", "bogus": 1}), "Parameter 'hubid' is missing"),
            (json!({"id": "h", "type": "hubport", "hubid": 0, "bogus": 1}), "Parameter 'bogus' is unexpected"),
            (json!({"id": "1bad", "type": "hubport", "hubid": 0, "x": 1}), "Parameter 'x' is unexpected"),
        ],
    );
    // The class of error: schema errors come from the QAPI layer, the id check is its own variant.
    assert!(matches!(Netdev::from_json(&json!({"id": "h"})), Err(NetdevError::Qapi(QapiError::Missing(name))) if name == "type"));
    assert!(matches!(
        Netdev::from_json(&json!({"id": "1bad", "type": "none"})),
        Err(NetdevError::MalformedId { id }) if id == "1bad"
    ));
    // Well-formed ids.
    for id in ["a", "n0", "net-0.x_y", "Z9"] {
        assert_eq!(valid(&json!({"id": id, "type": "none"})).id, id);
    }
}

#[test]
fn base_member_errors_keyval() {
    check(
        kv_err,
        &[
            ("hubport,hubid=0", "Parameter 'id' is missing"),
            ("id=h", "Parameter 'type' is missing"),
            ("", "Parameter 'id' is missing"),
            ("hubport,id=,hubid=0", "Parameter 'id' expects an identifier"),
            ("hubport,id=1bad,hubid=0", "Parameter 'id' expects an identifier"),
            ("hubport,id=a/b,hubid=0", "Parameter 'id' expects an identifier"),
            ("foo,id=h", "Parameter 'type' does not accept value 'foo'"),
            ("id=h,type=foo", "Parameter 'type' does not accept value 'foo'"),
            ("hubport,id=h,hubid=0,bogus=1", "Parameter 'bogus' is unexpected"),
            ("hubport,id.x=h,hubid=0", "Invalid parameter type for 'id', expected: string"),
        ],
    );
    // The type may also be given as a key.
    assert_eq!(parse_kv("id=h,type=hubport,hubid=1"), parse_kv("hubport,id=h,hubid=1"));
}

// ---------------------------------------------------------------------------------------------
// Schema errors, type by type
// ---------------------------------------------------------------------------------------------

#[test]
fn none_and_nic_schema() {
    check(
        json_err,
        &[
            (nd("none", json!({"x": 1})), "Parameter 'x' is unexpected"),
            (nd("none", json!({"hubid": 0})), "Parameter 'hubid' is unexpected"),
            (nd("nic", json!({"vectors": -1})), "Parameter 'vectors' expects uint32_t"),
            (nd("nic", json!({"vectors": 4_294_967_296_u64})), "Parameter 'vectors' expects uint32_t"),
            (nd("nic", json!({"vectors": "4"})), "Parameter 'vectors' expects uint64"),
            (nd("nic", json!({"macaddr": 1})), "Invalid parameter type for 'macaddr', expected: string"),
            (nd("nic", json!({"mac": "52:54:00:12:34:56"})), "Parameter 'mac' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("none,id=n,x=1", "Parameter 'x' is unexpected"),
            ("nic,id=c,vectors=x", "Parameter 'vectors' expects integer"),
            ("nic,id=c,vectors=4294967296", "Parameter 'vectors' expects uint32_t"),
        ],
    );
    check(invalid, &[(nd("nic", json!({"macaddr": "zz"})), "Parameter 'macaddr' expects a valid MAC address, got 'zz'")]);
}

#[test]
fn user_schema() {
    check(
        json_err,
        &[
            (nd("user", json!({"restrict": "yes"})), "Invalid parameter type for 'restrict', expected: boolean"),
            (nd("user", json!({"ipv6": 1})), "Invalid parameter type for 'ipv6', expected: boolean"),
            (nd("user", json!({"net": ["10.0.0.0/8"]})), "Invalid parameter type for 'net', expected: string"),
            (nd("user", json!({"ipv6-prefixlen": "64"})), "Invalid parameter type for 'ipv6-prefixlen', expected: integer"),
            (nd("user", json!({"dnssearch": "example.org"})), "Invalid parameter type for 'dnssearch', expected: array"),
            (nd("user", json!({"dnssearch": ["example.org"]})), "Invalid parameter type for 'dnssearch[0]', expected: object"),
            (
                nd("user", json!({"dnssearch": [{"str": "a.org"}, "b.org"]})),
                "Invalid parameter type for 'dnssearch[1]', expected: object",
            ),
            (nd("user", json!({"dnssearch": [{}]})), "Parameter 'dnssearch[0].str' is missing"),
            (nd("user", json!({"dnssearch": [{"str": 1}]})), "Invalid parameter type for 'dnssearch[0].str', expected: string"),
            (nd("user", json!({"hostfwd": "tcp::2222-:22"})), "Invalid parameter type for 'hostfwd', expected: array"),
            (nd("user", json!({"hostfwd": [{"str": "tcp::2222-:22", "x": 1}]})), "Parameter 'hostfwd[0].x' is unexpected"),
            (nd("user", json!({"guestfwd": {"str": "x"}})), "Invalid parameter type for 'guestfwd', expected: array"),
            // `ipv6-net` exists only on the command line (rewritten by net_client_init).
            (nd("user", json!({"ipv6-net": "fd00::/64"})), "Parameter 'ipv6-net' is unexpected"),
            (nd("user", json!({"vhostname": "guest"})), "Parameter 'vhostname' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("user,id=u,restrict=maybe", "Parameter 'restrict' expects 'on' or 'off'"),
            ("user,id=u,ipv6-prefixlen=sixty", "Parameter 'ipv6-prefixlen' expects integer"),
            ("user,id=u,dnssearch.0.x=a", "Parameter 'dnssearch[0].str' is missing"),
            ("user,id=u,hostfwd.0.str=a,hostfwd.0.x=b", "Parameter 'hostfwd[0].x' is unexpected"),
        ],
    );
}

#[test]
fn tap_and_bridge_schema() {
    check(
        json_err,
        &[
            (nd("tap", json!({"vnet_hdr": "on"})), "Invalid parameter type for 'vnet_hdr', expected: boolean"),
            (nd("tap", json!({"vnet-hdr": true})), "Parameter 'vnet-hdr' is unexpected"),
            (nd("tap", json!({"ifname": 0})), "Invalid parameter type for 'ifname', expected: string"),
            (nd("tap", json!({"queues": 4_294_967_296_u64})), "Parameter 'queues' expects uint32_t"),
            (nd("tap", json!({"queues": -1})), "Parameter 'queues' expects uint32_t"),
            (nd("tap", json!({"queues": "2"})), "Parameter 'queues' expects uint64"),
            (nd("tap", json!({"poll-us": 1.5})), "Parameter 'poll-us' expects uint64"),
            // A size is a uint64 in JSON: no suffixes.
            (nd("tap", json!({"sndbuf": "1k"})), "Parameter 'sndbuf' expects uint64"),
            (nd("tap", json!({"poll_us": 1})), "Parameter 'poll_us' is unexpected"),
            (nd("bridge", json!({"br": true})), "Invalid parameter type for 'br', expected: string"),
            (nd("bridge", json!({"ifname": "tap0"})), "Parameter 'ifname' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("tap,id=t,vnet_hdr=maybe", "Parameter 'vnet_hdr' expects 'on' or 'off'"),
            ("tap,id=t,vnet_hdr=1", "Parameter 'vnet_hdr' expects 'on' or 'off'"),
            ("tap,id=t,queues=two", "Parameter 'queues' expects integer"),
            ("tap,id=t,queues=4294967296", "Parameter 'queues' expects uint32_t"),
            ("tap,id=t,sndbuf=1q", "Parameter 'sndbuf' expects size"),
            ("bridge,id=b,br.x=1", "Invalid parameter type for 'br', expected: string"),
        ],
    );
    // A JSON size is a plain count (QEMU also takes negative numbers modulo 2^64).
    assert_eq!(valid(&nd("tap", json!({"sndbuf": -1}))).to_json()["sndbuf"], json!(u64::MAX));
}

#[test]
fn l2tpv3_schema() {
    let base = |extra: Value| {
        let mut args = nd("l2tpv3", json!({"src": "127.0.0.1", "dst": "127.0.0.2", "txsession": 1}));
        if let (Value::Object(args), Value::Object(extra)) = (&mut args, extra) {
            args.extend(extra);
        }
        args
    };
    check(
        json_err,
        &[
            (nd("l2tpv3", json!({"dst": "b", "txsession": 1})), "Parameter 'src' is missing"),
            (nd("l2tpv3", json!({"src": "a", "txsession": 1})), "Parameter 'dst' is missing"),
            (nd("l2tpv3", json!({"src": "a", "dst": "b"})), "Parameter 'txsession' is missing"),
            (base(json!({"txsession": "1"})), "Parameter 'txsession' expects uint64"),
            (base(json!({"txsession": 4_294_967_296_u64})), "Parameter 'txsession' expects uint32_t"),
            (base(json!({"offset": -1})), "Parameter 'offset' expects uint32_t"),
            (base(json!({"txcookie": 1.0})), "Parameter 'txcookie' expects uint64"),
            (base(json!({"srcport": 1701})), "Invalid parameter type for 'srcport', expected: string"),
            (base(json!({"udp": "on"})), "Invalid parameter type for 'udp', expected: boolean"),
            (base(json!({"cookie": 1})), "Parameter 'cookie' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("l2tpv3,id=l,src=a,dst=b", "Parameter 'txsession' is missing"),
            ("l2tpv3,id=l,src=a,dst=b,txsession=x", "Parameter 'txsession' expects integer"),
            ("l2tpv3,id=l,src=a,dst=b,txsession=4294967296", "Parameter 'txsession' expects uint32_t"),
            ("l2tpv3,id=l,src=a,dst=b,txsession=1,txcookie=18446744073709551616", "Parameter 'txcookie' expects integer"),
        ],
    );
}

#[test]
fn socket_stream_dgram_schema() {
    check(
        json_err,
        &[
            (nd("socket", json!({"listen": 1234})), "Invalid parameter type for 'listen', expected: string"),
            (nd("socket", json!({"host": "127.0.0.1"})), "Parameter 'host' is unexpected"),
            // stream: the SocketAddress and its nested paths.
            (nd("stream", json!({})), "Parameter 'addr' is missing"),
            (nd("stream", json!({"server": true})), "Parameter 'addr' is missing"),
            (nd("stream", json!({"addr": "unix:/tmp/x"})), "Invalid parameter type for 'addr', expected: object"),
            (nd("stream", json!({"addr": ["inet"]})), "Invalid parameter type for 'addr', expected: object"),
            (nd("stream", json!({"addr": {}})), "Parameter 'addr.type' is missing"),
            (nd("stream", json!({"addr": {"type": 1}})), "Invalid parameter type for 'addr.type', expected: string"),
            // Bad enum values and out-of-range integers name the member alone (qapi-visit-core.c).
            (nd("stream", json!({"addr": {"type": "tcp", "host": "h", "port": "1"}})), "Parameter 'type' does not accept value 'tcp'"),
            (nd("stream", json!({"addr": {"type": "inet", "host": "127.0.0.1"}})), "Parameter 'addr.port' is missing"),
            (nd("stream", json!({"addr": {"type": "inet", "port": "1"}})), "Parameter 'addr.host' is missing"),
            (nd("stream", json!({"addr": {"type": "inet", "host": "h", "port": 1}})), "Invalid parameter type for 'addr.port', expected: string"),
            (nd("stream", json!({"addr": {"type": "inet", "host": "h", "port": "1", "to": 70000}})), "Parameter 'to' expects uint16_t"),
            (nd("stream", json!({"addr": {"type": "inet", "host": "h", "port": "1", "to": "2"}})), "Parameter 'addr.to' expects uint64"),
            (nd("stream", json!({"addr": {"type": "inet", "host": "h", "port": "1", "bogus": 1}})), "Parameter 'addr.bogus' is unexpected"),
            (nd("stream", json!({"addr": {"type": "unix"}})), "Parameter 'addr.path' is missing"),
            (nd("stream", json!({"addr": {"type": "unix", "path": "/x", "host": "h"}})), "Parameter 'addr.host' is unexpected"),
            (nd("stream", json!({"addr": {"type": "fd"}})), "Parameter 'addr.str' is missing"),
            (nd("stream", json!({"addr": {"type": "vsock", "cid": 2, "port": "1"}})), "Invalid parameter type for 'addr.cid', expected: string"),
            (nd("stream", json!({"addr": unix("/x"), "server": "yes"})), "Invalid parameter type for 'server', expected: boolean"),
            (nd("stream", json!({"addr": unix("/x"), "reconnect": -1})), "Parameter 'reconnect' expects uint32_t"),
            (nd("stream", json!({"addr": unix("/x"), "reconnect-ms": "10"})), "Invalid parameter type for 'reconnect-ms', expected: integer"),
            (nd("stream", json!({"addr": unix("/x"), "bogus": 1})), "Parameter 'bogus' is unexpected"),
            // dgram: nested paths in `local` / `remote`.
            (nd("dgram", json!({"local": {"type": "inet", "host": "127.0.0.1"}})), "Parameter 'local.port' is missing"),
            (
                nd("dgram", json!({"remote": inet("224.0.0.1", "1234"), "local": {"type": "inet", "host": "127.0.0.1"}})),
                "Parameter 'local.port' is missing",
            ),
            (nd("dgram", json!({"remote": {"type": "udp"}})), "Parameter 'type' does not accept value 'udp'"),
            (nd("dgram", json!({"local": "127.0.0.1:1"})), "Invalid parameter type for 'local', expected: object"),
            (nd("dgram", json!({"local": unix("/a"), "remote": {"type": "unix"}})), "Parameter 'remote.path' is missing"),
            (nd("dgram", json!({"addr": unix("/a")})), "Parameter 'addr' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("stream,id=s", "Parameter 'addr' is missing"),
            ("stream,id=s,addr=unix", "Invalid parameter type for 'addr', expected: object"),
            ("stream,id=s,addr.type=tcp", "Parameter 'type' does not accept value 'tcp'"),
            ("stream,id=s,addr.type=inet,addr.host=127.0.0.1", "Parameter 'addr.port' is missing"),
            ("stream,id=s,addr.type=unix,addr.path=/x,server=yess", "Parameter 'server' expects 'on' or 'off'"),
            ("stream,id=s,addr.type=inet,addr.host=h,addr.port=1,addr.to=70000", "Parameter 'to' expects uint16_t"),
            ("dgram,id=d,local.type=inet,local.host=127.0.0.1", "Parameter 'local.port' is missing"),
            ("stream,id=s,addr.type=unix,addr.path=/x,addr=y", "Parameter 'addr' used inconsistently"),
        ],
    );
}

#[test]
fn vde_hubport_netmap_schema() {
    check(
        json_err,
        &[
            (nd("vde", json!({"port": 70000})), "Parameter 'port' expects uint16_t"),
            (nd("vde", json!({"port": -1})), "Parameter 'port' expects uint16_t"),
            (nd("vde", json!({"port": "2"})), "Parameter 'port' expects uint64"),
            (nd("vde", json!({"mode": 65536})), "Parameter 'mode' expects uint16_t"),
            (nd("vde", json!({"sock": 1})), "Invalid parameter type for 'sock', expected: string"),
            (nd("vde", json!({"switch": "/run/vde"})), "Parameter 'switch' is unexpected"),
            (nd("hubport", json!({})), "Parameter 'hubid' is missing"),
            (nd("hubport", json!({"netdev": "x"})), "Parameter 'hubid' is missing"),
            (nd("hubport", json!({"hubid": "x"})), "Invalid parameter type for 'hubid', expected: integer"),
            (nd("hubport", json!({"hubid": 1.5})), "Invalid parameter type for 'hubid', expected: integer"),
            (nd("hubport", json!({"hubid": true})), "Invalid parameter type for 'hubid', expected: integer"),
            (nd("hubport", json!({"hubid": 2_147_483_648_i64})), "Parameter 'hubid' expects int32_t"),
            (nd("hubport", json!({"hubid": -2_147_483_649_i64})), "Parameter 'hubid' expects int32_t"),
            (nd("hubport", json!({"hubid": u64::MAX})), "Invalid parameter type for 'hubid', expected: integer"),
            (nd("hubport", json!({"hubid": 0, "netdev": 1})), "Invalid parameter type for 'netdev', expected: string"),
            (nd("hubport", json!({"hubid": 0, "bogus": 1})), "Parameter 'bogus' is unexpected"),
            (nd("netmap", json!({})), "Parameter 'ifname' is missing"),
            (nd("netmap", json!({"ifname": "vale0:1", "devname": 5})), "Invalid parameter type for 'devname', expected: string"),
            (nd("netmap", json!({"ifname": "vale0:1", "dev": "x"})), "Parameter 'dev' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("vde,id=v,port=70000", "Parameter 'port' expects uint16_t"),
            ("vde,id=v,port=x", "Parameter 'port' expects integer"),
            ("hubport,id=h", "Parameter 'hubid' is missing"),
            ("hubport,id=h,hubid=x", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=1.5", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=2147483648", "Parameter 'hubid' expects int32_t"),
            ("hubport,id=h,hubid=99999999999999999999", "Parameter 'hubid' expects integer"),
            ("netmap,id=n", "Parameter 'ifname' is missing"),
        ],
    );
    // Any int32 is a hub, negative ones included.
    for hubid in [i32::MIN, -1, 0, i32::MAX] {
        let netdev = valid(&nd("hubport", json!({"hubid": hubid})));
        assert_eq!(netdev.options, NetdevOptions::Hubport(hubport::HubPortOptions { hubid, netdev: None }));
    }
}

#[test]
fn vhost_schema() {
    check(
        json_err,
        &[
            (nd("vhost-user", json!({})), "Parameter 'chardev' is missing"),
            (nd("vhost-user", json!({"queues": 2})), "Parameter 'chardev' is missing"),
            (nd("vhost-user", json!({"chardev": "c", "queues": "2"})), "Invalid parameter type for 'queues', expected: integer"),
            (nd("vhost-user", json!({"chardev": "c", "vhostforce": "on"})), "Invalid parameter type for 'vhostforce', expected: boolean"),
            (nd("vhost-user", json!({"chardev": "c", "reconnect": 1})), "Parameter 'reconnect' is unexpected"),
            (nd("vhost-vdpa", json!({"vhostdev": 0})), "Invalid parameter type for 'vhostdev', expected: string"),
            (nd("vhost-vdpa", json!({"vhostdev": "/dev/vhost-vdpa-0", "x-svq": "on"})), "Invalid parameter type for 'x-svq', expected: boolean"),
            (nd("vhost-vdpa", json!({"vhostdev": "/dev/vhost-vdpa-0", "svq": true})), "Parameter 'svq' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("vhost-user,id=v", "Parameter 'chardev' is missing"),
            ("vhost-user,id=v,chardev=c,queues=many", "Parameter 'queues' expects integer"),
            ("vhost-vdpa,id=v,x-svq=sure", "Parameter 'x-svq' expects 'on' or 'off'"),
        ],
    );
}

#[test]
fn af_xdp_passt_vmnet_schema() {
    check(
        json_err,
        &[
            (nd("af-xdp", json!({})), "Parameter 'ifname' is missing"),
            (nd("af-xdp", json!({"mode": "skb"})), "Parameter 'ifname' is missing"),
            (nd("af-xdp", json!({"ifname": "eth0", "mode": "turbo"})), "Parameter 'mode' does not accept value 'turbo'"),
            (nd("af-xdp", json!({"ifname": "eth0", "mode": "SKB"})), "Parameter 'mode' does not accept value 'SKB'"),
            (nd("af-xdp", json!({"ifname": "eth0", "mode": 1})), "Invalid parameter type for 'mode', expected: string"),
            (nd("af-xdp", json!({"ifname": "eth0", "mode": {"type": "skb"}})), "Invalid parameter type for 'mode', expected: string"),
            (nd("af-xdp", json!({"ifname": "eth0", "queues": "2"})), "Invalid parameter type for 'queues', expected: integer"),
            (nd("af-xdp", json!({"ifname": "eth0", "map-start-index": 2_147_483_648_i64})), "Parameter 'map-start-index' expects int32_t"),
            (nd("af-xdp", json!({"ifname": "eth0", "force_copy": true})), "Parameter 'force_copy' is unexpected"),
            (nd("passt", json!({"mtu": "1500"})), "Invalid parameter type for 'mtu', expected: integer"),
            (nd("passt", json!({"tcp-ports": "22"})), "Invalid parameter type for 'tcp-ports', expected: array"),
            (nd("passt", json!({"search": ["example.org"]})), "Invalid parameter type for 'search[0]', expected: object"),
            (nd("passt", json!({"quiet": "off"})), "Invalid parameter type for 'quiet', expected: boolean"),
            (nd("passt", json!({"no-tcp": true})), "Parameter 'no-tcp' is unexpected"),
            (nd("vmnet-host", json!({"isolated": "yes"})), "Invalid parameter type for 'isolated', expected: boolean"),
            (nd("vmnet-host", json!({"nat66-prefix": "fd00::"})), "Parameter 'nat66-prefix' is unexpected"),
            (nd("vmnet-shared", json!({"net-uuid": "x"})), "Parameter 'net-uuid' is unexpected"),
            (nd("vmnet-shared", json!({"start-address": 1})), "Invalid parameter type for 'start-address', expected: string"),
            (nd("vmnet-bridged", json!({})), "Parameter 'ifname' is missing"),
            (nd("vmnet-bridged", json!({"ifname": 0})), "Invalid parameter type for 'ifname', expected: string"),
            (nd("vmnet-bridged", json!({"ifname": "en0", "subnet-mask": "255.0.0.0"})), "Parameter 'subnet-mask' is unexpected"),
        ],
    );
    check(
        kv_err,
        &[
            ("af-xdp,id=x,mode=skb", "Parameter 'ifname' is missing"),
            ("af-xdp,id=x,ifname=eth0,mode=turbo", "Parameter 'mode' does not accept value 'turbo'"),
            ("af-xdp,id=x,ifname=eth0,map-start-index=2147483648", "Parameter 'map-start-index' expects int32_t"),
            ("passt,id=p,mtu=big", "Parameter 'mtu' expects integer"),
            ("vmnet-bridged,id=v", "Parameter 'ifname' is missing"),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Keyval specifics
// ---------------------------------------------------------------------------------------------

#[test]
fn keyval_syntax() {
    // `,,` is a literal comma in a value.
    let NetdevOptions::User(user) = parse_kv("user,id=u,guestfwd=tcp:10.0.2.100:1234-cmd:nc a,,b,,,,c,bootfile=x,,").options else {
        panic!("not user")
    };
    assert_eq!(user.guestfwd, fat(&["tcp:10.0.2.100:1234-cmd:nc a,b,,c"]));
    assert_eq!(user.bootfile.as_deref(), Some("x,"));

    // A value may contain `=`; a trailing comma is ignored.
    let NetdevOptions::Tap(tap) = parse_kv("tap,id=t,script=/bin/x=y,").options else { panic!("not tap") };
    assert_eq!(tap.script.as_deref(), Some("/bin/x=y"));

    // Dotted keys nest; numeric segments index lists.
    assert_eq!(
        parse_kv("stream,id=s,addr.type=unix,addr.path=/tmp/x"),
        parse_json(&json!({"id": "s", "type": "stream", "addr": {"type": "unix", "path": "/tmp/x"}}))
    );
    assert_eq!(
        parse_kv("user,id=u,dnssearch.0.str=a.org,dnssearch.1.str=b.org"),
        parse_kv("user,id=u,dnssearch=a.org,dnssearch=b.org")
    );
    assert_eq!(
        parse_kv("user,id=u,hostfwd.1.str=b,hostfwd.0.str=a"),
        parse_json(&nd("user", json!({"hostfwd": [{"str": "a"}, {"str": "b"}]}))).with_id("u")
    );

    // Repeated keys collect a list, in order.
    let NetdevOptions::User(user) = parse_kv("user,id=u,hostfwd=tcp::1-:22,hostfwd=udp::2-:53,hostfwd=::3-:80").options else {
        panic!("not user")
    };
    assert_eq!(user.hostfwd, fat(&["tcp::1-:22", "udp::2-:53", "::3-:80"]));

    // Booleans: on/off, yes/no (and QemuOpts' true/false, y/n).
    for (text, value) in [("on", true), ("yes", true), ("true", true), ("y", true), ("off", false), ("no", false), ("false", false), ("n", false)] {
        let NetdevOptions::Tap(tap) = parse_kv(&format!("tap,id=t,vnet_hdr={text}")).options else { panic!("not tap") };
        assert_eq!(tap.vnet_hdr, Some(value), "vnet_hdr={text}");
    }

    // Numbers are strings, read like strtoll(…, 0): decimal, hex, octal, signed.
    for (text, value) in [("0", 0), ("42", 42), ("-1", -1), ("+7", 7), ("0x10", 16), ("0X1f", 31), ("010", 8), ("-0x80000000", i32::MIN)] {
        let netdev = parse_kv(&format!("hubport,id=h,hubid={text}"));
        assert_eq!(netdev.options, NetdevOptions::Hubport(hubport::HubPortOptions { hubid: value, netdev: None }), "hubid={text}");
    }
    // Sizes take suffixes.
    for (text, value) in [("0", 0), ("512", 512), ("2k", 2048), ("1M", 1 << 20), ("1G", 1 << 30)] {
        let NetdevOptions::Tap(tap) = parse_kv(&format!("tap,id=t,sndbuf={text}")).options else { panic!("not tap") };
        assert_eq!(tap.sndbuf, Some(Size(value)), "sndbuf={text}");
    }
}

#[test]
fn keyval_errors() {
    check(
        kv_err,
        &[
            ("hubport,id=h,hubid=x", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=0x", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=08", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=0x-1", "Parameter 'hubid' expects integer"),
            ("hubport,id=h,hubid=1,,2", "Parameter 'hubid' expects integer"),
            ("tap,id=t,vnet_hdr=maybe", "Parameter 'vnet_hdr' expects 'on' or 'off'"),
            ("tap,id=t,vnet_hdr=ON", "Parameter 'vnet_hdr' expects 'on' or 'off'"),
            // Syntax errors of the keyval parser itself.
            ("hubport,id=h,hubid", "Expected '=' after parameter 'hubid'"),
            ("hubport,id=h,=0", "Invalid parameter ''"),
            ("hubport,id=h,a..b=0", "Invalid parameter 'a..b'"),
            ("hubport,id=h,a b=0", "Invalid parameter 'a b'"),
            ("user,id=u,hostfwd.0.str=a,hostfwd.2.str=c", "Parameter 'hostfwd': list indexes must be 0, 1, 2… without gaps"),
        ],
    );
    assert!(matches!(Netdev::from_keyval("hubport,id=h,hubid"), Err(NetdevError::Keyval(_))));
}

// ---------------------------------------------------------------------------------------------
// Validation, type by type
// ---------------------------------------------------------------------------------------------

#[test]
fn dgram_local_remote_table() {
    let multicast = inet("224.0.0.1", "1234");
    let unicast = inet("127.0.0.1", "2");
    let local = inet("127.0.0.1", "1");
    check(
        |(local, remote): (Option<Value>, Option<Value>)| {
            let mut members = serde_json::Map::new();
            if let Some(local) = local {
                members.insert("local".into(), local);
            }
            if let Some(remote) = remote {
                members.insert("remote".into(), remote);
            }
            invalid(nd("dgram", Value::Object(members)))
        },
        &[
            // remote absent
            ((None, None), "dgram requires local= parameter"),
            ((Some(local.clone()), None), "type=inet or type=unix requires remote parameter"),
            ((Some(unix("/tmp/a")), None), "type=inet or type=unix requires remote parameter"),
            ((Some(vsock()), None), "type=inet or type=unix requires remote parameter"),
            ((Some(fd("3")), None), "<valid>"),
            // remote multicast: local is optional and only inet (an interface) or fd
            ((None, Some(multicast.clone())), "<valid>"),
            ((Some(local.clone()), Some(multicast.clone())), "<valid>"),
            ((Some(inet("0.0.0.0", "0")), Some(multicast.clone())), "<valid>"),
            ((Some(fd("3")), Some(multicast.clone())), "<valid>"),
            ((Some(inet("nothing", "1")), Some(multicast.clone())), "localaddr 'nothing' is not a valid IPv4 address"),
            ((Some(unix("/tmp/a")), Some(multicast.clone())), "only support inet or fd type for local"),
            ((Some(vsock()), Some(multicast.clone())), "only support inet or fd type for local"),
            // remote unicast: local required, same type, not fd
            ((None, Some(unicast.clone())), "dgram requires local= parameter"),
            ((None, Some(unix("/tmp/b"))), "dgram requires local= parameter"),
            ((Some(local.clone()), Some(unicast.clone())), "<valid>"),
            ((Some(unix("/tmp/a")), Some(unix("/tmp/b"))), "<valid>"),
            ((Some(local.clone()), Some(unix("/tmp/b"))), "remote and local types must be the same"),
            ((Some(unix("/tmp/a")), Some(unicast.clone())), "remote and local types must be the same"),
            ((Some(vsock()), Some(unicast.clone())), "remote and local types must be the same"),
            ((Some(fd("3")), Some(unicast.clone())), "don't set remote with local.fd"),
            ((Some(fd("3")), Some(unix("/tmp/b"))), "don't set remote with local.fd"),
            ((Some(vsock()), Some(vsock())), "only support inet or fd type for local"),
            ((Some(unix(&"a".repeat(108))), Some(unix("/tmp/b"))), &*format!("UNIX socket path '{}' is too long", "a".repeat(108))),
            ((Some(unix(&"a".repeat(107))), Some(unix("/tmp/b"))), "<valid>"),
        ],
    );
    // The same rules for keyval input.
    check(
        kv_invalid,
        &[
            ("dgram,id=d", "dgram requires local= parameter"),
            ("dgram,id=d,remote.type=inet,remote.host=127.0.0.1,remote.port=1", "dgram requires local= parameter"),
            ("dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=1", "type=inet or type=unix requires remote parameter"),
            (
                "dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=1,remote.type=unix,remote.path=/x",
                "remote and local types must be the same",
            ),
            ("dgram,id=d,local.type=fd,local.str=3,remote.type=inet,remote.host=127.0.0.1,remote.port=1", "don't set remote with local.fd"),
            (
                "dgram,id=d,local.type=unix,local.path=/tmp/a,remote.type=inet,remote.host=230.0.0.1,remote.port=1234",
                "only support inet or fd type for local",
            ),
            ("dgram,id=d,local.type=fd,local.str=3", "<valid>"),
        ],
    );
}

#[test]
fn socket_rules() {
    check(
        |members: Value| invalid(nd("socket", members)),
        &[
            (json!({}), "exactly one of listen=, connect=, mcast= or udp= is required"),
            (json!({"listen": ":1", "connect": "127.0.0.1:1"}), "exactly one of listen=, connect=, mcast= or udp= is required"),
            (json!({"fd": "3", "listen": ":1"}), "exactly one of listen=, connect=, mcast= or udp= is required"),
            (json!({"localaddr": "127.0.0.1"}), "exactly one of listen=, connect=, mcast= or udp= is required"),
            (json!({"listen": ":1", "localaddr": "127.0.0.1"}), "localaddr= is only valid with mcast= or udp="),
            (json!({"connect": "127.0.0.1:1", "localaddr": "127.0.0.1"}), "localaddr= is only valid with mcast= or udp="),
            (json!({"fd": "3", "localaddr": "127.0.0.1"}), "localaddr= is only valid with mcast= or udp="),
            (json!({"udp": "127.0.0.1:2"}), "localaddr= is mandatory with udp="),
            (json!({"listen": "127.0.0.1"}), "host address '127.0.0.1' doesn't contain ':' separating host from port"),
            (json!({"connect": "300.0.0.1:1"}), "host address '300.0.0.1' is not a valid IPv4 address"),
            (json!({"connect": "nosuchhost.invalid:1"}), "can't resolve host address 'nosuchhost.invalid'"),
            (json!({"mcast": "127.0.0.1:1234"}), "specified mcastaddr 127.0.0.1 (0x7f000001) does not contain a multicast address"),
            (json!({"mcast": "10.1.2.3:1234"}), "specified mcastaddr 10.1.2.3 (0x0a010203) does not contain a multicast address"),
            (json!({"mcast": "230.0.0.1:1234", "localaddr": "nothing"}), "localaddr 'nothing' is not a valid IPv4 address"),
            // `localaddr` is checked before the group is (net_socket_mcast_init).
            (json!({"mcast": "127.0.0.1:1234", "localaddr": "nothing"}), "localaddr 'nothing' is not a valid IPv4 address"),
            // udp: the local address is parsed first (net_socket_udp_init).
            (json!({"udp": "300.0.0.1:2", "localaddr": "127.0.0.1"}), "host address '127.0.0.1' doesn't contain ':' separating host from port"),
            (json!({"udp": "300.0.0.1:2", "localaddr": ":1"}), "host address '300.0.0.1' is not a valid IPv4 address"),
            (json!({"listen": ":1234"}), "<valid>"),
            (json!({"listen": "127.0.0.1:1234"}), "<valid>"),
            (json!({"connect": "localhost:1234"}), "<valid>"),
            (json!({"mcast": "230.0.0.1:1234"}), "<valid>"),
            (json!({"mcast": "239.255.0.1:5000", "localaddr": "127.0.0.1"}), "<valid>"),
            (json!({"udp": "127.0.0.1:2", "localaddr": ":1"}), "<valid>"),
            (json!({"fd": "3"}), "<valid>"),
        ],
    );
}

#[test]
fn stream_rules() {
    let long_path = format!("/tmp/{}", "s".repeat(103));
    check(
        |members: Value| invalid(nd("stream", members)),
        &[
            (json!({"addr": inet("127.0.0.1", "1"), "server": true, "reconnect-ms": 10}), "'reconnect-ms' option is incompatible with socket in server mode"),
            (json!({"addr": unix("/x"), "server": true, "reconnect-ms": 0}), "'reconnect-ms' option is incompatible with socket in server mode"),
            (json!({"addr": unix("/x"), "server": true, "reconnect": 1}), "'reconnect' option is incompatible with socket in server mode"),
            (json!({"addr": unix("/x"), "reconnect": 1, "reconnect-ms": 10}), "'reconnect' and 'reconnect-ms' are mutually exclusive"),
            (json!({"addr": unix("/x"), "reconnect-ms": -1}), "'reconnect-ms' must be a non-negative number of milliseconds"),
            (json!({"addr": vsock()}), "stream only supports inet, unix and fd addresses"),
            (json!({"addr": unix(&long_path), "server": true}), &*format!("UNIX socket path '{long_path}' is too long")),
            (json!({"addr": inet("127.0.0.1", "1"), "server": false, "reconnect-ms": 10}), "<valid>"),
            (json!({"addr": unix("/x"), "server": true}), "<valid>"),
            (json!({"addr": fd("3")}), "<valid>"),
        ],
    );
    assert_eq!(
        kv_invalid("stream,id=s,server=on,reconnect-ms=10,addr.type=inet,addr.host=127.0.0.1,addr.port=1"),
        "'reconnect-ms' option is incompatible with socket in server mode"
    );
    let delay = |members: Value| match parse_json(&nd("stream", members)).options {
        NetdevOptions::Stream(stream) => stream.reconnect_delay_ms(),
        other => panic!("not a stream: {other:?}"),
    };
    assert_eq!(delay(json!({"addr": unix("/x")})), 0);
    assert_eq!(delay(json!({"addr": unix("/x"), "reconnect-ms": 250})), 250);
    assert_eq!(delay(json!({"addr": unix("/x"), "reconnect": 2})), 2000);
}

#[test]
fn tap_rules() {
    const WITH_FD: &str = "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd=";
    const WITH_FDS: &str = "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= are invalid with fds=";
    const WITH_HELPER: &str = "ifname=, script=, downscript=, vnet_hdr=, queues=, and vhostfds= are invalid with helper=";
    check(
        |members: Value| invalid(nd("tap", members)),
        &[
            (json!({"fd": "3", "ifname": "tap0"}), WITH_FD),
            (json!({"fd": "3", "script": "no"}), WITH_FD),
            (json!({"fd": "3", "vnet_hdr": false}), WITH_FD),
            (json!({"fd": "3", "queues": 1}), WITH_FD),
            (json!({"fd": "3", "fds": "4:5"}), WITH_FD),
            (json!({"fd": "3", "vhostfds": "4:5"}), WITH_FD),
            (json!({"fds": "3:4", "queues": 2}), WITH_FDS),
            (json!({"fds": "3:4", "ifname": "tap0"}), WITH_FDS),
            (json!({"fds": "3:4", "helper": "/bin/true"}), WITH_FDS),
            (json!({"fds": "3:4", "vhostfd": "5"}), WITH_FDS),
            (json!({"fds": "3:4", "vhostfds": "5"}), "The number of fds passed does not match the number of vhostfds passed"),
            (json!({"helper": "/bin/true", "ifname": "tap0"}), WITH_HELPER),
            (json!({"helper": "/bin/true", "queues": 2}), WITH_HELPER),
            (json!({"helper": "/bin/true", "vhostfds": "5"}), WITH_HELPER),
            (json!({"vhostfds": "5:6"}), "vhostfds= is invalid if fds= wasn't specified"),
            (json!({"ifname": "tap0", "vhostfds": "5:6"}), "vhostfds= is invalid if fds= wasn't specified"),
            (json!({"ifname": "abcdefghijklmnop"}), "interface name 'abcdefghijklmnop' is longer than 15 bytes"),
            (json!({"ifname": "a/b"}), "interface name 'a/b' is not a valid Linux interface name"),
            (json!({"ifname": ""}), "interface name '' is not a valid Linux interface name"),
            (json!({"queues": 0}), "Invalid number of queues 0: must be from 1 to 1024"),
            (json!({"queues": 1025}), "Invalid number of queues 1025: must be from 1 to 1024"),
            (json!({"fd": "3", "vhost": false, "vhostfd": "4"}), "vhostfd(s)= is not valid without vhost"),
            (json!({"fds": "3:4", "vhost": false, "vhostfds": "5:6"}), "vhostfd(s)= is not valid without vhost"),
            (json!({}), "<valid>"),
            (json!({"ifname": "abcdefghijklmno"}), "<valid>"),
            (json!({"ifname": "tap0", "script": "/etc/qemu-ifup", "downscript": "no", "queues": 4, "vnet_hdr": true}), "<valid>"),
            (json!({"fd": "3", "vhost": true, "vhostfd": "4"}), "<valid>"),
            (json!({"fds": "3:4", "vhostfds": "5:6"}), "<valid>"),
            (json!({"helper": "/usr/lib/qemu/qemu-bridge-helper", "br": "br0"}), "<valid>"),
        ],
    );
    assert_eq!(kv_invalid("tap,id=t,fd=3,ifname=x"), WITH_FD);

    let tap = |members: Value| match parse_json(&nd("tap", members)).options {
        NetdevOptions::Tap(tap) => tap,
        other => panic!("not a tap: {other:?}"),
    };
    let default = tap(json!({}));
    assert_eq!((default.script(), default.downscript()), (Some(tap::DEFAULT_SCRIPT), Some(tap::DEFAULT_DOWNSCRIPT)));
    let disabled = tap(json!({"script": "no", "downscript": ""}));
    assert_eq!((disabled.script(), disabled.downscript()), (None, None));
    assert_eq!(tap(json!({"script": "/x/up"})).script(), Some("/x/up"));
}

#[test]
fn l2tpv3_rules() {
    let l2tp = |extra: Value| {
        let mut members = json!({"src": "127.0.0.1", "dst": "127.0.0.2", "txsession": 1});
        if let (Value::Object(members), Value::Object(extra)) = (&mut members, extra) {
            members.extend(extra);
        }
        nd("l2tpv3", members)
    };
    check(
        |extra: Value| invalid(l2tp(extra)),
        &[
            (json!({"udp": true}), "need both src and dst port for udp"),
            (json!({"udp": true, "srcport": "1701"}), "need both src and dst port for udp"),
            (json!({"udp": true, "dstport": "1701"}), "need both src and dst port for udp"),
            (json!({"txcookie": 1}), "require both 'rxcookie' and 'txcookie' or neither"),
            (json!({"rxcookie": 1}), "require both 'rxcookie' and 'txcookie' or neither"),
            (json!({"offset": 300}), "offset must be less than 256 bytes"),
            (json!({"offset": 257}), "offset must be less than 256 bytes"),
            // QEMU's order: offset, cookies, then udp ports.
            (json!({"offset": 300, "txcookie": 1, "udp": true}), "offset must be less than 256 bytes"),
            (json!({"txcookie": 1, "udp": true}), "require both 'rxcookie' and 'txcookie' or neither"),
            (json!({}), "<valid>"),
            (json!({"offset": 256}), "<valid>"),
            (json!({"udp": false}), "<valid>"),
            (json!({"udp": true, "srcport": "1701", "dstport": "1702"}), "<valid>"),
            (json!({"txcookie": 1, "rxcookie": 2, "cookie64": false}), "<valid>"),
        ],
    );
    assert_eq!(kv_invalid("l2tpv3,id=l,src=a,dst=b,txsession=1,udp=on"), "need both src and dst port for udp");

    let cookie_len = |extra: Value| match parse_json(&l2tp(extra)).options {
        NetdevOptions::L2tpv3(options) => options.cookie_len(),
        other => panic!("not l2tpv3: {other:?}"),
    };
    assert_eq!(cookie_len(json!({})), 0);
    assert_eq!(cookie_len(json!({"txcookie": 1, "rxcookie": 2})), 4);
    assert_eq!(cookie_len(json!({"txcookie": 1, "rxcookie": 2, "cookie64": true})), 8);
    // QEMU quirk: the presence of cookie64 selects 64-bit cookies, whatever its value.
    assert_eq!(cookie_len(json!({"txcookie": 1, "rxcookie": 2, "cookie64": false})), 8);
}

#[test]
fn user_rules() {
    check(
        |members: Value| invalid(nd("user", members)),
        &[
            (json!({"net": "10.0.0.0/33"}), "Invalid netmask provided (must be in range 4-32)"),
            (json!({"net": "10.0.0.0/3"}), "Invalid netmask provided (must be in range 4-32)"),
            (json!({"net": "10.0.0.0/"}), "Invalid netmask provided (must be in range 4-32)"),
            (json!({"net": "10.0.0.0/-8"}), "Invalid netmask provided (must be in range 4-32)"),
            (json!({"net": "10.0.0.0/99999999999999999999"}), "Invalid netmask provided (must be in range 4-32)"),
            (json!({"net": "10.0.0.0/24x"}), "Failed to parse netmask (trailing chars)"),
            (json!({"net": "10.0.0.0/255.255.0.x"}), "Failed to parse netmask (trailing chars)"),
            (json!({"net": "bogus/24"}), "Failed to parse netmask"),
            (json!({"net": "bogus"}), "Failed to parse netmask"),
            (json!({"ipv4": false, "ipv6": false}), "IPv4 and IPv6 disabled"),
            // QEMU quirk: naming one family `on` alone turns the other off.
            (json!({"ipv6": true, "net": "10.0.0.0/8"}), "IPv4 disabled but netmask/host/dns provided"),
            (json!({"ipv6": true, "host": "10.0.2.2"}), "IPv4 disabled but netmask/host/dns provided"),
            (json!({"ipv4": false, "dns": "10.0.2.3"}), "IPv4 disabled but netmask/host/dns provided"),
            (json!({"ipv6": true, "ip": "10.0.2.0"}), "IPv4 disabled but netmask/host/dns provided"),
            (json!({"ipv4": true, "ipv6-prefix": "fd00::"}), "IPv6 disabled but prefix/host6/dns6 provided"),
            (json!({"ipv6": false, "ipv6-dns": "fec0::3"}), "IPv6 disabled but prefix/host6/dns6 provided"),
            (json!({"host": "10.0.2.x"}), "Failed to parse host"),
            (json!({"host": "10.0.3.2"}), "Host doesn't belong to network"),
            (json!({"dns": "nameserver"}), "Failed to parse DNS"),
            (json!({"dns": "10.0.2.2"}), "DNS must be different from host"),
            (json!({"host": "10.0.2.3"}), "DNS must be different from host"),
            (json!({"dns": "8.8.8.8", "restrict": true}), "DNS doesn't belong to network"),
            (json!({"dhcpstart": "10.0.2"}), "Failed to parse DHCP start address"),
            (json!({"dhcpstart": "10.0.3.15"}), "DHCP doesn't belong to network"),
            (json!({"net": "192.168.76.0/24", "dhcpstart": "10.0.2.15"}), "DHCP doesn't belong to network"),
            (json!({"dhcpstart": "10.0.2.2"}), "DHCP must be different from host and DNS"),
            (json!({"dhcpstart": "10.0.2.3"}), "DHCP must be different from host and DNS"),
            (json!({"smbserver": "x"}), "Failed to parse SMB address"),
            (json!({"ipv6-prefix": "fd00::g"}), "Failed to parse IPv6 prefix"),
            (json!({"ipv6-prefixlen": 127}), "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)"),
            (json!({"ipv6-prefixlen": -2}), "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)"),
            (json!({"ipv6-host": "fec0::zz"}), "Failed to parse IPv6 host"),
            (json!({"ipv6-host": "fd00::2"}), "IPv6 Host doesn't belong to network"),
            (json!({"ipv6-dns": "fd00::3"}), "IPv6 DNS doesn't belong to network"),
            (json!({"domainname": ""}), "'domainname' parameter cannot be empty"),
            (json!({"domainname": "d".repeat(256)}), "'domainname' parameter cannot exceed 255 bytes"),
            (json!({"hostname": "h".repeat(256)}), "'vhostname' parameter cannot exceed 255 bytes"),
            (json!({"tftp-server-name": "t".repeat(256)}), "'tftp-server-name' parameter cannot exceed 255 bytes"),
            (json!({"net": "10.0.0.0/32", "host": "10.0.0.0", "dns": "10.0.0.0"}), "DNS must be different from host"),
            // Valid: a DNS outside the network is fine unless restricted; limits are inclusive.
            (json!({"dns": "8.8.8.8"}), "<valid>"),
            (json!({"domainname": "d".repeat(255), "hostname": "h".repeat(255)}), "<valid>"),
            (json!({"ipv6": true}), "<valid>"),
            (json!({"ipv4": true}), "<valid>"),
            (json!({"ipv4": false, "ipv6": true, "ipv6-prefix": "fd00::", "ipv6-prefixlen": 48}), "<valid>"),
            (json!({"net": "10.0.0.0/+24"}), "<valid>"),
        ],
    );
    assert_eq!(kv_invalid("user,id=u,net=10.0.0.0/33"), "Invalid netmask provided (must be in range 4-32)");
    assert_eq!(kv_invalid("user,id=u,ipv6=on,net=10.0.0.0/8"), "IPv4 disabled but netmask/host/dns provided");
}

#[test]
fn user_address_plan() {
    let plan = |members: Value| match parse_json(&nd("user", members)).options {
        NetdevOptions::User(user) => user.address_plan().unwrap_or_else(|e| panic!("{e}")),
        other => panic!("not user: {other:?}"),
    };
    let v4 = |text: &str| text.parse::<Ipv4Addr>().unwrap_or_else(|e| panic!("{text}: {e}"));
    let v6 = |text: &str| text.parse::<Ipv6Addr>().unwrap_or_else(|e| panic!("{text}: {e}"));

    assert_eq!(
        plan(json!({})),
        AddressPlan {
            ipv4: true,
            ipv6: true,
            net: v4("10.0.2.0"),
            mask: v4("255.255.255.0"),
            host: v4("10.0.2.2"),
            dhcp_start: v4("10.0.2.15"),
            dns: v4("10.0.2.3"),
            smb: v4("10.0.2.4"),
            ipv6_prefix: v6("fec0::"),
            ipv6_prefixlen: 64,
            ipv6_host: v6("fec0::2"),
            ipv6_dns: v6("fec0::3"),
        }
    );

    // A custom net: host .2, DNS .3 and DHCP .15 of it, masked into the net's host part.
    let custom = plan(json!({"net": "192.168.76.0/24"}));
    assert_eq!(
        (custom.net, custom.mask, custom.host, custom.dns, custom.dhcp_start, custom.smb),
        (v4("192.168.76.0"), v4("255.255.255.0"), v4("192.168.76.2"), v4("192.168.76.3"), v4("192.168.76.15"), v4("192.168.76.4"))
    );
    let wide = plan(json!({"net": "10.1.0.0/16"}));
    assert_eq!((wide.host, wide.dns, wide.dhcp_start), (v4("10.1.2.2"), v4("10.1.2.3"), v4("10.1.2.15")));
    // Host bits of `net` are cleared; a dotted mask works as well as a prefix length.
    let dotted = plan(json!({"net": "172.30.9.9/255.255.0.0"}));
    assert_eq!((dotted.net, dotted.mask, dotted.host), (v4("172.30.0.0"), v4("255.255.0.0"), v4("172.30.2.2")));
    // Explicit addresses override the derived ones.
    let explicit = plan(json!({"net": "10.5.0.0/24", "host": "10.5.0.1", "dns": "10.5.0.53", "dhcpstart": "10.5.0.100"}));
    assert_eq!((explicit.host, explicit.dns, explicit.dhcp_start), (v4("10.5.0.1"), v4("10.5.0.53"), v4("10.5.0.100")));
    // Legacy `ip=A` is `net=A/24`.
    let legacy = plan(json!({"ip": "10.9.8.7"}));
    assert_eq!((legacy.net, legacy.mask, legacy.host), (v4("10.9.8.0"), v4("255.255.255.0"), v4("10.9.8.2")));
    // Classful masks for `net` without one (QEMU's table, labels swapped in the source).
    for (net, mask, host) in [
        ("10.0.0.0", "255.0.0.0", "10.0.2.2"),
        ("172.20.1.0", "255.240.0.0", "172.16.2.2"),
        ("130.1.0.0", "255.255.0.0", "130.1.2.2"),
        ("192.168.9.0", "255.255.0.0", "192.168.2.2"),
        ("198.18.0.0", "255.254.0.0", "198.18.2.2"),
        ("198.19.0.0", "255.255.255.240", "198.19.0.2"),
        ("200.1.2.0", "255.255.255.240", "200.1.2.2"),
        ("224.1.2.0", "255.255.255.0", "224.1.2.2"),
    ] {
        let p = plan(json!({"net": net}));
        assert_eq!((p.mask, p.host), (v4(mask), v4(host)), "net={net}");
    }
    // Families and IPv6 defaults.
    let v6_only = plan(json!({"ipv6": true}));
    assert_eq!((v6_only.ipv4, v6_only.ipv6), (false, true));
    let v4_only = plan(json!({"ipv4": true}));
    assert_eq!((v4_only.ipv4, v4_only.ipv6), (true, false));
    let prefixed = plan(json!({"ipv6-prefix": "fd00:1:2::", "ipv6-prefixlen": 48}));
    assert_eq!((prefixed.ipv6_host, prefixed.ipv6_dns, prefixed.ipv6_prefixlen), (v6("fd00:1:2::2"), v6("fd00:1:2::3"), 48));
}

#[test]
fn af_xdp_rules() {
    check(
        |members: Value| invalid(nd("af-xdp", members)),
        &[
            (json!({"ifname": "eth0", "inhibit": true}), "'inhibit=on' requires 'sock-fds' or 'map-path'"),
            (json!({"ifname": "eth0", "sock-fds": "3"}), "'sock-fds' and 'map-path' require 'inhibit=on'"),
            (json!({"ifname": "eth0", "inhibit": false, "map-path": "/sys/fs/bpf/x"}), "'sock-fds' and 'map-path' require 'inhibit=on'"),
            (json!({"ifname": "eth0", "inhibit": true, "sock-fds": "3", "map-path": "/sys/fs/bpf/x"}), "'sock-fds' and 'map-path' are mutually exclusive"),
            (json!({"ifname": "eth0", "map-start-index": 1}), "'map-start-index' requires 'map-path'"),
            (json!({"ifname": "eth0", "inhibit": true, "sock-fds": "3", "map-start-index": 1}), "'map-start-index' requires 'map-path'"),
            (json!({"ifname": "eth0", "inhibit": true, "map-path": "/sys/fs/bpf/x", "map-start-index": -1}), "'map-start-index' cannot be negative (-1)"),
            (json!({"ifname": "eth0", "queues": 0}), "invalid number of queues (0) for 'eth0'"),
            (json!({"ifname": "eth0", "queues": -3}), "invalid number of queues (-3) for 'eth0'"),
            (json!({"ifname": "eth0", "queues": 2, "inhibit": true, "sock-fds": "3"}), "expected 2 socket fds, got 1"),
            (json!({"ifname": "eth0", "inhibit": true, "sock-fds": "3:4"}), "expected 1 socket fds, got 2"),
            (json!({"ifname": "eth0", "start-queue": -1}), "invalid start queue for 'eth0'"),
            (json!({"ifname": "much-too-long-name"}), "interface name 'much-too-long-name' is longer than 15 bytes"),
            (json!({"ifname": "eth0"}), "<valid>"),
            (json!({"ifname": "eth0", "mode": "native", "queues": 4, "start-queue": 2, "force-copy": true}), "<valid>"),
            (json!({"ifname": "eth0", "inhibit": true, "map-path": "/sys/fs/bpf/x", "map-start-index": 0}), "<valid>"),
            (json!({"ifname": "eth0", "queues": 3, "inhibit": true, "sock-fds": "3:4:5"}), "<valid>"),
        ],
    );
    assert_eq!(kv_invalid("af-xdp,id=x,ifname=eth0,inhibit=on"), "'inhibit=on' requires 'sock-fds' or 'map-path'");
}

#[test]
fn vhost_rules() {
    check(
        |args: Value| invalid(args),
        &[
            (nd("vhost-user", json!({"chardev": "c", "queues": 0})), "vhost-user number of queues must be in range [1, 1024]"),
            (nd("vhost-user", json!({"chardev": "c", "queues": 1025})), "vhost-user number of queues must be in range [1, 1024]"),
            (nd("vhost-user", json!({"chardev": "c", "queues": -1})), "vhost-user number of queues must be in range [1, 1024]"),
            (nd("vhost-user", json!({"chardev": "c"})), "<valid>"),
            (nd("vhost-user", json!({"chardev": "c", "queues": 1})), "<valid>"),
            (nd("vhost-user", json!({"chardev": "c", "queues": 1024})), "<valid>"),
            (nd("vhost-vdpa", json!({})), "vhost-vdpa: neither vhostdev= nor vhostfd= was specified"),
            (nd("vhost-vdpa", json!({"queues": 2, "x-svq": true})), "vhost-vdpa: neither vhostdev= nor vhostfd= was specified"),
            (
                nd("vhost-vdpa", json!({"vhostdev": "/dev/vhost-vdpa-0", "vhostfd": "3"})),
                "vhost-vdpa: vhostdev= and vhostfd= are mutually exclusive",
            ),
            (nd("vhost-vdpa", json!({"vhostdev": "/dev/vhost-vdpa-0"})), "<valid>"),
            (nd("vhost-vdpa", json!({"vhostfd": "3"})), "<valid>"),
        ],
    );
    assert_eq!(kv_invalid("vhost-vdpa,id=v"), "vhost-vdpa: neither vhostdev= nor vhostfd= was specified");
}

#[test]
fn other_backend_rules() {
    check(
        |args: Value| invalid(args),
        &[
            (nd("bridge", json!({})), "<valid>"),
            (nd("bridge", json!({"br": "a-very-long-bridge"})), "interface name 'a-very-long-bridge' is longer than 15 bytes"),
            (nd("passt", json!({})), "<valid>"),
            (nd("passt", json!({"mtu": 67})), "'mtu' must be between 68 and 65520"),
            (nd("passt", json!({"mtu": 65521})), "'mtu' must be between 68 and 65520"),
            (nd("passt", json!({"mtu": 68})), "<valid>"),
            (nd("passt", json!({"mac": "9a:55:9a:55:9a"})), "Invalid MAC address '9a:55:9a:55:9a'"),
            (nd("nic", json!({"macaddr": "52:54:00:12:34:56:78"})), "Parameter 'macaddr' expects a valid MAC address, got '52:54:00:12:34:56:78'"),
            (nd("none", json!({})), "<valid>"),
            (nd("hubport", json!({"hubid": 3, "netdev": "anything"})), "<valid>"),
            (nd("vde", json!({})), "<valid>"),
            (nd("netmap", json!({"ifname": "vale0:1"})), "<valid>"),
            (nd("vmnet-host", json!({})), "<valid>"),
            (nd("vmnet-shared", json!({})), "<valid>"),
            (nd("vmnet-bridged", json!({"ifname": "en0"})), "<valid>"),
        ],
    );
    let bridge = |members: Value| match parse_json(&nd("bridge", members)).options {
        NetdevOptions::Bridge(bridge) => bridge,
        other => panic!("not a bridge: {other:?}"),
    };
    let default = bridge(json!({}));
    assert_eq!((default.bridge(), default.helper()), (tap::DEFAULT_BRIDGE, tap::DEFAULT_HELPER));
    let NetdevOptions::Netmap(netmap) = parse_kv("netmap,id=n,ifname=vale0:1").options else { panic!("not netmap") };
    assert_eq!(netmap.devname(), "/dev/netmap");
}

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

impl Netdev {
    /// The same netdev under another id (for comparing forms written with different ids).
    fn with_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.id);
        self
    }
}
