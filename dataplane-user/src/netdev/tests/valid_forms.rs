//! Valid forms of every type: JSON and keyval agree, and `to_json` round-trips.

use super::*;

// ---------------------------------------------------------------------------------------------
// Valid forms: JSON and keyval agree, for every type
// ---------------------------------------------------------------------------------------------

/// One valid `netdev_add` per row and the equivalent `-netdev` string; together they use every
/// member kind (strings, booleans, each integer width, sizes, enums, lists, socket addresses).
pub(super) fn valid_forms() -> Vec<(Value, &'static str)> {
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
