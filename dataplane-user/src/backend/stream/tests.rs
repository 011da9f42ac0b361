use std::net::Ipv4Addr;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{sockets::connect_unix, *};
use crate::{
    backend::{BackendEvent, test_support::*},
    fd::NoFds,
    port::pipe::MAX_FRAME,
};

fn options(addr: SocketAddress, server: bool, reconnect_ms: Option<i64>) -> StreamOptions {
    StreamOptions {
        addr,
        server: Some(server),
        reconnect: None,
        reconnect_ms,
    }
}

fn listening_port(prepared: &PreparedStream) -> u16 {
    match &prepared.role {
        Role::Server(Listener::Tcp(listener)) => listener.local_addr().unwrap().port(),
        _ => panic!("not a TCP server"),
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(peer: &mut W, frame: &[u8]) {
    peer.write_all(&u32::try_from(frame.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    peer.write_all(frame).await.unwrap();
}

async fn read_frame<R: AsyncRead + Unpin>(peer: &mut R) -> Vec<u8> {
    let mut len = [0; 4];
    tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut len))
        .await
        .expect("a frame within 5 s")
        .unwrap();
    let mut frame = vec![0; usize::try_from(u32::from_be_bytes(len)).unwrap()];
    peer.read_exact(&mut frame).await.unwrap();
    frame
}

/// Polls `done` until it holds; the deadline is generous, only a hang reaches it.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let polled = tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "{what} did not happen within 10 s");
}

/// Runs every ready task until `done` holds, without letting a paused clock move:
/// `yield_now` never lets the runtime park, so no timer is auto-advanced.
async fn settle_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what} did not happen while the clock stood still");
}

/// Runs every ready task for a while, the clock standing still.
async fn settle() {
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn tcp_client_frames_flow_both_ways_in_batches() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let prepared = prepare_stream(
        "n0",
        &options(inet("127.0.0.1", port), false, None),
        &mut NoFds,
    )
    .await
    .unwrap();
    assert!(prepared.is_connected());
    let (mut peer, peer_address) = server.accept().await.unwrap();
    let (ctx, mut events) = context();
    let (hub, task) = start(prepared, &ctx);
    let expected =
        json!({"type": "inet", "host": "127.0.0.1", "port": port.to_string(), "ipv4": true});
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::StreamConnected { addr: expected }
    );
    assert_eq!(info(&ctx), format!("tcp:127.0.0.1:{port}"));
    assert_eq!(peer_address.ip(), Ipv4Addr::LOCALHOST);

    for tag in 0..3 {
        hub.send(&frame(tag, 60 + usize::from(tag))).await.unwrap();
    }
    for tag in 0..3 {
        assert_eq!(
            read_frame(&mut peer).await,
            frame(tag, 60 + usize::from(tag))
        );
    }
    write_frame(&mut peer, &frame(7, 1514)).await;
    write_frame(&mut peer, &frame(8, MAX_FRAME)).await;
    assert_eq!(recv_frame(&hub).await, frame(7, 1514));
    assert_eq!(recv_frame(&hub).await, frame(8, MAX_FRAME));
    assert_eq!(counter(&ctx.stats.tx_frames), 3);
    assert_eq!(counter(&ctx.stats.rx_frames), 2);
    assert_eq!(counter(&ctx.stats.rx_bytes), 1514 + 69_632);
    stop(&ctx, task).await;
}

#[tokio::test]
async fn unix_server_reaccepts_after_client_eof_and_removes_its_file() {
    let dir = TempDir::new("stream");
    let path = dir.path("server.sock");
    let prepared = prepare_stream("n0", &options(unix(&path), true, None), &mut NoFds)
        .await
        .unwrap();
    assert!(!prepared.is_connected());
    let (ctx, mut events) = context();
    let (hub, task) = start(prepared, &ctx);
    let local = json!({"type": "unix", "path": path});

    for round in 0..2_u8 {
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: true }
        );
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected {
                addr: local.clone()
            }
        );
        assert_eq!(info(&ctx), format!("unix:{path}"));
        write_frame(&mut client, &frame(round, 64)).await;
        assert_eq!(recv_frame(&hub).await, frame(round, 64));
        hub.send(&frame(round + 10, 64)).await.unwrap();
        assert_eq!(read_frame(&mut client).await, frame(round + 10, 64));
        drop(client);
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: false }
        );
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamDisconnected
        );
    }
    assert_eq!(counter(&ctx.stats.connects), 2);
    assert_eq!(counter(&ctx.stats.disconnects), 2);
    assert_eq!(info(&ctx), "listening");
    stop(&ctx, task).await;
    assert!(!std::path::Path::new(&path).exists());
}

