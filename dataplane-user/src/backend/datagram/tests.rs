use std::{os::unix::net::UnixDatagram, time::Duration};

use super::{
    exchange::{RECEIVE_BUFFER, ipv4_header_len, receive},
    filter::attach_drop_mark_filter,
    *,
};
use crate::{backend::test_support::*, fd::NoFds};

fn peer_udp() -> tokio::net::UdpSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(socket).unwrap()
}

async fn recv_datagram(socket: &tokio::net::UdpSocket) -> Vec<u8> {
    let mut buf = vec![0; RECEIVE_BUFFER];
    let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("a datagram")
        .unwrap();
    buf.truncate(len);
    buf
}

/// These tests need root (raw sockets, namespaces, SO_MARK); without it they fail, saying so.
#[track_caller]
fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "this test needs root: {why}");
}

/// Runs `test` on its own thread in a fresh network namespace whose loopback is up and
/// multicast-capable, so the host's namespace is left alone.
fn in_fresh_netns<F: std::future::Future<Output = ()>>(
    test: impl FnOnce() -> F + Send + 'static,
) {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            unshared,
            0,
            "unshare: {}",
            io::Error::last_os_error()
        );
        for args in [
            ["link", "set", "lo", "up"],
            ["link", "set", "lo", "multicast"],
        ] {
            let mut args = args.to_vec();
            if args[3] == "multicast" {
                args.push("on");
            }
            let status = std::process::Command::new("ip")
                .args(&args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        let status = std::process::Command::new("ip")
            .args(["route", "add", "224.0.0.0/4", "dev", "lo"])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn inet_unicast_carries_frames_both_ways() {
    let peer = peer_udp();
    let peer_address = peer.local_addr().unwrap();
    let options = DgramOptions {
        local: Some(inet("127.0.0.1", 0)),
        remote: Some(inet("127.0.0.1", peer_address.port())),
    };
    let prepared = prepare_dgram("n0", &options, &mut NoFds).unwrap();
    let endpoint = prepared.endpoint().unwrap();
    assert_eq!(endpoint.remote, peer_address);
    assert_eq!(endpoint.encapsulation, Encapsulation::Udp);
    assert_eq!(endpoint.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(endpoint.local.port(), 0);
    let (ctx, _events) = context();
    let (hub, task) = start(prepared, &ctx);

    hub.send(&frame(1, 60)).await.unwrap();
    hub.send(&frame(2, 5)).await.unwrap();
    hub.send(&frame(3, 1514)).await.unwrap();
    assert_eq!(recv_datagram(&peer).await, frame(1, 60));
    assert_eq!(recv_datagram(&peer).await, frame(3, 1514));
    peer.send_to(&[], endpoint.local).await.unwrap();
    peer.send_to(&frame(4, 60), endpoint.local).await.unwrap();
    assert_eq!(recv_frame(&hub).await, frame(4, 60));
    assert_eq!(counter(&ctx.stats.runt_frames), 2);
    assert_eq!(counter(&ctx.stats.tx_frames), 2);
    assert_eq!(
        info(&ctx),
        format!("udp=127.0.0.1:0/127.0.0.1:{}", peer_address.port())
    );
    stop(&ctx, task).await;
}

#[tokio::test]
async fn unix_datagrams_flow_both_ways_and_empty_ones_are_ignored() {
    let dir = TempDir::new("dgram");
    let (local, remote) = (dir.path("local.sock"), dir.path("remote.sock"));
    let peer = UnixDatagram::bind(&remote).unwrap();
    peer.set_nonblocking(true).unwrap();
    let peer = tokio::net::UnixDatagram::from_std(peer).unwrap();
    let options = DgramOptions {
        local: Some(unix(&local)),
        remote: Some(unix(&remote)),
    };
    let prepared = prepare_dgram("n0", &options, &mut NoFds).unwrap();
    assert_eq!(prepared.endpoint(), None);
    let (ctx, _events) = context();
    let (hub, task) = start(prepared, &ctx);

    hub.send(&frame(1, 60)).await.unwrap();
    let mut buf = vec![0; 2048];
    let len = tokio::time::timeout(Duration::from_secs(5), peer.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[..len], frame(1, 60));
    for _ in 0..3 {
        peer.send_to(&[], &local).await.unwrap();
    }
    peer.send_to(&frame(2, 60), &local).await.unwrap();
    assert_eq!(recv_frame(&hub).await, frame(2, 60));
    assert_eq!(counter(&ctx.stats.runt_frames), 3);
    assert_eq!(info(&ctx), format!("udp={local}:{remote}"));
    stop(&ctx, task).await;
    assert!(!std::path::Path::new(&local).exists());
}

fn l2tp_options(srcport: u16, dstport: u16) -> L2tpv3Options {
    L2tpv3Options {
        src: "127.0.0.1".to_owned(),
        dst: "127.0.0.1".to_owned(),
        srcport: Some(srcport.to_string()),
        dstport: Some(dstport.to_string()),
        ipv6: None,
        udp: Some(true),
        cookie64: None,
        counter: Some(true),
        pincounter: None,
        txcookie: Some(0x1234_5678),
        rxcookie: Some(0x8765_4321),
        txsession: 0x12,
        rxsession: Some(0x21),
        offset: None,
    }
}

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

#[tokio::test]
async fn l2tpv3_over_udp_frames_carry_session_cookie_and_counter() {
    let peer = peer_udp();
    let free_port = peer_udp().local_addr().unwrap().port();
    let prepared = prepare_l2tpv3(
        "n0",
        &l2tp_options(free_port, peer.local_addr().unwrap().port()),
    )
    .unwrap();
    let endpoint = prepared.endpoint().unwrap();
    assert_eq!(
        endpoint.local,
        SocketAddr::from((Ipv4Addr::LOCALHOST, free_port))
    );
    assert!(matches!(
        endpoint.encapsulation,
        Encapsulation::L2tpv3 { over_udp: true, .. }
    ));
    let (ctx, _events) = context();
    let (hub, task) = start(prepared, &ctx);

    hub.send(&frame(1, 60)).await.unwrap();
    hub.send(&frame(2, 60)).await.unwrap();
    assert_eq!(
        recv_datagram(&peer).await,
        [hex("00030000 00000012 12345678 00000001"), frame(1, 60)].concat()
    );
    assert_eq!(
        recv_datagram(&peer).await,
        [hex("00030000 00000012 12345678 00000002"), frame(2, 60)].concat()
    );

    let wrong_session = [hex("00030000 00000022 87654321 00000001"), frame(3, 60)].concat();
    let wrong_cookie = [hex("00030000 00000021 12345678 00000001"), frame(4, 60)].concat();
    let good = [hex("00030000 00000021 87654321 00000009"), frame(5, 60)].concat();
    for datagram in [&wrong_session, &wrong_cookie, &good] {
        peer.send_to(datagram, endpoint.local).await.unwrap();
    }
    assert_eq!(recv_frame(&hub).await, frame(5, 60));
    assert_eq!(counter(&ctx.stats.bad_headers), 2);
    assert_eq!(counter(&ctx.stats.rx_frames), 1);
    assert_eq!(info(&ctx), "l2tpv3: connected");
    stop(&ctx, task).await;
}

#[test]
fn bad_hosts_and_taken_ports_fail_with_clear_texts() {
    let options = DgramOptions {
        local: Some(inet("300.0.0.1", 1)),
        remote: Some(inet("127.0.0.1", 2)),
    };
    let error = prepare_dgram("n0", &options, &mut NoFds).unwrap_err();
    assert_eq!(
        error.to_string(),
        "host address '300.0.0.1' is not a valid IPv4 address"
    );
    // Names other than `localhost` are refused before any resolver is asked (`parse_inet`,
    // `resolve_l2tp_host`): these checks never reach the machine's resolver.
    let options = DgramOptions {
        local: Some(inet("nosuchhost.invalid", 1)),
        remote: Some(inet("127.0.0.1", 2)),
    };
    let error = prepare_dgram("n0", &options, &mut NoFds).unwrap_err();
    assert_eq!(
        error.to_string(),
        "can't resolve host address 'nosuchhost.invalid'"
    );

    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let error = prepare_l2tpv3("n0", &l2tp_options(port, 1)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "could not bind socket: Address already in use"
    );
    let mut bad_src = l2tp_options(1, 1);
    bad_src.src = "nosuchhost.invalid".to_owned();
    let error = prepare_l2tpv3("n0", &bad_src).unwrap_err();
    assert_eq!(
        error.to_string(),
        "could not resolve src, errno = Name or service not known"
    );
}

#[test]
fn l2tpv3_over_ip_in_both_families() {
    require_root("raw IP sockets");
    in_fresh_netns(|| async {
        for (ipv6, host) in [(false, "127.0.0.1"), (true, "::1")] {
            let side = |tx: u32, rx: u32| L2tpv3Options {
                src: host.to_owned(),
                dst: host.to_owned(),
                srcport: None,
                dstport: None,
                ipv6: Some(ipv6),
                udp: None,
                cookie64: Some(false),
                counter: Some(true),
                pincounter: None,
                txcookie: Some(0x0123_4567_89ab_cdef),
                rxcookie: Some(0x0123_4567_89ab_cdef),
                txsession: tx,
                rxsession: Some(rx),
                offset: Some(2),
            };
            let a = prepare_l2tpv3("a", &side(1, 2)).unwrap();
            let b = prepare_l2tpv3("b", &side(2, 1)).unwrap();
            let endpoint = a.endpoint().unwrap();
            assert_eq!(endpoint.remote.port(), 0);
            assert_eq!(endpoint.local.ip(), host.parse::<IpAddr>().unwrap());
            let (a_ctx, _a_events) = context();
            let (b_ctx, _b_events) = context();
            let (a_hub, a_task) = start(a, &a_ctx);
            let (b_hub, b_task) = start(b, &b_ctx);
            a_hub.send(&frame(1, 60)).await.unwrap();
            assert_eq!(recv_frame(&b_hub).await, frame(1, 60));
            b_hub.send(&frame(2, 1400)).await.unwrap();
            assert_eq!(recv_frame(&a_hub).await, frame(2, 1400));
            // Each raw socket also sees its own packets; their session is not ours to take.
            assert!(counter(&a_ctx.stats.bad_headers) >= 1);
            assert_eq!(counter(&a_ctx.stats.rx_frames), 1);
            stop(&a_ctx, a_task).await;
            stop(&b_ctx, b_task).await;
        }
    });
}

#[test]
fn multicast_peers_exchange_frames_and_own_frames_are_not_reinjected() {
    require_root("a multicast loopback needs a network namespace");
    in_fresh_netns(|| async {
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 45_678);
        let legacy = SocketOptions {
            fd: None,
            listen: None,
            connect: None,
            mcast: Some(group.to_string()),
            localaddr: Some("127.0.0.1".to_owned()),
            udp: None,
        };
        let a = prepare_socket("a", &legacy, &mut NoFds).unwrap();
        let options = DgramOptions {
            local: Some(inet("127.0.0.1", 0)),
            remote: Some(inet("239.1.2.3", group.port())),
        };
        let b = prepare_dgram("b", &options, &mut NoFds).unwrap();
        let endpoint = a.endpoint().unwrap();
        assert_eq!(endpoint.local, SocketAddr::V4(group));
        assert_eq!(endpoint.remote, SocketAddr::V4(group));
        assert_eq!(endpoint.multicast_interface, Some(Ipv4Addr::LOCALHOST));
        let (a_ctx, _a_events) = context();
        let (b_ctx, _b_events) = context();
        let (a_hub, a_task) = start(a, &a_ctx);
        let (b_hub, b_task) = start(b, &b_ctx);

        a_hub.send(&frame(1, 60)).await.unwrap();
        assert_eq!(recv_frame(&b_hub).await, frame(1, 60));
        b_hub.send(&frame(2, 60)).await.unwrap();
        // Everything `a` receives is `b`'s; its own frame came back first and was dropped.
        assert_eq!(recv_frame(&a_hub).await, frame(2, 60));
        assert_eq!(counter(&a_ctx.stats.own_frames), 1);
        assert_eq!(counter(&a_ctx.stats.rx_frames), 1);
        assert_eq!(info(&a_ctx), format!("socket: mcast={group}"));
        assert_eq!(info(&b_ctx), format!("mcast={group}"));
        stop(&a_ctx, a_task).await;
        stop(&b_ctx, b_task).await;
    });
}

#[test]
fn mark_filter_drops_only_packets_the_kernel_marked() {
    require_root("SO_MARK");
    let mark = dataplane_common::marks::TUNNEL_HANDLED;
    // Drop the unmarked one to see the filter work at all, then the marked one.
    for (dropped_mark, expected) in [(0, "marked"), (mark, "plain")] {
        let receiver = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        receiver
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        attach_drop_mark_filter(&receiver, dropped_mark).unwrap();
        let target = receiver.local_addr().unwrap();
        let marked = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        marked.set_mark(mark).unwrap();
        let plain = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        plain.send_to(b"plain", &target).unwrap();
        marked.send_to(b"marked", &target).unwrap();
        let mut buf = [0; 64];
        let (len, _) = receive(&receiver, &mut buf).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&buf[..len]),
            expected,
            "filter on mark {dropped_mark:#x}"
        );
        receiver.set_nonblocking(true).unwrap();
        assert!(
            receive(&receiver, &mut buf).is_err(),
            "only one of the two gets through"
        );
    }
}

