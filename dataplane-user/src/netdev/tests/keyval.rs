//! What only the keyval syntax (`-netdev`) has.

use super::*;

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
        assert_eq!(netdev.options, NetdevOptions::Hubport(hubport::HubPortOptions { hubid: value, netdev: None, ..Default::default() }), "hubid={text}");
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

/// netdevd's hubport extensions: QEMU-style booleans, and unknown to every other type, as QEMU
/// would have them.
#[test]
fn hubport_extensions() {
    let NetdevOptions::Hubport(port) = parse_kv("hubport,id=h,hubid=1,x-monitor=on,x-learning=off").options else {
        panic!("not hubport")
    };
    assert_eq!((port.monitor(), port.learning()), (true, false));
    let NetdevOptions::Hubport(port) = parse_kv("hubport,id=h,hubid=1").options else { panic!("not hubport") };
    assert_eq!((port.monitor(), port.learning()), (false, true), "QEMU's hubport: no monitor, learning hub");
    assert_eq!(kv_err("hubport,id=h,hubid=1,x-monitor=maybe"), "Parameter 'x-monitor' expects 'on' or 'off'");
    assert_eq!(kv_err("tap,id=t,x-monitor=on"), "Parameter 'x-monitor' is unexpected");
    assert_eq!(kv_err("user,id=u,x-learning=off"), "Parameter 'x-learning' is unexpected");
}
