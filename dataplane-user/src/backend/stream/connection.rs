//! The connection loop of a stream backend: serve one connection at a time, accept again or
//! reconnect after it ends, and move frames between the hub and the peer in batches.

use std::{
    io,
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};

use super::{
    address::{inet_json, tcp_uri},
    Connection,
    Ended,
    Flavour,
    Listener,
    Peer,
    sockets::{connect, tune_tcp},
    Target,
};
use crate::{
    backend::socket::{Handed, MIN_FRAME, count_frame, recv_from_hub, send_to_hub, try_recv_from_hub},
    backend::{BackendContext, BackendEvent, BackendStats},
    port::pipe::{HubPipe, MAX_FRAME},
};

/// Frames taken from the hub per write to the peer.
pub(super) const BATCH: usize = 64;

/// A running backend's shared view.
pub(super) struct Runner<'a> {
    pub(super) flavour: Flavour,
    pub(super) pipe: &'a HubPipe,
    pub(super) ctx: &'a BackendContext,
}

impl Runner<'_> {
    /// Moves frames over one connection; returns false when the backend must stop (cancelled or
    /// the hub side closed).
    pub(super) async fn serve(&self, connection: Connection, peer: &Peer, link_already_up: bool) -> bool {
        let ctx = self.ctx;
        BackendStats::count(&ctx.stats.connects);
        ctx.set_info(peer.info.clone());
        if !link_already_up {
            ctx.emit(BackendEvent::Link { up: true });
        }
        if self.flavour == Flavour::Stream {
            ctx.emit(BackendEvent::StreamConnected {
                addr: peer.event_addr.clone(),
            });
        }
        let ended = match connection {
            Connection::Tcp(stream) => match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
            {
                Ok(stream) => exchange_frames(stream, self.pipe, ctx).await,
                Err(e) => Ended::PeerFailed(e),
            },
            Connection::Unix(stream) => match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream))
            {
                Ok(stream) => exchange_frames(stream, self.pipe, ctx).await,
                Err(e) => Ended::PeerFailed(e),
            },
        };
        match &ended {
            Ended::Cancelled => return false,
            Ended::PeerFailed(e) => {
                tracing::info!(netdev = %ctx.id, "stream connection failed: {e}")
            }
            Ended::Oversized => {
                tracing::warn!(netdev = %ctx.id, "oversized frame received (over {MAX_FRAME} bytes), connection closed");
            }
            Ended::PeerClosed | Ended::PipeClosed => {}
        }
        BackendStats::count(&ctx.stats.disconnects);
        ctx.emit(BackendEvent::Link { up: false });
        if self.flavour == Flavour::Stream {
            ctx.emit(BackendEvent::StreamDisconnected);
        }
        if self.flavour == Flavour::LegacySocket {
            ctx.set_info("");
        }
        !matches!(ended, Ended::PipeClosed)
    }

    pub(super) async fn idle_until_cancelled(&self) {
        tokio::select! {
            () = self.ctx.cancel.cancelled() => {}
            () = discard_hub_frames(self.pipe, self.ctx) => {}
        }
    }

    pub(super) async fn run_server(&self, listener: Listener) {
        let idle_info = match self.flavour {
            Flavour::Stream => "listening",
            Flavour::LegacySocket => "",
        };
        match &listener {
            Listener::Tcp(listener) => match listener.try_clone().and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            }) {
                Ok(listener) => loop {
                    self.ctx.set_info(idle_info);
                    let accepted = tokio::select! {
                        () = self.ctx.cancel.cancelled() => break,
                        () = discard_hub_frames(self.pipe, self.ctx) => break,
                        accepted = listener.accept() => accepted,
                    };
                    match accepted.and_then(|(stream, address)| Ok((stream.into_std()?, address))) {
                        Ok((stream, address)) => {
                            tune_tcp(&stream);
                            let peer = match self.flavour {
                                Flavour::Stream => Peer {
                                    event_addr: inet_json(address),
                                    info: tcp_uri(address),
                                },
                                Flavour::LegacySocket => Peer {
                                    event_addr: inet_json(address),
                                    info: format!(
                                        "socket: connection from {}:{}",
                                        address.ip(),
                                        address.port()
                                    ),
                                },
                            };
                            if !self.serve(Connection::Tcp(stream), &peer, false).await {
                                break;
                            }
                        }
                        Err(e) => self.accept_failed(&e).await,
                    }
                },
                Err(e) => {
                    tracing::error!(netdev = %self.ctx.id, "cannot watch the listening socket: {e}")
                }
            },
            Listener::Unix {
                listener,
                local,
                local_uri,
                ..
            } => {
                match listener.try_clone().and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    tokio::net::UnixListener::from_std(listener)
                }) {
                    Ok(listener) => loop {
                        self.ctx.set_info(idle_info);
                        let accepted = tokio::select! {
                            () = self.ctx.cancel.cancelled() => break,
                            () = discard_hub_frames(self.pipe, self.ctx) => break,
                            accepted = listener.accept() => accepted,
                        };
                        match accepted.and_then(|(stream, _)| stream.into_std()) {
                            Ok(stream) => {
                                let peer = Peer {
                                    event_addr: local.clone(),
                                    info: local_uri.clone(),
                                };
                                if !self.serve(Connection::Unix(stream), &peer, false).await {
                                    break;
                                }
                            }
                            Err(e) => self.accept_failed(&e).await,
                        }
                    },
                    Err(e) => {
                        tracing::error!(netdev = %self.ctx.id, "cannot watch the listening socket: {e}")
                    }
                }
            }
        }
        // The socket file goes with the listener (dropped here), if it is still ours.
        drop(listener);
    }

    pub(super) async fn accept_failed(&self, error: &io::Error) {
        tracing::warn!(netdev = %self.ctx.id, "accept failed: {error}");
        // Out of descriptors and the like: do not spin.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    pub(super) async fn run_reconnecting(&self, target: &Target, delay: Duration) {
        let ctx = self.ctx;
        loop {
            ctx.set_info("connecting");
            let attempt = tokio::select! {
                () = ctx.cancel.cancelled() => return,
                () = discard_hub_frames(self.pipe, self.ctx) => return,
                attempt = connect(target) => attempt,
            };
            match attempt {
                Ok((connection, peer)) => {
                    if !self.serve(connection, &peer, false).await {
                        return;
                    }
                    ctx.set_info("connecting");
                }
                Err(reason) => {
                    BackendStats::count(&ctx.stats.connect_failures);
                    tracing::debug!(netdev = %ctx.id, "{reason}");
                    ctx.set_info(format!("error: {reason}"));
                }
            }
            tokio::select! {
                () = ctx.cancel.cancelled() => return,
                () = discard_hub_frames(self.pipe, self.ctx) => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The 4-byte big-endian length framing with QEMU's size limit.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

pub fn is_oversize(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

/// Both directions at once, so that a peer that writes while we wait to write cannot deadlock us.
pub(super) async fn exchange_frames<S: AsyncRead + AsyncWrite>(
    stream: S,
    pipe: &HubPipe,
    ctx: &BackendContext,
) -> Ended {
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = FramedRead::new(read_half, codec());
    let mut writer = FramedWrite::new(write_half, codec());
    let stats = &ctx.stats;
    let peer_to_hub = async {
        loop {
            let frame = match reader.next().await {
                None => return Ended::PeerClosed,
                Some(Err(e)) if is_oversize(&e) => {
                    BackendStats::count(&stats.oversized_frames);
                    return Ended::Oversized;
                }
                Some(Err(e)) => return Ended::PeerFailed(e),
                Some(Ok(frame)) => frame,
            };
            if frame.len() < MIN_FRAME {
                BackendStats::count(&stats.runt_frames);
                continue;
            }
            match send_to_hub(pipe, &frame, ctx).await {
                Handed::Failed => return Ended::PipeClosed,
                Handed::Dropped => {}
                Handed::Delivered => count_frame(&stats.rx_frames, &stats.rx_bytes, frame.len()),
            }
        }
    };
    let hub_to_peer = async {
        let mut buf = vec![0; MAX_FRAME];
        loop {
            let Some(len) = recv_from_hub(pipe, &mut buf, ctx).await else {
                return Ended::PipeClosed;
            };
            let mut next = Some(len);
            let mut taken = 0;
            while let Some(len) = next {
                taken += 1;
                if len < MIN_FRAME {
                    BackendStats::count(&stats.runt_frames);
                } else if let Err(e) = writer.feed(Bytes::copy_from_slice(&buf[..len])).await {
                    BackendStats::count(&stats.send_errors);
                    return Ended::PeerFailed(e);
                } else {
                    count_frame(&stats.tx_frames, &stats.tx_bytes, len);
                }
                next = match try_recv_from_hub(pipe, &mut buf, ctx) {
                    Err(()) => return Ended::PipeClosed,
                    Ok(more) if taken < BATCH => more,
                    Ok(_) => None,
                };
            }
            if let Err(e) = SinkExt::<Bytes>::flush(&mut writer).await {
                BackendStats::count(&stats.send_errors);
                return Ended::PeerFailed(e);
            }
        }
    };
    tokio::select! {
        () = ctx.cancel.cancelled() => Ended::Cancelled,
        ended = peer_to_hub => ended,
        ended = hub_to_peer => ended,
    }
}

/// While nobody is connected the hub's frames have nowhere to go; returns when the pipe closes.
pub(super) async fn discard_hub_frames(pipe: &HubPipe, ctx: &BackendContext) {
    let mut buf = vec![0; MAX_FRAME];
    while recv_from_hub(pipe, &mut buf, ctx).await.is_some() {}
}
