//! `vhost-user`: a vhost-user backend on a unix-socket chardev.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VhostUserOptions {
    pub chardev: String,
    pub vhostforce: Option<bool>,
    pub queues: Option<i64>,
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
}
