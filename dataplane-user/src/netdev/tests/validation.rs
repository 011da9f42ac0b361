//! Validation rules, type by type, with QEMU's texts.

use super::*;

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
            // Names other than `localhost` are refused before any resolver is asked
            // (`parse_ipv4_host_port`), so this asks no DNS server.
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
