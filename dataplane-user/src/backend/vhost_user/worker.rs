//! [`NetDevice`]: the `VhostUserBackend` of one connection. `vhost-user-backend` runs one worker
//! thread per queue pair (rings 2i = rx and 2i+1 = tx, and tap queue i); the thread calls
//! `handle_event` for kicks, for rings being started, and for its tap queue becoming readable.

use std::{
    io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT, bitmap::BitmapMmapRegion};
use virtio_queue::QueueT;
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier},
};

use super::{
    device::{self, Negotiated},
    port::TapQueues,
    rings::{self, Memory, PairState},
};
use crate::backend::{BackendContext, BackendEvent, BackendStats};

/// Ring index within a worker thread: each thread serves one pair.
const RX: u16 = 0;
const TX: u16 = 1;

/// The backend of one frontend connection; a new one is made for every connection, so nothing
/// of an earlier frontend (memory, rings, features) survives into the next.
pub struct NetDevice {
    pairs: usize,
    taps: Arc<TapQueues>,
    ctx: BackendContext,
    features: AtomicU64,
    event_idx: AtomicBool,
    memory: Mutex<Option<Memory>>,
    states: Vec<Mutex<PairState>>,
    /// Set once the frontend started a ring: the link is then up.
    started: AtomicBool,
}

impl NetDevice {
    #[must_use]
    pub fn new(taps: Arc<TapQueues>, ctx: BackendContext) -> Self {
        let pairs = taps.len();
        Self {
            pairs,
            taps,
            ctx,
            features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            memory: Mutex::new(None),
            states: (0..pairs).map(|_| Mutex::new(PairState::new())).collect(),
            started: AtomicBool::new(false),
        }
    }

    /// The epoll id under which each worker watches its tap queue (ids up to `num_queues()` are
    /// the library's).
    #[must_use]
    pub fn tap_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated { features: self.features.load(Ordering::Acquire) }
    }

    fn stats(&self) -> &BackendStats {
        &self.ctx.stats
    }

    /// The first started ring brings the link up; a started ring of pair i > 0 attaches tap
    /// queue i, so that the kernel spreads frames over the queues the guest uses.
    fn ring_started(&self, pair: usize) {
        if !self.started.swap(true, Ordering::AcqRel) {
            tracing::info!(netdev = %self.ctx.id, "vhost-user frontend started its rings");
            self.ctx.set_info(format!("vhost-user: connected, {} queue pair(s)", self.pairs));
            self.ctx.emit(BackendEvent::Link { up: true });
        }
        self.taps.attach(pair, &self.ctx.id);
    }
}

impl VhostUserBackend for NetDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<Memory>;

    fn num_queues(&self) -> usize {
        self.pairs * 2
    }

    fn max_queue_size(&self) -> usize {
        device::MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device::offered_features(self.pairs)
    }

    fn acked_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
        let negotiated = self.negotiated();
        if let Err(error) = self.taps.configure(negotiated) {
            tracing::warn!(netdev = %self.ctx.id, %error, "tap not configured for the negotiated features");
            BackendStats::count(&self.stats().send_errors);
        }
        tracing::debug!(netdev = %self.ctx.id, features = format_args!("{features:#x}"), "vhost-user features acked");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        device::offered_protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = device::config_space(self.pairs);
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, memory: Memory) -> io::Result<()> {
        *self.memory.lock().unwrap_or_else(PoisonError::into_inner) = Some(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs).map(|pair| 0b11u64 << (2 * pair)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(error) => {
                // Without an exit event the worker could never be stopped: refuse to run it.
                tracing::error!(netdev = %self.ctx.id, %error, "no exit event for a vhost-user worker");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE reports the ring's next avail index once this returns, and the ring is
        // no longer ready: wait for the pair's worker to finish the event in hand (it holds the
        // pair's state meanwhile), so that buffers it took for a frame are used or given back
        // by then, not counted as consumed.
        if let Some(state) = usize::try_from(queue_index / 2).ok().and_then(|pair| self.states.get(pair)) {
            drop(state.lock().unwrap_or_else(PoisonError::into_inner));
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, _evset: EventSet, vrings: &[Self::Vring], thread_id: usize) -> io::Result<()> {
        // Errors returned here end the worker thread: every problem is counted instead.
        let pair = thread_id;
        let (Some(rx), Some(tx), Some(state), Some(tap)) =
            (vrings.first(), vrings.get(1), self.states.get(pair), self.taps.queue(pair))
        else {
            return Ok(());
        };
        let Some(memory) = self.memory.lock().unwrap_or_else(PoisonError::into_inner).clone() else { return Ok(()) };
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let negotiated = self.negotiated();
        if u64::from(device_event) == self.tap_event() {
            state.tap_event();
        }
        let ready = |vring: &Self::Vring| {
            let guard = vring.get_ref();
            guard.get_queue().ready() && guard.is_enabled()
        };
        match device_event {
            RX | TX => {
                let vring = if device_event == RX { rx } else { tx };
                if ready(vring) {
                    self.ring_started(pair);
                }
                if device_event == TX && ready(tx) {
                    rings::process_tx(pair, tap, tx, &memory, negotiated, self.stats(), self.event_idx.load(Ordering::Acquire));
                }
                // An rx kick means new buffers: frames waiting on the tap can go now.
                if ready(rx) {
                    rings::process_rx(pair, tap, rx, &memory, negotiated, &mut state, self.stats());
                }
            }
            event if u64::from(event) == self.tap_event() && ready(rx) => {
                rings::process_rx(pair, tap, rx, &memory, negotiated, &mut state, self.stats());
            }
            _ => {}
        }
        Ok(())
    }
}
