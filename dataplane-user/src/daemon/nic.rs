//! Guest NICs: their receive filters (`x-set-rx-filter`, `query-rx-filter`), default MACs and
//! QEMU's self-announcement (`announce-self`).

use std::{collections::HashSet, time::Duration};

use serde_json::Value;

use super::{Daemon, DaemonError, Event, State};
use crate::{
    model::rx_filter::{RxFilter, RxFilterChange},
    netdev::{Netdev, NetdevOptions},
    plan,
};

/// `announce-self` arguments (`AnnounceParameters`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AnnounceParameters {
    /// Milliseconds before the second round.
    pub initial: i64,
    /// Upper bound of a delay, in milliseconds.
    pub max: i64,
    pub rounds: i64,
    /// Milliseconds added to the delay after each round.
    pub step: i64,
    /// NIC names; all NICs when absent.
    pub interfaces: Option<Vec<String>>,
    /// Names the timer: the same id replaces it, `rounds: 0` stops it.
    pub id: Option<String>,
}

/// `announce-self` timers that may run at once (distinct `id`s).
pub const MAX_ANNOUNCE_TIMERS: usize = 64;

impl AnnounceParameters {
    /// QEMU's bounds on the announce timing (`migrate_params_check`, with its texts): a client
    /// cannot ask for a RARP flood or a timer that never ends.
    pub fn check(&self) -> Result<(), String> {
        for (name, value, max) in
            [("initial", self.initial, 100_000), ("max", self.max, 100_000), ("rounds", self.rounds, 1000), ("step", self.step, 10_000)]
        {
            if !(0..=max).contains(&value) {
                return Err(format!("Parameter '{name}' expects a value between 0 and {max}"));
            }
        }
        Ok(())
    }

    /// QEMU's `qemu_announce_timer_step`: the wait after `sent` rounds (≥ 1), clamped to `max`.
    #[must_use]
    pub fn delay_after(&self, sent: i64) -> Duration {
        let delay = self.initial.saturating_add((sent - 1).saturating_mul(self.step));
        let delay = if delay < 0 || delay > self.max { self.max } else { delay };
        Duration::from_millis(u64::try_from(delay).unwrap_or(0))
    }
}

/// QEMU's self-announcement (`net/announce.c`): a 60-byte gratuitous RARP from `mac`.
#[must_use]
pub fn announce_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut frame = [0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035_u16.to_be_bytes()); // RARP
    frame[14..16].copy_from_slice(&1_u16.to_be_bytes()); // hardware: Ethernet
    frame[16..18].copy_from_slice(&0x0800_u16.to_be_bytes()); // protocol: IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3_u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    frame
}

impl Daemon {
    /// `x-set-rx-filter`: what a guest driver would program, as a map update; emits
    /// `NIC_RX_FILTER_CHANGED` once until the next `query-rx-filter` of that NIC.
    pub async fn set_rx_filter(&self, change: &RxFilterChange) -> Result<(), DaemonError> {
        let mut state = self.state.lock().await;
        let name = change.name.as_str();
        let current = nic_filter(&state, name)?.clone();
        let next = current.changed(change).map_err(DaemonError::Rejected)?;
        state.rx_filters.insert(name.to_owned(), next);
        state.registry.mark_changed(name);
        if let Err(error) = state.replan() {
            state.rx_filters.insert(name.to_owned(), current);
            return Err(error);
        }
        self.notify_filter_changed(&mut state, name);
        tracing::info!(nic = %name, "receive filter set");
        Ok(())
    }

    /// `NIC_RX_FILTER_CHANGED`, once until the next `query-rx-filter` of that NIC (as QEMU).
    pub(super) fn notify_filter_changed(&self, state: &mut State, name: &str) {
        if state.rx_notify_disarmed.insert(name.to_owned()) {
            self.emit(Event::NicRxFilterChanged { nic: name.to_owned() });
        }
    }

