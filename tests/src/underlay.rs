//! Two daemon namespaces D1 and D2 joined by an underlay veth, and the tunnel netdev `t` each
//! daemon joins to hub 0: the set-up the tunnel suites share.

use serde_json::Value;

use crate::{Daemon, Netns, unique};

/// D1's and D2's underlay addresses.
pub const D1: &str = "192.168.77.1";
pub const D2: &str = "192.168.77.2";
pub const D1_V6: &str = "fd77::1";
pub const D2_V6: &str = "fd77::2";

/// The underlay veth between D1 and D2.
#[derive(Clone, Copy, Debug)]
pub struct Underlay {
    pub mtu: u32,
    /// Also give both ends IPv6 addresses (`fd77::1/64`, `fd77::2/64`).
    pub ipv6: bool,
    /// Multicast on both ends, with a route for 224.0.0.0/4.
    pub multicast: bool,
}

impl Underlay {
    pub const DEFAULT_MTU: Self = Self { mtu: 1500, ipv6: false, multicast: false };
    pub const JUMBO: Self = Self { mtu: 9000, ipv6: false, multicast: false };

    /// Makes D1 and D2 (quiet namespaces) and the veth between them, addressed and up, D2
    /// reachable from D1: `(d1, d2, d1's end, d2's end)`.
    #[must_use]
    pub fn build(self) -> (Netns, Netns, String, String) {
        let d1 = Netns::new("d");
        let d2 = Netns::new("d");
        for ns in [&d1, &d2] {
            ns.quiet();
        }
        let (u1, u2) = (unique("u"), unique("u"));
        d1.ip(&["link", "add", &u1, "type", "veth", "peer", "name", &u2, "netns", &d2.name]);
        let mtu = self.mtu.to_string();
        for (ns, link, v4, v6) in [(&d1, &u1, D1, D1_V6), (&d2, &u2, D2, D2_V6)] {
            ns.ip(&["link", "set", link, "mtu", &mtu]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", link]);
            if self.ipv6 {
                ns.sysctl(&format!("net.ipv6.conf.{link}.disable_ipv6"), "0");
                ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", link, "nodad"]);
            }
            if self.multicast {
                ns.ip(&["link", "set", link, "multicast", "on"]);
            }
            ns.ip(&["link", "set", link, "up"]);
            if self.multicast {
                ns.ip(&["route", "add", "224.0.0.0/4", "dev", link]);
            }
        }
        assert!(d1.ping(D2, 1), "the underlay between D1 and D2 works");
        (d1, d2, u1, u2)
    }
}

/// Adds the tunnel netdev `t` (`keyval` without its id) and joins it to hub 0 as port `pt`.
pub fn join_tunnel(daemon: &Daemon, keyval: &str) {
    daemon.add(&format!("{keyval},id=t"));
    daemon.add("hubport,id=pt,hubid=0,netdev=t");
}

/// The kernel fast-path counters of the UDP-based tunnel `t` (`backend.kernel` of
/// `x-query-netdevs`).
#[must_use]
pub fn tunnel_kernel_counters(daemon: &Daemon) -> Value {
    let backend = daemon.backend_of("t");
    let kernel = backend["kernel"].clone();
    assert!(kernel.is_object(), "a UDP-based tunnel reports kernel counters: {backend}");
    kernel
}

/// The counter `name` of a counters object; panics naming it when it is missing.
#[must_use]
pub fn counter(object: &Value, name: &str) -> u64 {
    object[name].as_u64().unwrap_or_else(|| panic!("counter {name} missing in {object}"))
}
