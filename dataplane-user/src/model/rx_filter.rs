//! A guest NIC's receive filter, with virtio-net's state and rules (QEMU `hw/net/virtio-net.c`):
//! receive modes, a 64-entry MAC table split into unicast and multicast with overflow flags, and a
//! 4096-id VLAN table. Pure: the kernel copy is derived with [`RxFilter::kernel`].

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::netdev::nic::parse_mac;

/// virtio-net's `MAC_TABLE_ENTRIES`.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// virtio-net's `MAX_VLAN`.
pub const MAX_VLAN: u16 = 4096;

/// QAPI `RxState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RxState {
    Normal,
    None,
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    pub main_mac: [u8; 6],
    /// Unicast entries, then multicast entries.
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
    pub uni_overflow: bool,
    pub multi_overflow: bool,
    /// Whether the guest negotiated VLAN filtering; without it every VLAN passes.
    pub vlan_filtering: bool,
    pub vlans: BTreeSet<u16>,
}

/// `x-set-rx-filter` arguments: the fields of `RxFilterInfo`, each optional, plus the NIC's name.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RxFilterChange {
    pub name: String,
    pub promiscuous: Option<bool>,
    pub multicast: Option<RxState>,
    pub unicast: Option<RxState>,
    pub vlan: Option<RxState>,
    pub broadcast_allowed: Option<bool>,
    pub main_mac: Option<String>,
    pub vlan_table: Option<Vec<i64>>,
    pub unicast_table: Option<Vec<String>>,
    pub multicast_table: Option<Vec<String>>,
}

impl RxFilter {
    /// A NIC as QEMU realizes it: promiscuous, empty MAC table, every VLAN allowed.
    #[must_use]
    pub fn new(main_mac: [u8; 6]) -> Self {
        Self {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            main_mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
            vlan_filtering: false,
            vlans: BTreeSet::new(),
        }
    }

    /// The filter of an endpoint that is no guest (a user-mode network stack): unicast for its own
    /// addresses only, every broadcast and multicast frame, every VLAN.
    #[must_use]
    pub fn endpoint(macs: &[[u8; 6]]) -> Self {
        let Some((main, others)) = macs.split_first() else {
            return Self { promisc: false, allmulti: true, ..Self::new([0; 6]) };
        };
        let mut filter = Self { promisc: false, allmulti: true, ..Self::new(*main) };
        filter.set_mac_table(others, &[]);
        filter
    }

    /// The filter after `change`, or an error that leaves `self` as it was.
    pub fn changed(&self, change: &RxFilterChange) -> Result<Self, String> {
        let mut next = self.clone();
        if let Some(promisc) = change.promiscuous {
            next.promisc = promisc;
        }
        if let Some(state) = change.multicast {
            (next.nomulti, next.allmulti) = (state == RxState::None, state == RxState::All);
        }
        if let Some(state) = change.unicast {
            (next.nouni, next.alluni) = (state == RxState::None, state == RxState::All);
        }
        if let Some(allowed) = change.broadcast_allowed {
            next.nobcast = !allowed;
        }
        if let Some(mac) = &change.main_mac {
            next.main_mac = parse_mac(mac).ok_or_else(|| format!("Invalid MAC address '{mac}'"))?;
        }
        if let Some(table) = &change.vlan_table {
            let mut vlans = BTreeSet::new();
            for vid in table {
                let vid = u16::try_from(*vid)
                    .ok()
                    .filter(|v| *v < MAX_VLAN)
                    .ok_or_else(|| format!("VLAN id {vid} is out of range (0 to 4095)"))?;
                vlans.insert(vid);
            }
            next.vlans = vlans;
            next.vlan_filtering = true;
        }
        match change.vlan {
            Some(RxState::All) => next.vlan_filtering = false,
            Some(RxState::None) => {
                next.vlans.clear();
                next.vlan_filtering = true;
            }
            Some(RxState::Normal) => next.vlan_filtering = true,
            None => {}
        }
        if change.unicast_table.is_some() || change.multicast_table.is_some() {
            let parse = |list: &Option<Vec<String>>, current: &[[u8; 6]]| -> Result<Vec<[u8; 6]>, String> {
                match list {
                    None => Ok(current.to_vec()),
                    Some(list) => list
                        .iter()
                        .map(|mac| parse_mac(mac).ok_or_else(|| format!("Invalid MAC address '{mac}'")))
                        .collect(),
                }
            };
            let unicast = parse(&change.unicast_table, &self.unicast)?;
            let multicast = parse(&change.multicast_table, &self.multicast)?;
            next.set_mac_table(&unicast, &multicast);
        }
        Ok(next)
    }

    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: more unicast entries than fit sets `uni_overflow` and
    /// stores none; more multicast entries than the space left sets `multi_overflow` and stores none.
    fn set_mac_table(&mut self, unicast: &[[u8; 6]], multicast: &[[u8; 6]]) {
        self.uni_overflow = unicast.len() > MAC_TABLE_ENTRIES;
        self.unicast = if self.uni_overflow { Vec::new() } else { unicast.to_vec() };
        let room = MAC_TABLE_ENTRIES - self.unicast.len();
        self.multi_overflow = multicast.len() > room;
        self.multicast = if self.multi_overflow { Vec::new() } else { multicast.to_vec() };
    }

