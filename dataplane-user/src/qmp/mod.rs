//! The QMP control socket: framing ([`codec`]), messages and event encoding ([`protocol`]),
//! per-connection state ([`session`]) and its passed descriptors ([`fds`]), commands
//! ([`commands`]) and listeners ([`server`]).

pub mod codec;
pub mod commands;
pub mod fds;
pub mod protocol;
pub mod server;
pub mod session;
