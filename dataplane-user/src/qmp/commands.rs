//! The commands netdevd answers, with their argument types and QEMU's results and errors.
//!
//! Extensions that QEMU does not have carry QEMU's `x-` prefix.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    fds::{SessionFds, Transport},
    protocol::{self, QmpError},
};
use crate::{
    backend::slirp::rules::{GuestTarget, parse_guestfwd},
    chardev::ChardevSpec,
    daemon::{AnnounceParameters, Daemon, DaemonError, ShutdownCause},
    netdev::{Netdev, NetdevOptions},
    qapi::{self, QapiError},
    model::{registry::RegistryError, rx_filter::RxFilterChange},
};

pub const QMP_CAPABILITIES: &str = "qmp_capabilities";

/// Every command, in the order `query-commands` lists them.
pub const ALL: &[&str] = &[
    QMP_CAPABILITIES,
    "query-version",
    "query-commands",
    "netdev_add",
    "netdev_del",
    "set_link",
    "query-rx-filter",
    "x-set-rx-filter",
    "announce-self",
    "getfd",
    "closefd",
    "quit",
    "x-exit-preserve",
    "x-query-netdevs",
    "x-query-netdev-counters",
    "x-hostfwd-add",
    "x-hostfwd-remove",
    "x-query-usernet",
    "x-query-dataplane",
    "chardev-add",
    "chardev-remove",
    "query-chardev",
    "x-query-hub-macs",
];

#[must_use]
pub fn exists(name: &str) -> bool {
    ALL.contains(&name)
}

/// The member that a command's first keyval element names when written bare (`netdev_del p0`).
#[must_use]
pub fn implied_key(name: &str) -> Option<&'static str> {
    match name {
        "netdev_add" => Some("type"),
        "netdev_del" | "x-query-netdev-counters" | "x-query-usernet" | "chardev-remove" => Some("id"),
        "x-query-hub-macs" => Some("hubid"),
        "x-hostfwd-add" | "x-hostfwd-remove" => Some("rule"),
        "set_link" | "query-rx-filter" | "x-set-rx-filter" => Some("name"),
        "getfd" | "closefd" => Some("fdname"),
        _ => None,
    }
}

/// Turns keyval text (`hubport,id=p0,hubid=0`) into a command's JSON arguments with the daemon's own
/// parsers, so the client reports the same errors the daemon would.
pub fn arguments_from_keyval(name: &str, text: &str) -> Result<Value, String> {
    match name {
        "netdev_add" => Netdev::from_keyval(text).map(|n| n.to_json()).map_err(|e| e.to_string()),
        // `-chardev` syntax, turned into chardev-add's nested form.
        "chardev-add" => ChardevSpec::from_opts(text).map(|c| c.to_json()).map_err(|e| e.to_string()),
        "set_link" => {
            let value = qapi::keyval::parse(text, implied_key(name)).map_err(|e| e.to_string())?;
            let args = SetLinkArgs::deserialize(qapi::Input::root(&value, qapi::Mode::Keyval)).map_err(|e| e.to_string())?;
            Ok(json!({"name": args.name, "up": args.up}))
        }
        "x-query-hub-macs" => {
            let value = qapi::keyval::parse(text, implied_key(name)).map_err(|e| e.to_string())?;
            let args = HubMacsArgs::deserialize(qapi::Input::root(&value, qapi::Mode::Keyval)).map_err(|e| e.to_string())?;
            Ok(json!({"hubid": args.hubid}))
        }
        "x-set-rx-filter" => {
            let value = qapi::keyval::parse(text, implied_key(name)).map_err(|e| e.to_string())?;
            let change =
                RxFilterChange::deserialize(qapi::Input::root(&value, qapi::Mode::Keyval)).map_err(|e| e.to_string())?;
            serde_json::to_value(change).map(strip_nulls).map_err(|e| e.to_string())
        }
        _ => qapi::keyval::parse(text, implied_key(name)).map_err(|e| e.to_string()),
    }
}

/// Drops absent (null) members, which QMP does not accept for optional arguments.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}