    /// `RxFilterInfo` as QEMU's `virtio_net_query_rxfilter` fills it — including its inverted
    /// `broadcast-allowed` and its reversed lists.
    #[must_use]
    pub fn info(&self, name: &str) -> Value {
        let state = |none: bool, all: bool| {
            if none {
                "none"
            } else if all {
                "all"
            } else {
                "normal"
            }
        };
        let vlan = if !self.vlan_filtering {
            "all"
        } else if self.vlans.is_empty() {
            "none"
        } else {
            "normal"
        };
        let vlan_table: Vec<u16> = if self.vlan_filtering {
            self.vlans.iter().rev().copied().collect()
        } else {
            (0..MAX_VLAN).rev().collect()
        };
        let macs = |list: &[[u8; 6]]| list.iter().rev().map(|m| format_mac(*m)).collect::<Vec<_>>();
        json!({
            "promiscuous": self.promisc,
            "name": name,
            "main-mac": format_mac(self.main_mac),
            "unicast": state(self.nouni, self.alluni),
            "vlan": vlan,
            "vlan-table": vlan_table,
            "unicast-table": macs(&self.unicast),
            "multicast": state(self.nomulti, self.allmulti),
            "multicast-overflow": self.multi_overflow,
            "unicast-overflow": self.uni_overflow,
            "multicast-table": macs(&self.multicast),
            "broadcast-allowed": self.nobcast,
        })
    }

    /// The state behind a QEMU `RxFilterInfo` (what [`Self::info`] produces): the inverse of
    /// QEMU's mapping, its inverted `broadcast-allowed` and reversed lists included.
    pub fn from_info(info: &Value) -> Result<Self, String> {
        let field = |name: &str| info.get(name).ok_or_else(|| format!("RxFilterInfo without '{name}'"));
        let flag = |name: &str| field(name)?.as_bool().ok_or_else(|| format!("RxFilterInfo '{name}' is no boolean"));
        let state = |name: &str| -> Result<RxState, String> {
            serde_json::from_value(field(name)?.clone()).map_err(|_| format!("RxFilterInfo '{name}' is no RxState"))
        };
        let mac = |value: &Value| {
            value.as_str().and_then(parse_mac).ok_or_else(|| format!("RxFilterInfo has an invalid MAC address {value}"))
        };
        let macs = |name: &str| -> Result<Vec<[u8; 6]>, String> {
            let list = field(name)?.as_array().ok_or_else(|| format!("RxFilterInfo '{name}' is no list"))?;
            list.iter().rev().map(mac).collect()
        };
        let (unicast, multicast, vlan) = (state("unicast")?, state("multicast")?, state("vlan")?);
        let vlans = field("vlan-table")?
            .as_array()
            .ok_or("RxFilterInfo 'vlan-table' is no list")?
            .iter()
            .map(|vid| vid.as_u64().and_then(|v| u16::try_from(v).ok()).filter(|v| *v < MAX_VLAN))
            .collect::<Option<BTreeSet<u16>>>()
            .ok_or("RxFilterInfo 'vlan-table' holds an invalid VLAN id")?;
        Ok(Self {
            promisc: flag("promiscuous")?,
            allmulti: multicast == RxState::All,
            alluni: unicast == RxState::All,
            nomulti: multicast == RxState::None,
            nouni: unicast == RxState::None,
            // QEMU reports `nobcast` under this name.
            nobcast: flag("broadcast-allowed")?,
            main_mac: mac(field("main-mac")?)?,
            unicast: macs("unicast-table")?,
            multicast: macs("multicast-table")?,
            uni_overflow: flag("unicast-overflow")?,
            multi_overflow: flag("multicast-overflow")?,
            // Without VLAN filtering QEMU's bitmap is full, which is what `info` reports then.
            vlan_filtering: vlan != RxState::All,
            vlans: if vlan == RxState::All { BTreeSet::new() } else { vlans },
        })
    }
}

