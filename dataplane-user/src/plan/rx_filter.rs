//! A NIC's receive filter as the kernel holds it: what the planner puts in the plan for each port
//! with a virtio NIC behind it.

use std::collections::BTreeMap;

use dataplane_common::{RX_MAC_MULTICAST, RX_MAC_UNICAST, RxFilterConfig, RxVlanTable, rx};

use crate::model::rx_filter::RxFilter;

/// What the kernel holds of one NIC's filter: mode flags and main MAC, the VLAN bitmap, the MAC
/// table entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilterTables {
    pub config: RxFilterConfig,
    pub vlans: RxVlanTable,
    /// Address → `RX_MAC_UNICAST` or `RX_MAC_MULTICAST` (a unicast entry wins over a duplicate).
    pub macs: BTreeMap<[u8; 6], u32>,
}

impl From<&RxFilter> for RxFilterTables {
    fn from(filter: &RxFilter) -> Self {
        let mut flags = 0;
        for (on, bit) in [
            (filter.promisc, rx::PROMISC),
            (filter.allmulti, rx::ALLMULTI),
            (filter.alluni, rx::ALLUNI),
            (filter.nomulti, rx::NOMULTI),
            (filter.nouni, rx::NOUNI),
            (filter.nobcast, rx::NOBCAST),
            (filter.uni_overflow, rx::UNI_OVERFLOW),
            (filter.multi_overflow, rx::MULTI_OVERFLOW),
            (filter.vlan_filtering, rx::VLAN_FILTER),
        ] {
            if on {
                flags |= bit;
            }
        }
        let mut vlans = RxVlanTable { bits: [0; 128] };
        for vid in &filter.vlans {
            vlans.bits[usize::from(vid >> 5)] |= 1 << (vid & 31);
        }
        let macs = filter
            .unicast
            .iter()
            .map(|m| (*m, RX_MAC_UNICAST))
            .chain(filter.multicast.iter().map(|m| (*m, RX_MAC_MULTICAST)))
            .collect();
        Self { config: RxFilterConfig { flags, main_mac: filter.main_mac, _pad: [0; 2] }, vlans, macs }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::model::rx_filter::RxFilterChange;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn changed(json: Value) -> RxFilter {
        let change: RxFilterChange = serde_json::from_value(json).expect("valid change");
        RxFilter::new(MAC).changed(&change).expect("accepted change")
    }

    #[test]
    fn modes_vlans_and_macs_reach_the_tables() {
        let filter = changed(json!({
            "name": "n", "promiscuous": false, "multicast": "all", "unicast": "none",
            "broadcast-allowed": false, "vlan-table": [5, 100],
            "unicast-table": ["02:00:00:00:00:01", "02:00:00:00:00:02"],
            "multicast-table": ["01:00:5e:00:00:01"]
        }));
        let tables = RxFilterTables::from(&filter);
        assert_eq!(tables.config.flags, rx::ALLMULTI | rx::NOUNI | rx::NOBCAST | rx::VLAN_FILTER);
        assert_eq!(tables.vlans.bits[0], 1 << 5);
        assert_eq!(tables.vlans.bits[3], 1 << 4);
        assert_eq!(tables.macs.len(), 3);
    }

    #[test]
    fn overflow_and_vlan_states_reach_the_flags() {
        let uni: Vec<String> = (0..60).map(|i| format!("02:00:00:00:01:{i:02x}")).collect();
        let multi: Vec<String> = (0..5).map(|i| format!("01:00:5e:00:00:{i:02x}")).collect();
        let filter = changed(json!({"name": "n", "unicast-table": uni, "multicast-table": multi}));
        assert_eq!(RxFilterTables::from(&filter).config.flags & rx::MULTI_OVERFLOW, rx::MULTI_OVERFLOW);
        let all = changed(json!({"name": "n", "vlan": "all"}));
        assert_eq!(RxFilterTables::from(&all).config.flags & rx::VLAN_FILTER, 0);
    }
}
