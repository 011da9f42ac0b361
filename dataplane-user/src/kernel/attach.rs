//! How the programs meet the interfaces: TCX links where the kernel has them (Linux ≥ 6.6), else
//! classic TC filters (`clsact` qdisc + direct-action `cls_bpf`) through netlink, chosen once at
//! start by a trial attach on a throw-away veth. The programs are the same in both modes: TCX's
//! `TCX_NEXT` is `TC_ACT_UNSPEC`, which in a direct-action filter continues to the next filter.
//!
//! A netlink filter outlives the daemon, so netdevd marks its own: a priority of its range (one
//! per program, so hub and tunnel programs on one interface keep a defined order), a handle whose
//! major number is [`HANDLE_MAJOR`], and one of its program names. After a crash the next daemon
//! removes marked filters whose program no live process holds (a running netdevd in the same
//! namespace holds its programs open, so its filters stay).

use std::{collections::BTreeMap, path::Path};

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
    util::KernelVersion,
};
use rtnetlink::{
    packet_core::{
        NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};
use serde::Serialize;

use dataplane_common::programs;

/// How programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// TCX links (Linux ≥ 6.6): owned by the daemon's file descriptors, gone when it exits.
    Tcx,
    /// `cls_bpf` filters on a `clsact` qdisc: visible in `tc filter show`, they outlive the daemon.
    Netlink,
}

/// What the operator asked for (`--x-attach`, or `NETDEVD_X_ATTACH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachChoice {
    /// TCX if the trial attach works, else netlink.
    #[default]
    Auto,
    /// Netlink even where TCX works (so that one host can test both modes).
    Netlink,
}

impl std::str::FromStr for AttachChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "netlink" => Ok(Self::Netlink),
            other => Err(format!("'{other}' is not an attach mode: expected 'auto' or 'netlink'")),
        }
    }
}

/// Netlink priorities, lower first: the tunnel receive program sees packets before the hub
/// program on an interface that has both (it passes on what is not a tunnel's). They sit high in
/// the range so that filters other tools add without a priority (the kernel counts down from
/// 49152) run before ours, as a TCX link appended last would.
pub const PRIORITY_TUNNEL_RX: u16 = 0xcd01;
pub const PRIORITY_TUNNEL_PORT: u16 = 0xcd02;
pub const PRIORITY_HUB: u16 = 0xcd03;
/// Major number of every filter handle netdevd uses ("nd"); the minor number tells apart daemons
/// that share an interface.
pub const HANDLE_MAJOR: u16 = 0x6e64;
/// Minor numbers tried in turn when another daemon holds one on the same interface.
pub const HANDLE_MINORS: std::ops::RangeInclusive<u16> = 1..=64;

/// The netlink priority of a program, by name.
#[must_use]
pub fn priority(program: &str) -> Option<u16> {
    match program {
        programs::TUNNEL_RX => Some(PRIORITY_TUNNEL_RX),
        programs::TUNNEL_PORT => Some(PRIORITY_TUNNEL_PORT),
        programs::HUB_TC => Some(PRIORITY_HUB),
        _ => None,
    }
}

/// What start-up found out, reported by `x-query-dataplane`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DataplaneInfo {
    /// `uname -r`.
    pub kernel: String,
    pub attach_mode: AttachMode,
    /// Whether netlink mode was asked for rather than chosen by probe.
    pub forced: bool,
    /// Kernel features the programs use, by name: whether this kernel has them.
    pub features: BTreeMap<&'static str, bool>,
    /// Filters left by a previous daemon and removed at start (netlink mode).
    pub leftovers_removed: usize,
}

/// Probes the helpers the programs call. A missing one is fatal at load anyway (the verifier
/// refuses the program); probing first names it.
#[must_use]
pub fn probe_features() -> BTreeMap<&'static str, bool> {
    let helper = |helper| is_helper_supported(ProgramType::SchedClassifier, helper).unwrap_or(false);
    let mut features = BTreeMap::new();
    features.insert("bpf_redirect_peer", helper(BpfHelper::BPF_FUNC_redirect_peer));
    features.insert("bpf_redirect_neigh", helper(BpfHelper::BPF_FUNC_redirect_neigh));
    features.insert("bpf_clone_redirect", helper(BpfHelper::BPF_FUNC_clone_redirect));
    features.insert("bpf_skb_change_head", helper(BpfHelper::BPF_FUNC_skb_change_head));
    // The programs use only the MAC mode without flags (Linux 5.2), which any kernel with the
    // helper and the others above has.
    features.insert("bpf_skb_adjust_room", helper(BpfHelper::BPF_FUNC_skb_adjust_room));
    features
}

/// `uname -r`, or aya's reading of the version if that fails.
#[must_use]
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| KernelVersion::current().map_or_else(|_| "unknown".to_owned(), |v| v.to_string()),
        |name| name.release().to_string_lossy().into_owned(),
    )
}

/// Whether the kernel version alone says TCX exists (used when no trial veth can be made).
#[must_use]
pub fn tcx_by_version() -> bool {
    KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}