impl From<DaemonError> for QmpError {
    fn from(error: DaemonError) -> Self {
        match error {
            DaemonError::Registry(RegistryError::DeviceNotFound { .. }) => Self::device_not_found(error.to_string()),
            _ => Self::generic(error.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Capability {
    Oob,
}

#[derive(Deserialize)]
struct CapabilitiesArgs {
    enable: Option<Vec<Capability>>,
}

#[derive(Deserialize)]
struct IdArgs {
    id: String,
}

#[derive(Deserialize)]
struct SetLinkArgs {
    name: String,
    up: bool,
}

#[derive(Deserialize)]
struct RxFilterArgs {
    name: Option<String>,
}

#[derive(Deserialize)]
struct FdNameArgs {
    fdname: String,
}

#[derive(Deserialize)]
struct NoArgs {}

/// HMP's `hostfwd_add [netdev_id] rule` / `hostfwd_remove [netdev_id] rule`.
#[derive(Deserialize)]
struct HostfwdArgs {
    id: Option<String>,
    rule: String,
}

#[derive(Deserialize)]
struct OptionalIdArgs {
    id: Option<String>,
}

/// `x-query-hub-macs`'s arguments.
#[derive(Deserialize)]
struct HubMacsArgs {
    hubid: i32,
}

#[derive(Deserialize)]
struct CountersArgs {
    id: Option<String>,
}

/// `qmp_capabilities`'s arguments: whether OOB is asked for (the session records it).
pub fn capabilities_oob(arguments: &Value) -> Result<bool, QmpError> {
    let args: CapabilitiesArgs = qapi::from_json(arguments).map_err(|error| match error {
        // QEMU names list elements of this argument 'null'.
        QapiError::BadEnumValue { value, .. } => QmpError::generic(format!("Parameter 'null' does not accept value '{value}'")),
        other => other.into(),
    })?;
    Ok(args.enable.is_some_and(|caps| caps.iter().any(|c| matches!(c, Capability::Oob))))
}

/// Runs a command of a negotiated session (`qmp_capabilities` is the session's own); `fds` are
/// the descriptors passed on its connection.
pub async fn execute(daemon: &Daemon, fds: &mut SessionFds, name: &str, arguments: &Value) -> Result<Value, QmpError> {
    let empty = json!({});
    match name {
        "query-version" => {
            qapi::from_json::<NoArgs>(arguments)?;
            Ok(protocol::version_info())
        }
        "query-commands" => {
            qapi::from_json::<NoArgs>(arguments)?;
            Ok(ALL.iter().map(|name| json!({"name": name})).collect())
        }
        "netdev_add" => {
            let netdev = Netdev::from_json(arguments).map_err(|e| QmpError::generic(e.to_string()))?;
            if fds.transport() == Transport::Tcp {
                refuse_programs(&netdev)?;
            }
            daemon.add_netdev(netdev, fds).await?;
            Ok(empty)
        }
        "netdev_del" => {
            let args: IdArgs = qapi::from_json(arguments)?;
            daemon.remove_netdev(&args.id).await?;
            Ok(empty)
        }
        "set_link" => {
            let args: SetLinkArgs = qapi::from_json(arguments)?;
            daemon.set_link(&args.name, args.up).await?;
            Ok(empty)
        }
        "query-rx-filter" => {
            let args: RxFilterArgs = qapi::from_json(arguments)?;
            Ok(Value::Array(daemon.query_rx_filter(args.name.as_deref()).await?))
        }
        "announce-self" => {
            let params: AnnounceParameters = qapi::from_json(arguments)?;
            daemon.announce_self(params)?;
            Ok(empty)
        }
        "x-set-rx-filter" => {
            let change: RxFilterChange = qapi::from_json(arguments)?;
            daemon.set_rx_filter(&change).await?;
            Ok(empty)
        }
        "getfd" => {
            let args: FdNameArgs = qapi::from_json(arguments)?;
            fds.name_fd(&args.fdname)?;
            Ok(empty)
        }
        "closefd" => {
            let args: FdNameArgs = qapi::from_json(arguments)?;
            fds.close_fd(&args.fdname)?;
            Ok(empty)
        }
        "quit" => {
            qapi::from_json::<NoArgs>(arguments)?;
            daemon.shut_down(ShutdownCause::HostQmpQuit);
            Ok(empty)
        }
        "x-exit-preserve" => {
            qapi::from_json::<NoArgs>(arguments)?;
            daemon.exit_preserving(ShutdownCause::HostQmpQuit)?;
            Ok(empty)
        }
        "x-query-netdevs" => {
            qapi::from_json::<NoArgs>(arguments)?;
            serde_json::to_value(daemon.netdevs().await).map_err(|e| QmpError::generic(e.to_string()))
        }
        "x-query-netdev-counters" => {
            let args: CountersArgs = qapi::from_json(arguments)?;
            let counters = daemon.counters(args.id.as_deref()).await?;
            serde_json::to_value(counters).map_err(|e| QmpError::generic(e.to_string()))
        }
        "x-hostfwd-add" => {
            let args: HostfwdArgs = qapi::from_json(arguments)?;
            daemon.hostfwd_add(args.id.as_deref(), &args.rule).await?;
            Ok(empty)
        }
        "x-hostfwd-remove" => {
            let args: HostfwdArgs = qapi::from_json(arguments)?;
            Ok(Value::String(daemon.hostfwd_remove(args.id.as_deref(), &args.rule).await?))
        }
        "x-query-dataplane" => {
            qapi::from_json::<NoArgs>(arguments)?;
            daemon.dataplane().await.ok_or_else(|| QmpError::generic("netdevd runs without a kernel dataplane"))
        }
        "chardev-add" => {
            let spec = ChardevSpec::from_json(arguments).map_err(|e| QmpError::generic(e.qmp_text()))?;
            daemon.add_chardev(spec, fds).await.map_err(|e| QmpError::generic(e.qmp_text()))?;
            Ok(empty)
        }
        "chardev-remove" => {
            let args: IdArgs = qapi::from_json(arguments)?;
            daemon.remove_chardev(&args.id).await.map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(empty)
        }
        "query-chardev" => {
            qapi::from_json::<NoArgs>(arguments)?;
            serde_json::to_value(daemon.query_chardevs().await).map_err(|e| QmpError::generic(e.to_string()))
        }
        "x-query-hub-macs" => {
            let args: HubMacsArgs = qapi::from_json(arguments)?;
            serde_json::to_value(daemon.hub_macs(args.hubid).await).map_err(|e| QmpError::generic(e.to_string()))
        }
        "x-query-usernet" => {
            let args: OptionalIdArgs = qapi::from_json(arguments)?;
            Ok(Value::String(daemon.usernet_info(args.id.as_deref()).await?))
        }
        _ => Err(QmpError::command_not_found(format!("The command {name} has not been found"))),
    }
}

/// The first option of `netdev` that would have netdevd run a program as root: a tap's scripts
/// (QEMU's defaults included) and bridge helper, `user`'s `smb` (smbd) and `guestfwd` `cmd:`.
#[must_use]
pub fn program_option(netdev: &Netdev) -> Option<&'static str> {
    match &netdev.options {
        NetdevOptions::Tap(tap) => {
            if tap.helper.is_some() {
                Some("helper")
            } else if tap.fd.is_some() || tap.fds.is_some() {
                None
            } else if tap.script().is_some() {
                Some("script")
            } else if tap.downscript().is_some() {
                Some("downscript")
            } else {
                None
            }
        }
        NetdevOptions::User(user) => {
            let runs_command = |rule: &crate::qapi::QapiString| {
                matches!(parse_guestfwd(&rule.str), Ok(fwd) if matches!(fwd.target, GuestTarget::Exec(_)))
            };
            if user.smb.is_some() {
                Some("smb")
            } else if user.guestfwd.iter().flatten().any(runs_command) {
                Some("guestfwd")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A TCP client may be any local user (or another host): it gets no option that runs a program.
fn refuse_programs(netdev: &Netdev) -> Result<(), QmpError> {
    match program_option(netdev) {
        Some(option) => Err(QmpError::generic(format!(
            "Parameter '{option}' runs a program as root and is refused on a TCP QMP connection (use the unix socket{})",
            if matches!(option, "script" | "downscript") { ", or script=no,downscript=no" } else { "" }
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn negotiated() -> (std::sync::Arc<Daemon>, SessionFds) {
        (Daemon::new(None), SessionFds::new(Transport::Unix))
    }

    async fn call(daemon: &Daemon, fds: &mut SessionFds, name: &str, args: Value) -> Result<Value, QmpError> {
        execute(daemon, fds, name, &args).await
    }

    #[tokio::test]
    async fn netdev_lifecycle_with_qemu_errors() {
        let (daemon, mut s) = negotiated().await;
        let add = json!({"type": "hubport", "id": "n0", "hubid": 0});
        assert_eq!(call(&daemon, &mut s, "netdev_add", add.clone()).await, Ok(json!({})));
        let dup = call(&daemon, &mut s, "netdev_add", add).await.unwrap_err();
        assert_eq!((dup.class, dup.desc.as_str()), (protocol::ErrorClass::GenericError, "Duplicate ID 'n0'"));
        let list = call(&daemon, &mut s, "x-query-netdevs", json!({})).await.unwrap();
        assert_eq!(list[0]["id"], "n0");
        assert_eq!(list[0]["hubid"], 0);
        assert_eq!(call(&daemon, &mut s, "set_link", json!({"name": "n0", "up": false})).await, Ok(json!({})));
        let list = call(&daemon, &mut s, "x-query-netdevs", json!({})).await.unwrap();
        assert_eq!(list[0]["link-up"], false);
        let e = call(&daemon, &mut s, "set_link", json!({"name": "n0", "up": "yes"})).await.unwrap_err();
        assert_eq!(e.desc, "Invalid parameter type for 'up', expected: boolean");
        assert_eq!(call(&daemon, &mut s, "netdev_del", json!({"id": "n0"})).await, Ok(json!({})));
        let gone = call(&daemon, &mut s, "netdev_del", json!({"id": "n0"})).await.unwrap_err();
        assert_eq!((gone.class, gone.desc.as_str()), (protocol::ErrorClass::DeviceNotFound, "Device 'n0' not found"));
    }

    #[tokio::test]
    async fn rx_filter_queries() {
        let (daemon, mut s) = negotiated().await;
        assert_eq!(call(&daemon, &mut s, "query-rx-filter", json!({})).await, Ok(json!([])));
        call(&daemon, &mut s, "netdev_add", json!({"type": "hubport", "id": "u0", "hubid": 1})).await.unwrap();
        let e = call(&daemon, &mut s, "query-rx-filter", json!({"name": "u0"})).await.unwrap_err();
        assert_eq!(e.desc, "net client(u0) isn't a NIC");
        let e = call(&daemon, &mut s, "query-rx-filter", json!({"name": "zz"})).await.unwrap_err();
        assert_eq!(e.desc, "invalid net client name: zz");
    }

    /// Over TCP nothing that runs a program is accepted, and nothing is created.
    #[tokio::test]
    async fn tcp_clients_cannot_run_programs() {
        let daemon = Daemon::new(None);
        let mut tcp = SessionFds::new(Transport::Tcp);
        let refused = [
            (json!({"type": "tap", "id": "t", "ifname": "x0", "script": "/bin/true", "downscript": "no"}), "script"),
            (json!({"type": "tap", "id": "t", "ifname": "x0", "script": "no", "downscript": "/bin/true"}), "downscript"),
            (json!({"type": "tap", "id": "t", "ifname": "x0"}), "script"),
            (json!({"type": "tap", "id": "t", "ifname": "x0", "script": "", "downscript": ""}), ""),
            (json!({"type": "tap", "id": "t", "helper": "/usr/lib/qemu/qemu-bridge-helper", "br": "br0"}), "helper"),
            (json!({"type": "user", "id": "u", "smb": "/srv"}), "smb"),
            (json!({"type": "user", "id": "u", "guestfwd": [{"str": "tcp:10.0.2.100:80-cmd:id"}]}), "guestfwd"),
        ];
        for (arguments, option) in refused {
            let result = call(&daemon, &mut tcp, "netdev_add", arguments.clone()).await;
            if option.is_empty() {
                // script=no and downscript=no run nothing: this one gets past the check (and
                // fails later only because this daemon has no host).
                assert!(!matches!(&result, Err(e) if e.desc.contains("TCP")), "{arguments}: {result:?}");
                continue;
            }
            let error = result.expect_err("refused");
            assert_eq!(error.class, protocol::ErrorClass::GenericError);
            assert!(
                error.desc.starts_with(&format!("Parameter '{option}' runs a program as root and is refused on a TCP QMP connection")),
                "{arguments}: {}",
                error.desc
            );
        }
        assert_eq!(daemon.netdevs().await.len(), 0, "nothing was created");
        // The same netdev from the unix socket passes the check.
        let user = json!({"type": "user", "id": "u", "guestfwd": [{"str": "tcp:10.0.2.100:80-cmd:id"}]});
        assert_eq!(program_option(&Netdev::from_json(&user).unwrap()), Some("guestfwd"));
        let plain = json!({"type": "user", "id": "u", "guestfwd": [{"str": "tcp:10.0.2.100:80-tcp:127.0.0.1:1"}]});
        assert_eq!(program_option(&Netdev::from_json(&plain).unwrap()), None);
    }

    #[tokio::test]
    async fn capabilities_and_unknown_commands() {
        let (daemon, mut s) = negotiated().await;
        let e = capabilities_oob(&json!({"enable": ["foo"]})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'null' does not accept value 'foo'");
        assert_eq!(capabilities_oob(&json!({"enable": ["oob"]})), Ok(true));
        let e = call(&daemon, &mut s, "nope", json!({})).await.unwrap_err();
        assert_eq!((e.class, e.desc.as_str()), (protocol::ErrorClass::CommandNotFound, "The command nope has not been found"));
        let e = call(&daemon, &mut s, "query-version", json!({"x": 1})).await.unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
    }
}
