use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::fd::NoFds;

fn socket(data: Value) -> Value {
    json!({"id": "c0", "backend": {"type": "socket", "data": data}})
}

fn unix(path: &str) -> Value {
    json!({"type": "unix", "data": {"path": path}})
}

fn qmp_error(arguments: Value) -> String {
    ChardevSpec::from_json(&arguments).unwrap_err().qmp_text()
}

fn opts_error(text: &str) -> String {
    ChardevSpec::from_opts(text).unwrap_err().to_string()
}

#[test]
fn qmp_rules_and_texts() {
    // QEMU 7.2's answers (tests/python/test_chardev.py compares them with a running QEMU).
    let prefix = "Failed to add chardev 'c0': ";
    let cases = [
        (json!({"addr": unix("/x"), "server": true, "reconnect": 1}), "'reconnect' option is incompatible with socket in server listen mode"),
        (json!({"addr": unix("/x"), "reconnect": 1}), "'reconnect' option is incompatible with socket in server listen mode"),
        (json!({"addr": unix("/x"), "server": true, "reconnect-ms": 1}), "'reconnect-ms' option is incompatible with socket in server listen mode"),
        (json!({"addr": unix("/x"), "server": false, "wait": false}), "'wait' option is incompatible with socket in client connect mode"),
        (json!({"addr": unix("/x"), "server": false, "reconnect": 1, "reconnect-ms": 1}), "'reconnect' and 'reconnect-ms' are mutually exclusive"),
        (json!({"addr": {"type": "fd", "data": {"str": "f"}}, "server": false, "reconnect": 1}), "'reconnect' option is incompatible with 'fd' address type"),
        (json!({"addr": unix("/x"), "tls-creds": "t"}), "No TLS credentials with id 't'"),
        (json!({"addr": unix("/x"), "tls-authz": "a"}), "'tls_authz' option requires 'tls_creds' option"),
        (json!({"addr": unix("/x"), "server": false, "websocket": true}), "Websocket client is not implemented"),
        (json!({"addr": unix(&"x".repeat(120)), "server": true, "wait": false}), &format!("UNIX socket path '{}' is too long", "x".repeat(120))),
    ];
    for (data, text) in cases {
        assert_eq!(qmp_error(socket(data.clone())), format!("{prefix}{text}"), "{data}");
    }
    let null = qmp_error(json!({"id": "c0", "backend": {"type": "null", "data": {}}}));
    assert!(null.starts_with("Failed to add chardev 'c0': chardev backend 'null' is not supported by netdevd"), "{null}");
    let wait = qmp_error(socket(json!({"addr": unix("/x"), "server": true, "wait": true})));
    assert!(wait.contains("'wait=on' is not supported"), "{wait}");
    let inet = qmp_error(socket(json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "1"}}})));
    assert!(inet.contains("'inet' addresses are not supported"), "{inet}");
}

#[test]
fn qmp_defaults() {
    // QMP: a server unless told otherwise, never waiting.
    let spec = ChardevSpec::from_json(&socket(json!({"addr": unix("/run/x.sock")}))).unwrap();
    assert_eq!(spec.address, ChardevAddress::Unix { path: "/run/x.sock".into(), is_abstract: false });
    assert!(spec.server && !spec.wait && spec.reconnect.is_none());
    let client = ChardevSpec::from_json(&socket(json!({"addr": unix("/x"), "server": false, "reconnect": 2}))).unwrap();
    assert_eq!(client.reconnect, Some(Duration::from_secs(2)));
    let ms = ChardevSpec::from_json(&socket(json!({"addr": unix("/x"), "server": false, "reconnect-ms": 250}))).unwrap();
    assert_eq!(ms.reconnect, Some(Duration::from_millis(250)));
    // QEMU connects once for a delay of 0 or less.
    let zero = ChardevSpec::from_json(&socket(json!({"addr": unix("/x"), "server": false, "reconnect": 0}))).unwrap();
    assert_eq!(zero.reconnect, None);
    // chardev-add takes any id string, as QEMU's does.
    assert!(ChardevSpec::from_json(&json!({"id": "1bad", "backend": {"type": "socket", "data": {"addr": unix("/x")}}})).is_ok());
}