/// Chooses the attach mode: TCX if the trial attach on a throw-away veth worked (`trial`; `None`
/// when no veth could be made, and the kernel version decides), netlink if it did not or was
/// asked for. In netlink mode, removes what a killed daemon left first, unless `adopting`: an
/// earlier run's filters then keep forwarding until the new ones are in place, and the caller
/// removes them afterwards ([`remove_leftovers`]).
pub fn choose(choice: AttachChoice, trial: Option<bool>, adopting: bool) -> DataplaneInfo {
    let tcx = trial.unwrap_or_else(tcx_by_version);
    let mut features = probe_features();
    features.insert("tcx", tcx);
    let attach_mode = if tcx && choice == AttachChoice::Auto { AttachMode::Tcx } else { AttachMode::Netlink };
    let leftovers_removed = if attach_mode == AttachMode::Netlink && !adopting { remove_leftovers() } else { 0 };
    DataplaneInfo {
        kernel: kernel_release(),
        attach_mode,
        forced: choice == AttachChoice::Netlink,
        features,
        leftovers_removed,
    }
}

/// Which direction of an interface a filter sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// The word link pins use.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    const fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Self::Ingress => TcHandle::MIN_INGRESS,
                Self::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// A `cls_bpf` filter as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The program name the filter was attached with.
    pub name: Option<String>,
    pub program_id: Option<u32>,
}

impl Filter {
    /// The program it was attached with (aya names the filter after the program; tc shows it
    /// with the section appended).
    #[must_use]
    pub fn program(&self) -> Option<&str> {
        self.name.as_deref().and_then(|name| name.split(':').next())
    }

    /// Whether netdevd's mark is on it: its priority for that program, its handle range.
    #[must_use]
    pub fn is_marked(&self) -> bool {
        let Some(program) = self.program() else { return false };
        let handle = TcHandle::from(self.handle);
        priority(program) == Some(self.priority)
            && handle.major == HANDLE_MAJOR
            && HANDLE_MINORS.contains(&handle.minor)
    }
}

/// An error from the filter bookkeeping (netlink).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("netlink request on ifindex {ifindex} failed")]
    Netlink {
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A blocking rtnetlink socket for the few traffic-control requests the applier makes while it
/// holds the daemon's state (it runs synchronously there).
struct TcSocket {
    socket: Socket,
    sequence: u32,
}

impl TcSocket {
    fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, sequence: 0 })
    }

    /// Sends `message` and collects the replies up to the end of a dump or the acknowledgement.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        let mut replies = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "empty netlink message"));
                }
                offset += length.next_multiple_of(4);
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
                            None => Ok(replies),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        replies.push(inner);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn tc_message(ifindex: u32, parent: TcHandle) -> TcMessage {
    let mut message = TcMessage::default();
    message.header.index = i32::try_from(ifindex).unwrap_or(0);
    message.header.parent = parent;
    message
}