    /// `query-rx-filter`: every NIC with a receive filter, or the one named; re-arms the event
    /// for each NIC reported.
    pub async fn query_rx_filter(&self, name: Option<&str>) -> Result<Vec<Value>, DaemonError> {
        let mut state = self.state.lock().await;
        let names: Vec<String> = match name {
            Some(name) => {
                nic_filter(&state, name)?;
                vec![name.to_owned()]
            }
            None => state
                .registry
                .entries()
                .filter(|e| supports_rx_filter(&e.netdev))
                .map(|e| e.netdev.id.clone())
                .collect(),
        };
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            if let Some(filter) = state.rx_filters.get(&name) {
                infos.push(filter.info(&name));
            }
            state.rx_notify_disarmed.remove(&name);
        }
        Ok(infos)
    }

    /// `announce-self`: (re)starts the timer `params.id`; the first round goes out now. Finished
    /// timers are forgotten, and at most [`MAX_ANNOUNCE_TIMERS`] run at once.
    pub fn announce_self(&self, params: AnnounceParameters) -> Result<(), DaemonError> {
        params.check().map_err(DaemonError::Rejected)?;
        let id = params.id.clone().unwrap_or_default();
        let mut timers = self.announce_timers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        timers.retain(|_, timer| !timer.is_finished());
        if let Some(previous) = timers.remove(&id) {
            previous.abort();
        }
        if params.rounds <= 0 {
            return Ok(());
        }
        if timers.len() >= MAX_ANNOUNCE_TIMERS {
            return Err(DaemonError::Rejected(format!(
                "too many announce-self timers: at most {MAX_ANNOUNCE_TIMERS} may run at once"
            )));
        }
        let me = self.me.clone();
        let task = tokio::spawn(async move {
            for sent in 0..params.rounds {
                if sent > 0 {
                    tokio::time::sleep(params.delay_after(sent)).await;
                }
                let Some(daemon) = me.upgrade() else { return };
                daemon.announce_round(params.interfaces.as_deref()).await;
            }
        });
        timers.insert(id, task);
        Ok(())
    }

    /// `announce-self` timers still running.
    #[must_use]
    pub fn announce_timers(&self) -> usize {
        let mut timers = self.announce_timers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        timers.retain(|_, timer| !timer.is_finished());
        timers.len()
    }

    /// One round: every NIC (or the named ones) sends its RARP towards its backend, that is into
    /// the interface behind it, where the hub (if any) floods it. QEMU announces the NIC's
    /// configured MAC, whatever the guest set as its filter's main MAC since.
    async fn announce_round(&self, interfaces: Option<&[String]>) {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        let Some(host) = state.host.as_mut() else { return };
        for entry in state.registry.entries() {
            let nic = entry.netdev.id.as_str();
            let Some(mac) = state.nic_macs.get(nic) else { continue };
            if interfaces.is_some_and(|names| !names.iter().any(|n| n == nic)) {
                continue;
            }
            // The backend's interface: the NIC's netdev, or the netdev behind its hub port.
            let Some(device) = entry.peer.as_deref().and_then(|backend| {
                state.devices.get(backend).or_else(|| {
                    state.registry.get(backend).and_then(|port| port.peer.as_deref()).and_then(|n| state.devices.get(n))
                })
            }) else {
                continue;
            };
            let hook = match device.device.hub_side {
                plan::HubSide::Interface => plan::Hook::Ingress,
                plan::HubSide::Fd => plan::Hook::Egress,
            };
            if let Err(error) = host.dataplane.inject(device.device.ifindex, hook, &announce_frame(*mac)) {
                tracing::warn!(nic, %error, "announce-self");
            }
        }
    }
}

/// QEMU's `qemu_macaddr_default_if_unset`: the lowest 52:54:00:12:34:XX, XX from 0x56 to 0xfe,
/// that no NIC has.
pub(super) fn default_mac<'m>(taken: impl Iterator<Item = &'m [u8; 6]>) -> [u8; 6] {
    const PREFIX: [u8; 5] = [0x52, 0x54, 0x00, 0x12, 0x34];
    let used: HashSet<u8> = taken.filter(|mac| mac[..5] == PREFIX).map(|mac| mac[5]).collect();
    // QEMU falls back to the first index once all are taken.
    let last = (0x56..=0xfe).find(|index| !used.contains(index)).unwrap_or(0x56);
    [0x52, 0x54, 0x00, 0x12, 0x34, last]
}

/// Only virtio-net NICs keep a receive filter QEMU can report (the default model here).
fn supports_rx_filter(netdev: &Netdev) -> bool {
    matches!(&netdev.options, NetdevOptions::Nic(nic) if nic.model.as_deref().is_none_or(|m| m.starts_with("virtio")))
}

