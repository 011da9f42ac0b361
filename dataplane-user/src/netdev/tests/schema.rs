//! Schema errors: the base members, then type by type.

use super::*;

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
        assert_eq!(netdev.options, NetdevOptions::Hubport(hubport::HubPortOptions { hubid, netdev: None, ..Default::default() }));
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