/// The `cls_bpf` filters on one direction of `ifindex` (none when it has no `clsact` qdisc).
pub fn filters(ifindex: u32, direction: Direction) -> Result<Vec<Filter>, AttachError> {
    let error = |source| AttachError::Netlink { ifindex, source };
    let mut socket = TcSocket::open().map_err(error)?;
    let request = RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, direction.parent()));
    let replies = match socket.request(request, NLM_F_REQUEST | NLM_F_DUMP) {
        Ok(replies) => replies,
        // No clsact qdisc (EINVAL), or the interface went away (ENODEV).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV | libc::ENOENT)) => Vec::new(),
        Err(e) => return Err(error(e)),
    };
    let mut found = Vec::new();
    for reply in replies {
        let RouteNetlinkMessage::NewTrafficFilter(message) = reply else { continue };
        let mut filter = Filter {
            priority: (message.header.info >> 16) as u16,
            handle: u32::from(message.header.handle),
            name: None,
            program_id: None,
        };
        let mut is_bpf = false;
        for attribute in &message.attributes {
            match attribute {
                TcAttribute::Kind(kind) => is_bpf = kind == "bpf",
                TcAttribute::Options(options) => {
                    for option in options {
                        match option {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => filter.name = Some(name.clone()),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.program_id = Some(*id),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // A dump also lists each priority's chain head without a handle.
        if is_bpf && filter.handle != 0 {
            found.push(filter);
        }
    }
    Ok(found)
}

/// Deletes one filter by priority and handle.
pub fn delete_filter(ifindex: u32, direction: Direction, filter: &Filter) -> Result<(), AttachError> {
    let error = |source| AttachError::Netlink { ifindex, source };
    let mut socket = TcSocket::open().map_err(error)?;
    let mut message = tc_message(ifindex, direction.parent());
    message.header.handle = TcHandle::from(filter.handle);
    // `tcm_info`: the priority in the upper half, the protocol (ETH_P_ALL, big-endian) below.
    message.header.info = (u32::from(filter.priority) << 16) | u32::from(0x0003_u16.to_be());
    socket.request(RouteNetlinkMessage::DelTrafficFilter(message), NLM_F_REQUEST | NLM_F_ACK).map(drop).map_err(error)
}

/// Removes the `clsact` qdisc of `ifindex` if no filter is left on it: one the daemon added
/// itself, so that an interface is left as it was found. `false` while filters remain; `true`
/// once the qdisc is gone (removed here, or with its interface).
pub fn remove_clsact_if_empty(ifindex: u32) -> Result<bool, AttachError> {
    if !filters(ifindex, Direction::Ingress)?.is_empty() || !filters(ifindex, Direction::Egress)?.is_empty() {
        return Ok(false);
    }
    let error = |source| AttachError::Netlink { ifindex, source };
    let mut socket = TcSocket::open().map_err(error)?;
    let mut message = tc_message(ifindex, TcHandle::CLSACT);
    message.header.handle = TcHandle { major: 0xffff, minor: 0 };
    match socket.request(RouteNetlinkMessage::DelQueueDiscipline(message), NLM_F_REQUEST | NLM_F_ACK) {
        Ok(_) => Ok(true),
        // The interface or its qdisc is gone already.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)) => Ok(true),
        Err(e) => Err(error(e)),
    }
}

/// Program ids that some live process holds a descriptor of (`prog_id:` in its fdinfo).
fn held_programs() -> std::collections::HashSet<u32> {
    let mut held = std::collections::HashSet::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return held };
    for process in processes.flatten() {
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fdinfo")) else { continue };
        for descriptor in descriptors.flatten() {
            let Ok(text) = std::fs::read_to_string(descriptor.path()) else { continue };
            for line in text.lines() {
                if let Some(id) = line.strip_prefix("prog_id:").and_then(|id| id.trim().parse().ok()) {
                    held.insert(id);
                }
            }
        }
    }
    held
}

/// The marked filters that no live process's program backs: what a daemon that exited with
/// `x-exit-preserve`, or was killed, left attached.
pub fn orphaned_filters() -> Vec<(u32, Direction, Filter)> {
    let Ok(interfaces) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut candidates = Vec::new();
    for interface in interfaces.flatten() {
        let Some(ifindex) = read_ifindex(&interface.path()) else { continue };
        for direction in [Direction::Ingress, Direction::Egress] {
            match filters(ifindex, direction) {
                Ok(found) => candidates.extend(
                    found.into_iter().filter(Filter::is_marked).map(|filter| (ifindex, direction, filter)),
                ),
                Err(error) => tracing::warn!(ifindex, error = %error, "cannot list TC filters"),
            }
        }
    }
    if candidates.is_empty() {
        return candidates;
    }
    let held = held_programs();
    candidates.retain(|(_, _, filter)| !filter.program_id.is_some_and(|id| held.contains(&id)));
    candidates
}

/// Removes the marked filters that no live process's program backs: what a daemon killed
/// without its shutdown left behind (or what an adopting daemon did not take over). Returns how
/// many went.
pub fn remove_leftovers() -> usize {
    let mut removed = 0;
    for (ifindex, direction, filter) in orphaned_filters() {
        match delete_filter(ifindex, direction, &filter) {
            Ok(()) => {
                removed += 1;
                tracing::info!(ifindex, priority = filter.priority, handle = format!("{:#x}", filter.handle),
                    program = filter.name.as_deref().unwrap_or(""), "removed a TC filter left by an earlier netdevd");
            }
            Err(error) => tracing::warn!(ifindex, error = %error, "cannot remove a leftover TC filter"),
        }
    }
    removed
}

fn read_ifindex(interface: &Path) -> Option<u32> {
    std::fs::read_to_string(interface.join("ifindex")).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(name: &str, priority: u16, handle: u32) -> Filter {
        Filter { priority, handle, name: Some(name.to_owned()), program_id: Some(1) }
    }

    #[test]
    fn only_our_priority_handle_and_name_are_ours() {
        let ours = (u32::from(HANDLE_MAJOR) << 16) | 1;
        assert!(filter("hub_tc", PRIORITY_HUB, ours).is_marked());
        assert!(filter("tunnel_rx", PRIORITY_TUNNEL_RX, ours).is_marked());
        // Another tool's program under our priority and handle, ours at another priority, and
        // ours under a foreign handle are not.
        assert!(!filter("other", PRIORITY_HUB, ours).is_marked());
        assert!(!filter("hub_tc", PRIORITY_TUNNEL_RX, ours).is_marked());
        assert!(!filter("hub_tc", PRIORITY_HUB, 1).is_marked());
        assert!(!filter("hub_tc", PRIORITY_HUB, (u32::from(HANDLE_MAJOR) << 16) | 65).is_marked());
    }

    #[test]
    fn attach_choice_parses() {
        assert_eq!("netlink".parse::<AttachChoice>(), Ok(AttachChoice::Netlink));
        assert_eq!("auto".parse::<AttachChoice>(), Ok(AttachChoice::Auto));
        assert!("tcx".parse::<AttachChoice>().is_err());
    }
}
