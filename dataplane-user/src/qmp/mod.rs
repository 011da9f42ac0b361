//! The QMP control socket: framing ([`codec`]), messages ([`protocol`]), per-connection state
//! ([`session`]), commands ([`commands`]) and listeners ([`server`]).

pub mod codec;
pub mod commands;
pub mod protocol;
pub mod server;
pub mod session;