#[test]
fn command_line_rules_and_texts() {
    // QEMU 7.2's `-chardev` answers.
    assert_eq!(opts_error("socket,path=/x"), "chardev: no id specified");
    assert_eq!(opts_error("socket,id=1bad,path=/x"), "Parameter 'id' expects an identifier");
    assert_eq!(opts_error("bogus,id=c0"), "'bogus' is not a valid char driver name");
    assert_eq!(opts_error("socket,id=c0"), "Unable to parse FD number ");
    assert_eq!(opts_error("socket,id=c0,path=/x,fd=3"), "None or one of 'path', 'fd' or 'host' option required.");
    assert_eq!(opts_error("socket,id=c0,host=127.0.0.1"), "chardev: socket: no port given");
    assert_eq!(opts_error("socket,id=c0,path=/x,bogus=1"), "Invalid parameter 'bogus'");
    assert_eq!(opts_error("socket,id=c0,path=/x,server=maybe"), "Parameter 'server' expects 'on' or 'off'");
    assert_eq!(opts_error("socket,id=c0,path=/x,reconnect=abc"), "Parameter 'reconnect' expects a number");
    assert_eq!(opts_error("socket,id=c0,path=/x,server=off,wait=off"), "'wait' option is incompatible with socket in client connect mode");
    assert_eq!(
        opts_error("socket,id=c0,path=/x,server=on,wait=off,reconnect=1"),
        "'reconnect' option is incompatible with socket in server listen mode"
    );
    assert!(opts_error("null,id=c0").contains("'null' is not supported by netdevd"));
    // The command line's default is a client; a server does not wait even without wait=off.
    let client = ChardevSpec::from_opts("socket,id=c0,path=/x,reconnect=1").unwrap();
    assert!(!client.server);
    let server = ChardevSpec::from_opts("socket,id=c0,path=/x,server=on").unwrap();
    assert!(server.server && !server.wait);
    let fd = ChardevSpec::from_opts("socket,id=c1,fd=5,server=on,wait=off").unwrap();
    assert_eq!(fd.address, ChardevAddress::Fd { name: "5".into() });
}

#[test]
fn both_syntaxes_give_the_same_chardev() {
    let json = ChardevSpec::from_json(&socket(json!({"addr": unix("/run/a,b.sock"), "server": true, "wait": false}))).unwrap();
    let opts = ChardevSpec::from_opts("socket,id=c0,path=/run/a,,b.sock,server=on,wait=off").unwrap();
    assert_eq!(json, opts);
    assert_eq!(ChardevSpec::from_opts(&opts.to_opts()).unwrap(), opts);
    let client = ChardevSpec::from_json(&socket(json!({"addr": unix("/x"), "server": false, "reconnect-ms": 1500}))).unwrap();
    assert_eq!(ChardevSpec::from_opts(&client.to_opts()).unwrap(), client);
}

#[tokio::test]
async fn a_server_binds_at_once_and_removes_only_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let spec = ChardevSpec::from_opts(&format!("socket,id=c0,path={},server=on,wait=off", path.display())).unwrap();
    let chardev = SocketChardev::open(&spec, &mut NoFds).await.unwrap();
    assert!(chardev.listener().is_some());
    assert_eq!(chardev.filename(), format!("disconnected:unix:{},server=on", path.display()));
    std::os::unix::net::UnixStream::connect(&path).expect("a client reaches the bound socket");
    chardev.set_connected(true);
    assert_eq!(chardev.filename(), format!("unix:{},server=on", path.display()));
    drop(chardev);
    assert!(!path.exists(), "the socket file goes with the chardev");
    // A regular file at the path stays, and the bind fails.
    std::fs::write(&path, b"data").unwrap();
    let error = SocketChardev::open(&spec, &mut NoFds).await.unwrap_err();
    assert_eq!(error.qmp_text(), format!("Failed to add chardev 'c0': Failed to bind socket to {}: Address already in use", path.display()));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    // A missing directory: QEMU's text, nothing made.
    let missing = dir.path().join("nodir/s.sock");
    let spec = ChardevSpec::from_opts(&format!("socket,id=c1,path={},server=on", missing.display())).unwrap();
    let error = SocketChardev::open(&spec, &mut NoFds).await.unwrap_err();
    assert_eq!(error.to_string(), format!("Failed to bind socket to {}: No such file or directory", missing.display()));
}

