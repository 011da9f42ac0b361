//! `x-query-netdevs` and `x-query-netdev-counters`.

use dataplane_common::{DropReason, PortCounters};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Daemon, DaemonError};
use crate::{
    model::registry::{NetdevInfo, RegistryError},
    plan,
};

/// A row of `x-query-netdev-counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PortCountersInfo {
    /// The hub port.
    pub id: String,
    /// The netdev whose interface carries it.
    pub netdev: String,
    pub ifname: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: serde_json::Map<String, Value>,
}

/// A row of `x-query-hub-macs`: a MAC a learning hub saw and the port it saw it on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HubMacInfo {
    pub mac: String,
    /// The hub port.
    pub port: String,
    /// The netdev whose interface carries it.
    pub netdev: String,
    /// Since the MAC was last seen (refreshed at most once a second).
    pub age_ms: u64,
}

impl Daemon {
    /// The MACs the hub `hubid` (its segment, if joined to others) learned and still uses: on
    /// ports that exist in the same state as when learned, seen within the ageing time. A hub
    /// that floods (two ports, `x-learning=off`) lists none.
    pub async fn hub_macs(&self, hubid: i32) -> Vec<HubMacInfo> {
        let state = self.state.lock().await;
        let Some(host) = state.host.as_ref() else { return Vec::new() };
        let plan = &state.plan;
        let Some(segment) = plan.ports.values().find(|port| port.hubid == hubid).map(|port| port.segment) else {
            return Vec::new();
        };
        if plan.flooding.contains(&segment) || plan.segments.get(&segment).is_none_or(|members| members.len() <= 2) {
            return Vec::new();
        }
        let Some(slot) = plan.segment_slots.get(&segment) else { return Vec::new() };
        let mut rows: Vec<HubMacInfo> = host
            .dataplane
            .learned_macs(*slot)
            .into_iter()
            .filter(|entry| entry.age_ns <= dataplane_common::HUB_MAC_AGE_NS)
            .filter_map(|entry| {
                let port = plan.ports.get(&entry.ifindex)?;
                (port.slot == entry.slot && port.generation == entry.generation && port.segment == segment).then(|| HubMacInfo {
                    mac: entry.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                    port: port.hubport.clone(),
                    netdev: port.netdev.clone(),
                    age_ms: entry.age_ns / 1_000_000,
                })
            })
            .collect();
        rows.sort_by(|a, b| a.mac.cmp(&b.mac));
        rows
    }

    /// The kernel dataplane's start-up report (`x-query-dataplane`).
    pub async fn dataplane(&self) -> Option<Value> {
        self.state.lock().await.host.as_ref().and_then(|host| host.dataplane.describe())
    }

    pub async fn netdevs(&self) -> Vec<NetdevInfo> {
        let state = self.state.lock().await;
        let mut infos = state.registry.info();
        for info in &mut infos {
            if let Some(device) = state.devices.get(&info.id) {
                info.ifname = Some(device.device.ifname.clone());
            }
            if let Some(backend) = state.backends.get(&info.id) {
                info.info = Some(backend.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
                let mut counters = backend.stats.to_json();
                if let (Some(tunnel), Some(host), Value::Object(map)) =
                    (state.tunnels.get(&info.id), state.host.as_ref(), &mut counters)
                {
                    let fast = host.dataplane.tunnel_counters(tunnel.port_ifindex);
                    map.insert(
                        "kernel".into(),
                        json!({
                            "encap-packets": fast.encap_packets, "encap-bytes": fast.encap_bytes,
                            "decap-packets": fast.decap_packets, "decap-bytes": fast.decap_bytes,
                            "to-user-space": fast.to_user_space, "bad-header": fast.bad_header,
                            "own-packets": fast.own_packets, "errors": fast.errors,
                            "relayed": fast.relayed, "relayed-bytes": fast.relayed_bytes,
                            "relayed-in-place": fast.relayed_in_place, "relayed-in": fast.relayed_in,
                            "relayed-in-bytes": fast.relayed_in_bytes,
                        }),
                    );
                }
                info.backend = Some(counters);
            }
        }
        infos
    }

    /// Counters of every kernel port, or of the ports of netdev `id` (a hubport or its netdev).
    pub async fn counters(&self, id: Option<&str>) -> Result<Vec<PortCountersInfo>, DaemonError> {
        let state = self.state.lock().await;
        if let Some(id) = id
            && state.registry.get(id).is_none()
        {
            return Err(RegistryError::DeviceNotFound { id: id.to_owned() }.into());
        }
        let Some(host) = state.host.as_ref() else { return Ok(Vec::new()) };
        Ok(state
            .plan
            .ports
            .values()
            .filter(|port| id.is_none_or(|id| port.hubport == id || port.netdev == id))
            .map(|port| {
                let mut counters = host.dataplane.counters(port.slot);
                // What a two-tunnel hub relays never enters the hub port; the tunnels count it.
                if let Some(tunnel) = state.tunnels.get(&port.netdev) {
                    let relayed = host.dataplane.tunnel_counters(tunnel.port_ifindex);
                    counters.rx_packets += relayed.relayed;
                    counters.rx_bytes += relayed.relayed_bytes;
                    counters.tx_packets += relayed.relayed_in;
                    counters.tx_bytes += relayed.relayed_in_bytes;
                }
                counters_info(port, &counters)
            })
            .collect())
    }
}

fn counters_info(port: &plan::Port, counters: &PortCounters) -> PortCountersInfo {
    let drops = DropReason::ALL
        .iter()
        .map(|reason| (reason.name().to_owned(), json!(counters.drops[*reason as usize])))
        .collect();
    PortCountersInfo {
        id: port.hubport.clone(),
        netdev: port.netdev.clone(),
        ifname: port.ifname.clone(),
        rx_packets: counters.rx_packets,
        rx_bytes: counters.rx_bytes,
        tx_packets: counters.tx_packets,
        tx_bytes: counters.tx_bytes,
        drops,
    }
}
