//! `vhost-user`: a vhost-user backend on a unix-socket chardev.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{backend::vhost_user::Endpoint, fd::FdSource};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VhostUserOptions {
    pub chardev: String,
    pub vhostforce: Option<bool>,
    pub queues: Option<i64>,
    /// TEMPORARY, until `chardev=` is wired to chardevs: the unix socket path of the endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_socket: Option<String>,
    /// TEMPORARY: listen on `x-socket` (default) or connect to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_server: Option<bool>,
    /// TEMPORARY: as a client, reconnect this many seconds after losing the frontend (QEMU 7.2's
    /// chardev `reconnect`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_reconnect: Option<u32>,
}

/// QEMU's `MAX_QUEUE_NUM`.
pub const MAX_QUEUES: i64 = 1024;

impl VhostUserOptions {
    pub fn validate(&self) -> Result<(), String> {
        match self.queues {
            Some(q) if !(1..=MAX_QUEUES).contains(&q) => {
                Err(format!("vhost-user number of queues must be in range [1, {MAX_QUEUES}]"))
            }
            _ => Ok(()),
        }
    }

    /// The number of queue pairs (`queues`, default 1).
    #[must_use]
    pub fn queue_pairs(&self) -> usize {
        self.queues.and_then(|q| usize::try_from(q).ok()).unwrap_or(1).max(1)
    }

    /// Whether this build can serve the netdev: only through the temporary `x-socket` until
    /// chardevs are wired.
    #[must_use]
    pub const fn has_endpoint(&self) -> bool {
        self.x_socket.is_some()
    }

    /// The backend's endpoint and queue pairs; `None` without one.
    pub fn endpoint(&self, _fds: &mut dyn FdSource) -> Result<Option<(Endpoint, usize)>, String> {
        let Some(path) = &self.x_socket else { return Ok(None) };
        let path = PathBuf::from(path);
        let endpoint = if self.x_server.unwrap_or(true) {
            if self.x_reconnect.is_some() {
                return Err("'reconnect' option is incompatible with socket in server mode".to_owned());
            }
            Endpoint::Listen(path)
        } else {
            let reconnect = self.x_reconnect.filter(|s| *s > 0).map(|s| Duration::from_secs(u64::from(s)));
            Endpoint::Connect { path, reconnect }
        };
        Ok(Some((endpoint, self.queue_pairs())))
    }
}