#[tokio::test]
async fn oversized_frame_closes_the_connection_and_the_server_rearms() {
    let prepared = prepare_stream("n0", &options(inet("127.0.0.1", 0), true, None), &mut NoFds)
        .await
        .unwrap();
    let port = listening_port(&prepared);
    let (ctx, mut events) = context();
    let (hub, task) = start(prepared, &ctx);

    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let address = client.local_addr().unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Link { up: true }
    );
    let expected = json!({"type": "inet", "host": "127.0.0.1", "port": address.port().to_string(), "ipv4": true});
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::StreamConnected { addr: expected }
    );
    client
        .write_all(&u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes())
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Link { up: false }
    );
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::StreamDisconnected
    );
    assert_eq!(counter(&ctx.stats.oversized_frames), 1);
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;

    let mut again = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Link { up: true }
    );
    assert!(matches!(
        next_event(&mut events).await,
        BackendEvent::StreamConnected { .. }
    ));
    write_frame(&mut again, &frame(1, 60)).await;
    assert_eq!(recv_frame(&hub).await, frame(1, 60));
    stop(&ctx, task).await;
}

#[tokio::test]
async fn empty_and_runt_frames_are_dropped_without_stalling() {
    let prepared = prepare_stream("n0", &options(inet("127.0.0.1", 0), true, None), &mut NoFds)
        .await
        .unwrap();
    let port = listening_port(&prepared);
    let (ctx, _events) = context();
    let (hub, task) = start(prepared, &ctx);
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    write_frame(&mut client, &[]).await;
    write_frame(&mut client, &frame(3, 13)).await;
    write_frame(&mut client, &frame(4, 14)).await;
    assert_eq!(recv_frame(&hub).await, frame(4, 14));
    assert_eq!(counter(&ctx.stats.runt_frames), 2);
    hub.send(&frame(5, 10)).await.unwrap();
    hub.send(&frame(6, 60)).await.unwrap();
    assert_eq!(read_frame(&mut client).await, frame(6, 60));
    assert_eq!(counter(&ctx.stats.runt_frames), 3);
    stop(&ctx, task).await;
}

#[tokio::test]
async fn client_reconnects_after_the_delay() {
    let dir = TempDir::new("reconnect");
    let path = dir.path("peer.sock");
    let prepared = prepare_stream("n0", &options(unix(&path), false, Some(50)), &mut NoFds)
        .await
        .unwrap();
    assert!(!prepared.is_connected());
    let (ctx, mut events) = context();
    let (hub, task) = start(prepared, &ctx);

    // Nobody listens yet: attempts fail and are counted.
    wait_for("a failed connect attempt", || counter(&ctx.stats.connect_failures) >= 1).await;
    assert!(
        info(&ctx).starts_with("error: could not connect to"),
        "{}",
        info(&ctx)
    );

    let server = tokio::net::UnixListener::bind(&path).unwrap();
    let expected = json!({"type": "unix", "path": path});
    for round in 0..2_u8 {
        let (mut peer, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: true }
        );
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamConnected {
                addr: expected.clone()
            }
        );
        assert_eq!(info(&ctx), format!("unix:{path}"));
        hub.send(&frame(round, 60)).await.unwrap();
        assert_eq!(read_frame(&mut peer).await, frame(round, 60));
        drop(peer);
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::Link { up: false }
        );
        assert_eq!(
            next_event(&mut events).await,
            BackendEvent::StreamDisconnected
        );
    }
    assert_eq!(counter(&ctx.stats.connects), 2);
    stop(&ctx, task).await;
}

