//! The run loop of a datagram backend: frames from the hub are wrapped and sent to the peer,
//! datagrams from the peer are checked, unwrapped and handed to the hub.

use std::{
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    sync::Mutex,
};

use socket2::Socket;
use tokio::io::unix::AsyncFd;

use super::{Destination, L2tpFraming, own_frames::OwnFrames};
use crate::{
    backend::{
        BackendContext, BackendStats,
        socket::{Handed, MIN_FRAME, count_frame, recv_from_hub, send_to_hub, try_recv_from_hub},
    },
    model::tunnel::l2tp,
    port::pipe::{HubPipe, MAX_FRAME},
};

/// Room for an IPv4 header with options and the largest L2TPv3 header before a full frame.
pub(super) const RECEIVE_BUFFER: usize = MAX_FRAME + 60 + 8 + 8 + 4 + 256 + 4;

/// Datagrams handled per wake-up, each way.
pub(super) const BATCH: usize = 64;

/// A running datagram backend.
pub(super) struct Runner<'a> {
    pub(super) socket: AsyncFd<Socket>,
    pub(super) destination: Destination,
    pub(super) l2tp: Option<L2tpFraming>,
    pub(super) own_frames: Option<Mutex<OwnFrames>>,
    pub(super) pipe: &'a HubPipe,
    pub(super) ctx: &'a BackendContext,
}

impl Runner<'_> {
    /// Returns when the pipe closes.
    pub(super) async fn hub_to_socket(&self) {
        let mut frame = vec![0; MAX_FRAME];
        let mut packet = Vec::with_capacity(RECEIVE_BUFFER);
        let mut counter = l2tp::TxCounter::default();
        loop {
            let Some(len) = recv_from_hub(self.pipe, &mut frame, self.ctx).await else {
                return;
            };
            let mut next = Some(len);
            let mut taken = 0;
            while let Some(len) = next {
                taken += 1;
                self.send_frame(&frame[..len], &mut packet, &mut counter)
                    .await;
                next = match try_recv_from_hub(self.pipe, &mut frame, self.ctx) {
                    Err(()) => return,
                    Ok(more) if taken < BATCH => more,
                    Ok(_) => None,
                };
            }
        }
    }

    pub(super) async fn send_frame(&self, frame: &[u8], packet: &mut Vec<u8>, counter: &mut l2tp::TxCounter) {
        let stats = &self.ctx.stats;
        if frame.len() < MIN_FRAME {
            BackendStats::count(&stats.runt_frames);
            return;
        }
        let bytes = match &self.l2tp {
            Some(framing) => {
                packet.clear();
                l2tp::encode(
                    &framing.header,
                    framing.over_udp,
                    counter.next(&framing.header),
                    packet,
                );
                packet.extend_from_slice(frame);
                packet.as_slice()
            }
            None => frame,
        };
        if let Some(own) = &self.own_frames {
            own.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .record(frame);
        }
        let result = loop {
            let Ok(mut guard) = self.socket.writable().await else {
                break Err(io::Error::from(io::ErrorKind::BrokenPipe));
            };
            match guard.try_io(|socket| match &self.destination {
                Destination::Address(address) => socket.get_ref().send_to(bytes, address),
                Destination::Connected => socket.get_ref().send(bytes),
            }) {
                Ok(result) => break result,
                Err(_would_block) => {}
            }
        };
        match result {
            Ok(_) => count_frame(&stats.tx_frames, &stats.tx_bytes, frame.len()),
            Err(e) => {
                BackendStats::count(&stats.send_errors);
                tracing::debug!(netdev = %self.ctx.id, "datagram send failed: {e}");
            }
        }
    }

    /// Returns when the pipe closes.
    pub(super) async fn socket_to_hub(&self) {
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        let mut l2tp_warned = false;
        loop {
            let Ok(mut guard) = self.socket.readable().await else {
                return;
            };
            for _ in 0..BATCH {
                let received = match guard.try_io(|socket| receive(socket.get_ref(), &mut buf)) {
                    Err(_would_block) => break,
                    Ok(Err(e)) => {
                        // ICMP errors of earlier sends surface here (connection refused).
                        tracing::debug!(netdev = %self.ctx.id, "datagram receive failed: {e}");
                        continue;
                    }
                    Ok(Ok(received)) => received,
                };
                let (len, source) = received;
                let Some(frame) = self.frame_of(&buf, len, source, &mut l2tp_warned) else {
                    continue;
                };
                match send_to_hub(self.pipe, frame, self.ctx).await {
                    Handed::Failed => return,
                    Handed::Dropped => {}
                    Handed::Delivered => count_frame(&self.ctx.stats.rx_frames, &self.ctx.stats.rx_bytes, frame.len()),
                }
            }
        }
    }

    /// The frame in a received datagram, or `None` (counted) when it must not reach the hub.
    pub(super) fn frame_of<'b>(
        &self,
        buf: &'b [u8],
        len: usize,
        source: Option<SocketAddr>,
        l2tp_warned: &mut bool,
    ) -> Option<&'b [u8]> {
        let stats = &self.ctx.stats;
        let Some(mut datagram) = buf.get(..len) else {
            BackendStats::count(&stats.oversized_frames);
            return None;
        };
        if let Some(framing) = &self.l2tp {
            if framing.skip_ipv4_header {
                let Some(header_len) = ipv4_header_len(datagram) else {
                    BackendStats::count(&stats.bad_headers);
                    return None;
                };
                datagram = &datagram[header_len..];
            }
            match l2tp::frame_offset(&framing.header, framing.over_udp, datagram) {
                Ok(offset) => datagram = &datagram[offset..],
                Err(mismatch) => {
                    BackendStats::count(&stats.bad_headers);
                    if !*l2tp_warned {
                        *l2tp_warned = true;
                        tracing::info!(netdev = %self.ctx.id, "l2tpv3 header verification failed: {mismatch:?}");
                    }
                    return None;
                }
            }
        }
        if datagram.len() < MIN_FRAME {
            BackendStats::count(&stats.runt_frames);
            return None;
        }
        if datagram.len() > MAX_FRAME {
            BackendStats::count(&stats.oversized_frames);
            return None;
        }
        if let (Some(own), Some(source)) = (&self.own_frames, source)
            && own
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_own(source, datagram)
        {
            BackendStats::count(&stats.own_frames);
            return None;
        }
        Some(datagram)
    }
}

/// One datagram: its real length (may exceed `buf`: `MSG_TRUNC`) and its source.
pub(super) fn receive(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and the socket only writes initialised
    // bytes into the buffer, so it stays a valid `[u8]`.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    let (len, source) = socket.recv_from_with_flags(uninit, libc::MSG_TRUNC)?;
    Ok((len, source.as_socket()))
}

/// The length of a raw socket's IPv4 header, options included.
pub fn ipv4_header_len(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    let len = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && len >= 20 && len <= packet.len()).then_some(len)
}
