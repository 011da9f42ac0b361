//! `user`: QEMU's user-mode network stack, libslirp, on its own thread.

use super::{BackendContext, BackendError, HubPipe};
use crate::netdev::user::UserOptions;

#[derive(Debug)]
pub struct PreparedUser {}

pub fn prepare(id: &str, _options: &UserOptions) -> Result<PreparedUser, BackendError> {
    Err(BackendError::setup(id, "user: not yet"))
}

impl PreparedUser {
    pub async fn run(self, _pipe: HubPipe, ctx: BackendContext) {
        ctx.cancel.cancelled().await;
    }
}