#[tokio::test]
async fn a_refused_connect_fails_netdev_add() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let error = prepare_stream(
        "n0",
        &options(inet("127.0.0.1", port), false, None),
        &mut NoFds,
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("could not connect to 127.0.0.1:{port}: Connection refused")
    );
    let legacy = SocketOptions {
        fd: None,
        listen: None,
        connect: Some(format!("127.0.0.1:{port}")),
        mcast: None,
        localaddr: None,
        udp: None,
    };
    let error = prepare_socket("n0", &legacy, &mut NoFds).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("could not connect to 127.0.0.1:{port}: Connection refused")
    );
}

#[tokio::test]
async fn a_port_in_use_fails_netdev_add() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let error = prepare_stream(
        "n0",
        &options(inet("127.0.0.1", port), true, None),
        &mut NoFds,
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("Failed to bind socket to 127.0.0.1:{port}: Address already in use")
    );

    let mut ranged = inet("127.0.0.1", port);
    if let SocketAddress::Inet(inet) = &mut ranged {
        inet.to = Some(port.saturating_add(20));
    }
    let prepared = prepare_stream("n0", &options(ranged, true, None), &mut NoFds)
        .await
        .unwrap();
    assert_ne!(listening_port(&prepared), port);

    let dir = TempDir::new("bind");
    let error = prepare_stream(
        "n0",
        &options(unix(&dir.path("missing/x.sock")), true, None),
        &mut NoFds,
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().starts_with("Failed to bind socket to "),
        "{error}"
    );
}

#[tokio::test]
async fn abstract_unix_server_reports_its_address() {
    let name = format!("netdevd-test-{}", std::process::id());
    let addr = SocketAddress::Unix(UnixSocketAddress {
        path: name.clone(),
        abstract_: Some(true),
        tight: None,
    });
    let prepared = prepare_stream("n0", &options(addr.clone(), true, None), &mut NoFds)
        .await
        .unwrap();
    let (ctx, mut events) = context();
    let (_hub, task) = start(prepared, &ctx);
    let SocketAddress::Unix(target) = &addr else {
        unreachable!()
    };
    let Connection::Unix(client) = connect_unix(target).unwrap() else {
        unreachable!()
    };
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Link { up: true }
    );
    let expected = json!({"type": "unix", "path": name, "abstract": true, "tight": true});
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::StreamConnected { addr: expected }
    );
    drop(client);
    stop(&ctx, task).await;
}

#[tokio::test]
async fn legacy_socket_listen_and_connect_carry_frames_with_link_events_only() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let socket_options = |listen: Option<String>, connect: Option<String>| SocketOptions {
        fd: None,
        listen,
        connect,
        mcast: None,
        localaddr: None,
        udp: None,
    };
    let server = prepare_socket(
        "n0",
        &socket_options(Some(format!("127.0.0.1:{port}")), None),
        &mut NoFds,
    )
    .await
    .unwrap();
    let (server_ctx, mut server_events) = context();
    let (server_hub, server_task) = start(server, &server_ctx);
    let client = prepare_socket(
        "n1",
        &socket_options(None, Some(format!("127.0.0.1:{port}"))),
        &mut NoFds,
    )
    .await
    .unwrap();
    let (client_ctx, _client_events) = context();
    let (client_hub, client_task) = start(client, &client_ctx);

    assert_eq!(
        next_event(&mut server_events).await,
        BackendEvent::Link { up: true }
    );
    assert!(
        info(&server_ctx).starts_with("socket: connection from 127.0.0.1:"),
        "{}",
        info(&server_ctx)
    );
    client_hub.send(&frame(1, 60)).await.unwrap();
    assert_eq!(recv_frame(&server_hub).await, frame(1, 60));
    server_hub.send(&frame(2, 60)).await.unwrap();
    assert_eq!(recv_frame(&client_hub).await, frame(2, 60));
    assert_eq!(
        info(&client_ctx),
        format!("socket: connect to 127.0.0.1:{port}")
    );

    stop(&client_ctx, client_task).await;
    assert_eq!(
        next_event(&mut server_events).await,
        BackendEvent::Link { up: false }
    );
    assert_eq!(info(&server_ctx), "");
    stop(&server_ctx, server_task).await;
}