#[tokio::test]
async fn a_client_connects_at_once_unless_it_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.sock");
    let spec = ChardevSpec::from_opts(&format!("socket,id=c0,path={}", path.display())).unwrap();
    let error = SocketChardev::open(&spec, &mut NoFds).await.unwrap_err();
    assert_eq!(error.to_string(), format!("Failed to connect to '{}': No such file or directory", path.display()));
    let later = ChardevSpec::from_opts(&format!("socket,id=c1,path={},reconnect=1", path.display())).unwrap();
    let waiting = SocketChardev::open(&later, &mut NoFds).await.unwrap();
    assert_eq!(waiting.filename(), format!("disconnected:unix:{}", path.display()));
    let peer = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let client = SocketChardev::open(&spec, &mut NoFds).await.unwrap();
    assert_eq!(client.filename(), "unix:");
    let (accepted, _) = peer.accept().unwrap();
    drop(accepted);
    assert_eq!(client.filename(), format!("disconnected:unix:{}", path.display()), "the peer left");
}

#[tokio::test]
async fn fd_addresses_need_a_named_socket() {
    let spec = ChardevSpec::from_json(&socket(json!({"addr": {"type": "fd", "data": {"str": "nosuch"}}, "server": false}))).unwrap();
    let error = SocketChardev::open(&spec, &mut NoFds).await.unwrap_err();
    assert_eq!(error.qmp_text(), "Failed to add chardev 'c0': File descriptor named 'nosuch' has not been found");
}

#[tokio::test]
async fn registry_busy_and_vhost_user_checks() {
    let dir = tempfile::tempdir().unwrap();
    let mut chardevs = Chardevs::default();
    let spec = ChardevSpec::from_opts(&format!("socket,id=c0,path={}/a.sock,server=on", dir.path().display())).unwrap();
    chardevs.insert(spec.clone(), SocketChardev::open(&spec, &mut NoFds).await.unwrap()).unwrap();
    assert_eq!(chardevs.check_add("c0").unwrap_err().to_string(), "Chardev with id 'c0' already exists");
    assert_eq!(chardevs.for_vhost_user("nochr").unwrap_err().to_string(), "chardev \"nochr\" not found");
    assert_eq!(chardevs.claim("c0", "v0").unwrap().id, "c0");
    assert_eq!(chardevs.claim("c0", "v1").unwrap_err().to_string(), "Device 'c0' is in use");
    assert!(chardevs.query()[0].frontend_open);
    assert_eq!(chardevs.remove("c0").unwrap_err().to_string(), "Chardev 'c0' is busy");
    chardevs.release("v0");
    assert_eq!(chardevs.user("c0"), None);
    assert!(chardevs.remove("c0").is_ok());
    assert_eq!(chardevs.remove("c0").unwrap_err().to_string(), "Chardev 'c0' not found");
    assert!(!dir.path().join("a.sock").exists());
    // An fd chardev passes no descriptors (QEMU's FD_PASS feature is for `unix` addresses).
    let (mine, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut fds = crate::qmp::fds::SessionFds::new(crate::qmp::fds::Transport::Unix);
    fds.receive(vec![std::os::fd::OwnedFd::from(mine)], false);
    fds.name_fd("sp").unwrap();
    let spec = ChardevSpec::from_json(&socket(json!({"addr": {"type": "fd", "data": {"str": "sp"}}, "server": false}))).unwrap();
    chardevs.insert(spec.clone(), SocketChardev::open(&spec, &mut fds).await.unwrap()).unwrap();
    assert_eq!(chardevs.for_vhost_user("c0").unwrap_err().to_string(), "chardev \"c0\" does not support FD passing");
    assert_eq!(chardevs.query()[0].filename, "unix:");
}