#[test]
fn ipv4_header_length_honours_options() {
    assert_eq!(ipv4_header_len(&[0x45; 40]), Some(20));
    assert_eq!(ipv4_header_len(&[0x46; 40]), Some(24));
    assert_eq!(ipv4_header_len(&[0x4f; 40]), None);
    assert_eq!(ipv4_header_len(&[0x65; 40]), None);
    assert_eq!(ipv4_header_len(&[]), None);
}

#[tokio::test]
async fn a_unix_dgram_unlinks_only_stale_sockets_and_removes_only_its_own() {
    let dir = TempDir::new("dgram");
    let (local, remote) = (dir.path("local.sock"), dir.path("remote.sock"));
    let options = DgramOptions { local: Some(unix(&local)), remote: Some(unix(&remote)) };
    // A regular file at the path stays, and the bind fails.
    std::fs::write(&local, "not a socket").unwrap();
    let error = prepare_dgram("n0", &options, &mut NoFds).unwrap_err();
    assert_eq!(error.to_string(), format!("can't bind unix={local} to socket: Address already in use"));
    assert_eq!(std::fs::read_to_string(&local).unwrap(), "not a socket");
    std::fs::remove_file(&local).unwrap();

    drop(prepare_dgram("n0", &options, &mut NoFds).unwrap());
    assert!(!std::path::Path::new(&local).exists(), "a backend never run leaves no file");

    let (old_ctx, _old_events) = context();
    let (_old_hub, old_task) = start(prepare_dgram("old", &options, &mut NoFds).unwrap(), &old_ctx);
    let (new_ctx, _new_events) = context();
    let (new_hub, new_task) = start(prepare_dgram("new", &options, &mut NoFds).unwrap(), &new_ctx);
    stop(&old_ctx, old_task).await;
    assert!(std::path::Path::new(&local).exists(), "the newer netdev's socket file survives the older one");
    let peer = UnixDatagram::unbound().unwrap();
    peer.send_to(&frame(7, 60), &local).unwrap();
    assert_eq!(recv_frame(&new_hub).await, frame(7, 60));
    stop(&new_ctx, new_task).await;
    assert!(!std::path::Path::new(&local).exists());
}