#[tokio::test]
async fn a_socketpair_fd_is_a_connected_stream() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let prepared = PreparedStream::from_connected_fd("n0", OwnedFd::from(ours)).unwrap();
    assert!(prepared.is_connected());
    let (ctx, _events) = context();
    let (hub, task) = start(prepared, &ctx);
    theirs.set_nonblocking(true).unwrap();
    let mut theirs = tokio::net::UnixStream::from_std(theirs).unwrap();
    write_frame(&mut theirs, &frame(9, 100)).await;
    assert_eq!(recv_frame(&hub).await, frame(9, 100));
    assert!(info(&ctx).starts_with("socket: fd="));
    stop(&ctx, task).await;
}

/// The reconnect schedule on tokio's paused clock: after the peer goes away the client tries
/// again exactly one delay later, not a tick before.
#[tokio::test(start_paused = true)]
async fn after_a_disconnect_the_client_waits_exactly_one_delay() {
    const DELAY: Duration = Duration::from_millis(50);
    let dir = TempDir::new("delay");
    let path = dir.path("peer.sock");
    // A std listener polled without blocking: waiting on a tokio accept would let the paused
    // clock jump to the client's next timer.
    let server = std::os::unix::net::UnixListener::bind(&path).unwrap();
    server.set_nonblocking(true).unwrap();
    let accept = |server: &std::os::unix::net::UnixListener| match server.accept() {
        Ok((peer, _)) => Some(peer),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    };
    let reconnect_ms = i64::try_from(DELAY.as_millis()).unwrap();
    let prepared = prepare_stream("n0", &options(unix(&path), false, Some(reconnect_ms)), &mut NoFds)
        .await
        .unwrap();
    let (ctx, _events) = context();
    let (_hub, task) = start(prepared, &ctx);

    let mut peer = None;
    settle_until("the first connection", || {
        peer = peer.take().or_else(|| accept(&server));
        peer.is_some() && counter(&ctx.stats.connects) == 1
    })
    .await;
    let disconnected_at = tokio::time::Instant::now();
    drop(peer);
    settle_until("the client seeing the disconnect", || counter(&ctx.stats.disconnects) == 1).await;
    assert_eq!(tokio::time::Instant::now(), disconnected_at, "the clock moved by itself");

    // One millisecond short of the delay: no new attempt.
    tokio::time::advance(DELAY - Duration::from_millis(1)).await;
    settle().await;
    assert!(accept(&server).is_none(), "reconnected before the delay was over");
    assert_eq!(counter(&ctx.stats.connects), 1);

    // The delay is over: the client connects again.
    tokio::time::advance(Duration::from_millis(1)).await;
    let mut second = None;
    settle_until("the reconnect after one delay", || {
        second = second.take().or_else(|| accept(&server));
        second.is_some() && counter(&ctx.stats.connects) == 2
    })
    .await;
    assert_eq!(tokio::time::Instant::now() - disconnected_at, DELAY);
    assert_eq!(counter(&ctx.stats.connect_failures), 0);
    stop(&ctx, task).await;
}

#[tokio::test]
async fn a_unix_server_unlinks_only_stale_sockets_and_removes_only_its_own() {
    let dir = TempDir::new("stream");
    let path = dir.path("server.sock");
    let server = |id: &'static str| {
        let path = path.clone();
        async move { prepare_stream(id, &options(unix(&path), true, None), &mut NoFds).await }
    };
    // A regular file at the path is not a socket left behind: it stays, and the bind fails.
    std::fs::write(&path, "not a socket").unwrap();
    let error = server("n0").await.unwrap_err();
    assert_eq!(error.to_string(), format!("Failed to bind socket to {path}: Address already in use"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    std::fs::remove_file(&path).unwrap();

    // A backend prepared but never run (a netdev_add that failed later) leaves no file.
    drop(server("n0").await.unwrap());
    assert!(!std::path::Path::new(&path).exists());

    // A newer netdev takes over the path; the older one going leaves the newer one's socket.
    let (old_ctx, _old_events) = context();
    let (_old_hub, old_task) = start(server("old").await.unwrap(), &old_ctx);
    let (new_ctx, mut new_events) = context();
    let (_new_hub, new_task) = start(server("new").await.unwrap(), &new_ctx);
    stop(&old_ctx, old_task).await;
    assert!(std::path::Path::new(&path).exists(), "the newer netdev's socket file survives the older one");
    let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
    assert_eq!(next_event(&mut new_events).await, BackendEvent::Link { up: true });
    stop(&new_ctx, new_task).await;
    assert!(!std::path::Path::new(&path).exists());
}
