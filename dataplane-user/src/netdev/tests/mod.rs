//! Schema, keyval and validation tests for every netdev type, against QEMU's error texts
//! (reference: `qemu-netdev.md` §2.4, §3.4, §5, §7).
//!
//! Conventions: every error text is compared verbatim with `to_string()`, which is what `netdev_add`
//! answers as the `desc` of a `GenericError` (the only class `netdev_add` uses). Schema errors must
//! come from parsing ([`NetdevError::Qapi`], [`NetdevError::Keyval`] or the id check), rule errors
//! from [`Netdev::validate`] ([`NetdevError::Invalid`]); the helpers below check that, so a message
//! produced at the wrong stage fails too.

mod keyval;
mod properties;
mod schema;
mod valid_forms;
mod validation;

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

impl Netdev {
    /// The same netdev under another id (for comparing forms written with different ids).
    fn with_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.id);
        self
    }
}