/// The filter of NIC `name`, or QEMU's error for a name that is not one.
fn nic_filter<'s>(state: &'s State, name: &str) -> Result<&'s RxFilter, DaemonError> {
    let entry = state
        .registry
        .get(name)
        .ok_or_else(|| DaemonError::Rejected(format!("invalid net client name: {name}")))?;
    if !matches!(entry.netdev.options, NetdevOptions::Nic(_)) {
        return Err(DaemonError::Rejected(format!("net client({name}) isn't a NIC")));
    }
    if !supports_rx_filter(&entry.netdev) {
        return Err(DaemonError::Rejected(format!("net client({name}) doesn't support rx-filter querying")));
    }
    state
        .rx_filters
        .get(name)
        .ok_or_else(|| DaemonError::Rejected(format!("net client({name}) doesn't support rx-filter querying")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(initial: i64, max: i64, rounds: i64, step: i64) -> AnnounceParameters {
        AnnounceParameters { initial, max, rounds, step, interfaces: None, id: None }
    }

    #[test]
    fn announce_delays_grow_by_step_up_to_max() {
        let p = params(50, 550, 5, 100);
        let delays: Vec<u64> = (1..5).map(|sent| p.delay_after(sent).as_millis() as u64).collect();
        assert_eq!(delays, vec![50, 150, 250, 350]);
        let capped = params(100, 150, 4, 100);
        assert_eq!(capped.delay_after(3), Duration::from_millis(150));
        // QEMU clamps a negative delay to max too.
        assert_eq!(params(-5, 20, 2, 0).delay_after(1), Duration::from_millis(20));
    }

    #[test]
    fn announce_parameters_have_qemus_bounds() {
        assert_eq!(params(50, 550, 5, 100).check(), Ok(()));
        assert_eq!(params(0, 0, 0, 0).check(), Ok(()));
        assert_eq!(params(100_000, 100_000, 1000, 10_000).check(), Ok(()));
        let error = |p: AnnounceParameters| p.check().unwrap_err();
        assert_eq!(error(params(100_001, 550, 5, 100)), "Parameter 'initial' expects a value between 0 and 100000");
        assert_eq!(error(params(-1, 550, 5, 100)), "Parameter 'initial' expects a value between 0 and 100000");
        assert_eq!(error(params(50, 100_001, 5, 100)), "Parameter 'max' expects a value between 0 and 100000");
        assert_eq!(error(params(50, 550, 1001, 100)), "Parameter 'rounds' expects a value between 0 and 1000");
        assert_eq!(error(params(50, 550, 5, 10_001)), "Parameter 'step' expects a value between 0 and 10000");
    }

    #[tokio::test]
    async fn announce_timers_are_capped_and_finished_ones_forgotten() {
        let daemon = Daemon::new(None);
        let long = |id: usize| AnnounceParameters { id: Some(format!("t{id}")), ..params(100_000, 100_000, 1000, 0) };
        for id in 0..MAX_ANNOUNCE_TIMERS {
            daemon.announce_self(long(id)).unwrap();
        }
        let refused = daemon.announce_self(long(MAX_ANNOUNCE_TIMERS)).unwrap_err();
        assert_eq!(refused.to_string(), "too many announce-self timers: at most 64 may run at once");
        // The same id replaces its timer; `rounds: 0` stops it and frees a place.
        daemon.announce_self(long(0)).unwrap();
        daemon.announce_self(AnnounceParameters { id: Some("t0".into()), ..params(0, 0, 0, 0) }).unwrap();
        assert_eq!(daemon.announce_timers(), MAX_ANNOUNCE_TIMERS - 1);
        // A one-round timer finishes at once (no dataplane here) and is forgotten.
        daemon.announce_self(AnnounceParameters { id: Some("once".into()), ..params(0, 0, 1, 0) }).unwrap();
        for _ in 0..100 {
            if daemon.announce_timers() == MAX_ANNOUNCE_TIMERS - 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(daemon.announce_timers(), MAX_ANNOUNCE_TIMERS - 1);
        daemon.announce_self(long(MAX_ANNOUNCE_TIMERS)).unwrap();
    }

    #[test]
    fn default_macs_take_the_lowest_free_index() {
        let mac = |last| [0x52, 0x54, 0, 0x12, 0x34, last];
        assert_eq!(default_mac([].iter()), mac(0x56));
        assert_eq!(default_mac([mac(0x56), mac(0x58)].iter()), mac(0x57));
        assert_eq!(default_mac([mac(0x56), mac(0x57), [2, 0, 0, 0, 0, 0x58]].iter()), mac(0x58));
    }

    #[test]
    fn announce_frame_is_qemus_rarp() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frame = announce_frame(mac);
        assert_eq!(&frame[..14], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x80, 0x35]);
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[0; 4]);
        assert_eq!(&frame[32..38], &mac);
        assert!(frame[38..].iter().all(|b| *b == 0));
    }
}