/// `xx:xx:xx:xx:xx:xx`, lower case, as QEMU prints MACs.
#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn change(json: Value) -> RxFilterChange {
        serde_json::from_value(json).expect("valid change")
    }

    #[test]
    fn initial_state_is_qemus() {
        let info = RxFilter::new(MAC).info("nic0");
        assert_eq!(info["promiscuous"], true);
        assert_eq!(info["main-mac"], "52:54:00:12:34:56");
        assert_eq!(info["vlan"], "all");
        assert_eq!(info["vlan-table"].as_array().map(Vec::len), Some(4096));
        assert_eq!(info["vlan-table"][0], 4095);
        assert_eq!(info["broadcast-allowed"], false, "QEMU reports nobcast, not its inverse");
        assert_eq!(info["unicast"], "normal");
    }

    #[test]
    fn modes_and_tables() {
        let filter = RxFilter::new(MAC)
            .changed(&change(json!({
                "name": "n", "promiscuous": false, "multicast": "all", "unicast": "none",
                "broadcast-allowed": false, "vlan-table": [5, 100],
                "unicast-table": ["02:00:00:00:00:01", "02:00:00:00:00:02"],
                "multicast-table": ["01:00:5e:00:00:01"]
            })))
            .unwrap();
        let info = filter.info("n");
        assert_eq!((info["multicast"].as_str(), info["unicast"].as_str()), (Some("all"), Some("none")));
        assert_eq!(info["vlan"], "normal");
        assert_eq!(info["vlan-table"], json!([100, 5]));
        assert_eq!(info["unicast-table"], json!(["02:00:00:00:00:02", "02:00:00:00:00:01"]));
        assert_eq!(info["broadcast-allowed"], true);
    }

    #[test]
    fn mac_table_overflow() {
        let many: Vec<String> = (0..65).map(|i| format!("02:00:00:00:01:{i:02x}")).collect();
        let filter = RxFilter::new(MAC).changed(&change(json!({"name": "n", "unicast-table": many}))).unwrap();
        assert!(filter.uni_overflow && filter.unicast.is_empty());
        // 60 unicast leave room for 4 multicast; 5 overflow.
        let uni: Vec<String> = (0..60).map(|i| format!("02:00:00:00:01:{i:02x}")).collect();
        let multi: Vec<String> = (0..5).map(|i| format!("01:00:5e:00:00:{i:02x}")).collect();
        let filter =
            RxFilter::new(MAC).changed(&change(json!({"name": "n", "unicast-table": uni, "multicast-table": multi}))).unwrap();
        assert!(!filter.uni_overflow && filter.unicast.len() == 60);
        assert!(filter.multi_overflow && filter.multicast.is_empty());
    }

    #[test]
    fn bad_input_changes_nothing() {
        let filter = RxFilter::new(MAC);
        assert_eq!(
            filter.changed(&change(json!({"name": "n", "vlan-table": [1, 4096]}))).unwrap_err(),
            "VLAN id 4096 is out of range (0 to 4095)"
        );
        assert_eq!(
            filter.changed(&change(json!({"name": "n", "unicast-table": ["zz"]}))).unwrap_err(),
            "Invalid MAC address 'zz'"
        );
        assert_eq!(filter, RxFilter::new(MAC));
    }

    #[test]
    fn endpoint_takes_its_own_unicast_and_every_group_frame() {
        let others = [[0x52, 0x55, 10, 0, 2, 3]];
        let filter = RxFilter::endpoint(&[[0x52, 0x55, 10, 0, 2, 2], others[0]]);
        assert!(!filter.promisc && filter.allmulti && !filter.nobcast && !filter.vlan_filtering);
        assert_eq!(filter.main_mac, [0x52, 0x55, 10, 0, 2, 2]);
        assert_eq!((filter.unicast, filter.multicast), (others.to_vec(), Vec::new()));
    }

    #[test]
    fn qemus_report_reads_back_as_the_same_state() {
        let states = [
            RxFilter::new(MAC),
            RxFilter::new(MAC)
                .changed(&change(json!({
                    "name": "n", "promiscuous": false, "multicast": "none", "unicast": "all",
                    "broadcast-allowed": false, "vlan-table": [7, 4095],
                    "unicast-table": ["02:00:00:00:00:01", "02:00:00:00:00:02"],
                    "multicast-table": ["33:33:00:00:00:01", "01:00:5e:00:00:01"]
                })))
                .unwrap(),
            RxFilter::new(MAC).changed(&change(json!({"name": "n", "vlan": "none"}))).unwrap(),
        ];
        for state in states {
            let info = state.info("net0");
            assert_eq!(RxFilter::from_info(&info).unwrap(), state, "{info}");
        }
        let mut overflow = RxFilter::new(MAC);
        overflow.set_mac_table(&[[2, 0, 0, 0, 0, 1]; 65], &[]);
        assert_eq!(RxFilter::from_info(&overflow.info("n")).unwrap(), overflow);
        // QEMU's inversion: `false` means broadcast passes.
        assert!(!RxFilter::from_info(&RxFilter::new(MAC).info("n")).unwrap().nobcast);
        assert_eq!(RxFilter::from_info(&json!({"name": "n"})).unwrap_err(), "RxFilterInfo without 'unicast'");
    }

    #[test]
    fn vlan_states() {
        let none = RxFilter::new(MAC).changed(&change(json!({"name": "n", "vlan": "none"}))).unwrap();
        assert_eq!(none.info("n")["vlan"], "none");
        assert_eq!(none.info("n")["vlan-table"], json!([]));
        let all = none.changed(&change(json!({"name": "n", "vlan": "all"}))).unwrap();
        assert_eq!(all.info("n")["vlan"], "all");
    }
}
