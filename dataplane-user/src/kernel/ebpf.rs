//! [`Dataplane`] on the real kernel: the `dataplane-ebpf` object loaded with aya.

use std::collections::HashMap;

use std::collections::HashSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        LinkOrder, ProgramError,
        links::{FdLink, PinnedLink}, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError, TcHandle},
    },
    util::nr_cpus,
};
use dataplane_common::{
    BigHubMembers, HUB_FLAG_LEARNING, HubMacEntry, HubMacKey, HubMember, HubMembers, INLINE_HUB_PORTS, LearnedMac,
    MAX_HUB_MONITORS, MAX_HUB_PORTS, MEMBER_MONITOR, PortConfig, PortCounters, RxFilterConfig, RxMacKey, RxVlanTable,
    SlotPort, TunnelConfig, TunnelCounters, TunnelRxKey, maps, programs,
};

use super::{
    Dataplane, KernelError, LearnedEntry, RemovedSlots,
    attach::{self, AttachMode, DataplaneInfo},
    pins::{self, PinDir},
};
use crate::plan::{Hook, RxFilterTables, TunnelProgram};

/// Where the object comes from.
#[derive(Debug, Clone)]
pub enum ObjectSource {
    /// Built into the daemon at compile time.
    Embedded,
    File(std::path::PathBuf),
}

impl ObjectSource {
    /// The embedded object if this build has one, else nothing.
    #[must_use]
    pub fn default_source() -> Option<Self> {
        cfg!(embedded_bpf).then_some(Self::Embedded)
    }
}

#[cfg(embedded_bpf)]
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("NETDEVD_BPF_OBJECT_PATH"));
#[cfg(not(embedded_bpf))]
static EMBEDDED_OBJECT: &[u8] = &[];

/// A program hooked to an interface: owned by its program (netlink filters, and TCX links when
/// nothing is pinned), or a TCX link pinned in bpffs, which outlives the daemon.
enum Attachment {
    Program(SchedClassifierLinkId),
    Pinned(PinnedLink),
}

/// What an earlier run on this state directory left hooked to an interface, for this run to swap
/// its program into in place: a TCX link of the same ABI by its pin, or a netlink filter of
/// netdevd's no live process holds, by priority and handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Earlier {
    Link(std::path::PathBuf),
    Filter { priority: u16, handle: u32 },
}

/// The key of an earlier attachment: program, interface, direction.
type EarlierKey = (String, u32, attach::Direction);

const fn direction_of(attach_type: TcAttachType) -> attach::Direction {
    match attach_type {
        TcAttachType::Ingress => attach::Direction::Ingress,
        // Custom parents are never used.
        _ => attach::Direction::Egress,
    }
}

pub struct EbpfDataplane {
    /// Owns the programs and links; dropping it detaches every port.
    ebpf: Ebpf,
    /// Where maps and TCX links are pinned; `None` without bpffs.
    pins: Option<PinDir>,
    /// Tells this run's link pins from an earlier run's.
    run_stem: String,
    /// Link pins made so far, for unique names.
    pinned_count: u64,
    /// The ABI hash of the loaded object.
    abi: String,
    ports: BpfHashMap<MapData, u32, PortConfig>,
    hubs: Array<MapData, HubMembers>,
    big_hubs: BpfHashMap<MapData, u32, BigHubMembers>,
    slot_ports: Array<MapData, SlotPort>,
    hub_macs: BpfHashMap<MapData, HubMacKey, HubMacEntry>,
    counters: PerCpuArray<MapData, PortCounters>,
    learned: Array<MapData, LearnedMac>,
    rx_filters: BpfHashMap<MapData, u32, RxFilterConfig>,
    rx_vlans: BpfHashMap<MapData, u32, RxVlanTable>,
    rx_macs: BpfHashMap<MapData, RxMacKey, u32>,
    links: HashMap<u32, Attachment>,
    tunnels: BpfHashMap<MapData, u32, TunnelConfig>,
    tunnel_rx: BpfHashMap<MapData, TunnelRxKey, u32>,
    tunnel_counters: PerCpuHashMap<MapData, u32, TunnelCounters>,
    tunnel_links: HashMap<(u32, TunnelProgram), Attachment>,
    cpus: usize,
    mode: AttachMode,
    /// What start-up probed, once the mode is chosen.
    info: Option<DataplaneInfo>,
    /// Interfaces whose `clsact` qdisc netdevd added (netlink mode), in this run or an earlier
    /// one of the instance (recorded with the pins): removed again with the last filter on them.
    clsact_added: HashSet<u32>,
    /// An earlier run's attachments not taken over yet ([`Self::find_earlier`]).
    earlier: HashMap<EarlierKey, Earlier>,
    /// How many of them this run took over in place.
    taken_over: usize,
}

const fn tunnel_program_name(program: TunnelProgram) -> &'static str {
    match program {
        TunnelProgram::Rx => programs::TUNNEL_RX,
        TunnelProgram::Port => programs::TUNNEL_PORT,
    }
}

/// Creates zeroed per-CPU counters for `key` unless it has some (a port keeps its counts while
/// its configuration changes).
fn ensure_counters<T: aya::Pod + Default + Clone>(
    map: &mut PerCpuHashMap<MapData, u32, T>,
    name: &'static str,
    key: u32,
    cpus: usize,
) -> Result<(), KernelError> {
    if map.get(&key, 0).is_ok() {
        return Ok(());
    }
    let zeroes = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(|e| KernelError::Map { map: name, source: boxed(e) })?;
    map.insert(key, zeroes, 0).map_err(|e| KernelError::Map { map: name, source: boxed(e) })
}

/// Per-CPU values folded into one with `add`; zero when the lookup failed.
fn summed<T: aya::Pod + Default, E>(per_cpu: Result<PerCpuValues<T>, E>, add: fn(&mut T, &T)) -> T {
    per_cpu.map_or_else(
        |_| T::default(),
        |per_cpu| {
            per_cpu.iter().fold(T::default(), |mut sum, cpu| {
                add(&mut sum, cpu);
                sum
            })
        },
    )
}

/// aya-log's global in the object: the most verbose level its log statements emit.
const KERNEL_LOG_LEVEL: &str = "AYA_LOG_LEVEL";

/// netdevd's most verbose log level as aya-log's (`Error` = 1 … `Trace` = 5, 0 for none).
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

/// Drains the programs' log ring (aya-log) into netdevd's log, where the records appear with the
/// programs' module as target (`dataplane::tunnel`). Needs the runtime; without one (a unit test)
/// the records stay in the ring.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::debug!(%error, "the eBPF object has no log ring");
            return;
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        // SAFETY: the logger owns the ring's map fd, open and the same for as long as it lives,
        // and the `AsyncFd` owns the logger.
        let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let mut ring = match registered.map_err(std::io::Error::from) {
            Ok(ring) => ring,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the eBPF log ring: kernel program logs are lost");
                return;
            }
        };
        loop {
            let Ok(mut ready) = ring.readable_mut().await else { return };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_coarse_ns` (which lags it by a tick at most).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// A segment's `HUBS` value and, for a segment of more than [`INLINE_HUB_PORTS`] ports, its
/// `BIG_HUBS` list. Learning pays off with three ports or more (with two there is one possible
/// destination), and needs the monitors listed: with more than the kernel lists, the segment
/// floods.
fn segment_value(members: &[HubMember], learning: bool) -> (HubMembers, Option<Box<BigHubMembers>>) {
    let members = &members[..members.len().min(MAX_HUB_PORTS)];
    let mut value = HubMembers {
        count: u32::try_from(members.len()).unwrap_or(0),
        flags: 0,
        monitor_count: 0,
        _reserved: 0,
        monitors: [HubMember::default(); MAX_HUB_MONITORS],
        members: [HubMember::default(); INLINE_HUB_PORTS],
    };
    let monitors: Vec<&HubMember> = members.iter().filter(|m| m.flags & MEMBER_MONITOR != 0).collect();
    if learning && members.len() > 2 && monitors.len() <= MAX_HUB_MONITORS {
        value.flags |= HUB_FLAG_LEARNING;
        for (entry, monitor) in value.monitors.iter_mut().zip(&monitors) {
            *entry = **monitor;
        }
        value.monitor_count = u32::try_from(monitors.len()).unwrap_or(0);
    }
    if members.len() <= INLINE_HUB_PORTS {
        for (entry, member) in value.members.iter_mut().zip(members) {
            *entry = *member;
        }
        return (value, None);
    }
    let mut big = Box::new(BigHubMembers { members: [HubMember::default(); MAX_HUB_PORTS] });
    for (entry, member) in big.members.iter_mut().zip(members) {
        *entry = *member;
    }
    (value, Some(big))
}

fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(error)
}

/// The object's bytes and a name for errors.
fn object_bytes(source: &ObjectSource) -> Result<(String, std::borrow::Cow<'static, [u8]>), KernelError> {
    match source {
        ObjectSource::Embedded => Ok(("<embedded>".to_owned(), std::borrow::Cow::Borrowed(EMBEDDED_OBJECT))),
        ObjectSource::File(path) => {
            let name = path.display().to_string();
            let bytes = std::fs::read(path).map_err(|e| KernelError::Load { path: name.clone(), source: boxed(e) })?;
            Ok((name, std::borrow::Cow::Owned(bytes)))
        }
    }
}

/// The ABI hash of the object `source` names (see [`pins`]).
pub fn abi_hash(source: &ObjectSource) -> Result<String, KernelError> {
    let (name, bytes) = object_bytes(source)?;
    pins::abi_hash(&bytes).map_err(|e| KernelError::Load { path: name, source: e.into() })
}

/// 8 random hex digits.
fn random_stem() -> String {
    let mut bytes = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    format!("{:08x}", u32::from_ne_bytes(bytes) ^ std::process::id())
}

impl EbpfDataplane {
    /// Loads the object; with `pins` (the directory of ABI `abi`), every map is re-opened from its
    /// pin there if an earlier run left one, else created and pinned.
    pub fn load(source: &ObjectSource, pins: Option<PinDir>, abi: &str) -> Result<Self, KernelError> {
        let (name, bytes) = object_bytes(source)?;
        let load_error = |source| KernelError::Load { path: name.clone(), source };
        let abi = abi.to_owned();
        let pinned_names = match &pins {
            Some(_) => pins::pinned_map_names(&bytes).map_err(|e| load_error(e.into()))?,
            None => Vec::new(),
        };
        // The programs' log statements above netdevd's level are dead code to the verifier.
        let level = kernel_log_level();
        let mut loader = EbpfLoader::new();
        loader.override_global(KERNEL_LOG_LEVEL, &level, false);
        if let Some(pins) = &pins {
            for map in &pinned_names {
                loader.map_pin_path(map, pins.maps().join(map));
            }
        }
        let mut ebpf = loader.load(&bytes).map_err(|e| load_error(boxed(e)))?;
        for name in [programs::HUB_TC, programs::INJECT, programs::TUNNEL_RX, programs::TUNNEL_PORT] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_error(format!("the object has no {name} program").into()))?
                .try_into()
                .map_err(|e| load_error(boxed(e)))?;
            program.load().map_err(|e| load_error(boxed(e)))?;
            if let Ok(Some(count)) = program.info().map(|info| info.verified_instruction_count()) {
                tracing::debug!(program = name, instructions = count, "verified");
            }
        }
        forward_kernel_logs(&mut ebpf);
        let mut take = |map: &'static str| {
            ebpf.take_map(map).ok_or_else(|| load_error(format!("the object has no {map} map").into()))
        };
        let ports = BpfHashMap::try_from(take(maps::PORTS)?).map_err(|e| load_error(boxed(e)))?;
        let hubs = Array::try_from(take(maps::HUBS)?).map_err(|e| load_error(boxed(e)))?;
        let big_hubs = BpfHashMap::try_from(take(maps::BIG_HUBS)?).map_err(|e| load_error(boxed(e)))?;
        let slot_ports = Array::try_from(take(maps::SLOT_PORTS)?).map_err(|e| load_error(boxed(e)))?;
        let hub_macs = BpfHashMap::try_from(take(maps::HUB_MACS)?).map_err(|e| load_error(boxed(e)))?;
        let counters = PerCpuArray::try_from(take(maps::PORT_COUNTERS)?).map_err(|e| load_error(boxed(e)))?;
        let learned = Array::try_from(take(maps::LEARNED_MACS)?).map_err(|e| load_error(boxed(e)))?;
        let rx_filters = BpfHashMap::try_from(take(maps::RX_FILTERS)?).map_err(|e| load_error(boxed(e)))?;
        let rx_vlans = BpfHashMap::try_from(take(maps::RX_VLANS)?).map_err(|e| load_error(boxed(e)))?;
        let rx_macs = BpfHashMap::try_from(take(maps::RX_MACS)?).map_err(|e| load_error(boxed(e)))?;
        let tunnels = BpfHashMap::try_from(take(maps::TUNNELS)?).map_err(|e| load_error(boxed(e)))?;
        let tunnel_rx = BpfHashMap::try_from(take(maps::TUNNEL_RX)?).map_err(|e| load_error(boxed(e)))?;
        let tunnel_counters =
            PerCpuHashMap::try_from(take(maps::TUNNEL_COUNTERS)?).map_err(|e| load_error(boxed(e)))?;
        let cpus = nr_cpus().map_err(|(_, e)| load_error(boxed(e)))?;
        let clsact_added = pins.as_ref().map(PinDir::clsact_added).unwrap_or_default().into_iter().collect();
        Ok(Self {
            ebpf,
            pins,
            run_stem: random_stem(),
            pinned_count: 0,
            abi,
            ports,
            hubs,
            big_hubs,
            slot_ports,
            hub_macs,
            counters,
            learned,
            rx_filters,
            rx_vlans,
            rx_macs,
            links: HashMap::new(),
            tunnels,
            tunnel_rx,
            tunnel_counters,
            tunnel_links: HashMap::new(),
            cpus,
            mode: AttachMode::Tcx,
            info: None,
            clsact_added,
            earlier: HashMap::new(),
            taken_over: 0,
        })
    }

    /// Attaches the hub program to `ifname` with TCX and detaches it again: whether this kernel
    /// has TCX links.
    pub fn trial_tcx(&mut self, ifname: &str) -> bool {
        match self.program().attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default())) {
            Ok(link) => {
                let _ = self.program().detach(link);
                true
            }
            Err(error) => {
                tracing::debug!(%error, "TCX trial attach");
                false
            }
        }
    }

    /// Uses `info.attach_mode` from now on.
    pub fn set_info(&mut self, info: DataplaneInfo) {
        self.mode = info.attach_mode;
        self.info = Some(info);
    }

    /// Notes what an earlier run left attached, for [`Self::attach_program`] to take over in
    /// place rather than attach beside: in TCX mode the link pins of this ABI (`link_pins`), in
    /// netlink mode netdevd's filters that no live process holds. Called once, in the chosen
    /// mode, before adoption; what is not taken over stays for the caller to remove afterwards.
    pub fn find_earlier(&mut self, link_pins: &[std::path::PathBuf]) {
        self.earlier.clear();
        match self.mode {
            AttachMode::Tcx => {
                for path in link_pins {
                    if let Some(key) = pins::parse_link_pin(path) {
                        self.earlier.entry(key).or_insert_with(|| Earlier::Link(path.clone()));
                    }
                }
            }
            AttachMode::Netlink => {
                for (ifindex, direction, filter) in attach::orphaned_filters() {
                    let Some(program) = filter.program() else { continue };
                    let key = (program.to_owned(), ifindex, direction);
                    self.earlier.entry(key).or_insert(Earlier::Filter { priority: filter.priority, handle: filter.handle });
                }
            }
        }
        tracing::debug!(found = self.earlier.len(), "earlier attachments to take over");
    }

    /// How many earlier attachments this run took over in place (its program swapped in).
    #[must_use]
    pub const fn taken_over(&self) -> usize {
        self.taken_over
    }

    /// Swaps program `name` into an earlier run's attachment, atomically: a frame meets the old
    /// program or the new one, and the attachment (link id, filter handle) stays what it was.
    /// TCX: `BPF_LINK_UPDATE` on the pinned link, which is then pinned under this run's name
    /// before the earlier name goes. Netlink: the filter is replaced at its priority and handle
    /// (a `RTM_NEWTFILTER` without `NLM_F_CREATE`/`NLM_F_EXCL`, `tc filter replace`), which
    /// `cls_bpf` swaps in with one RCU pointer update.
    fn take_over(
        &mut self,
        name: &'static str,
        ifindex: u32,
        ifname: &str,
        attach_type: TcAttachType,
        earlier: Earlier,
    ) -> Result<Attachment, Box<dyn std::error::Error + Send + Sync>> {
        match earlier {
            Earlier::Link(path) => {
                let pinned = PinnedLink::from_pin(&path)?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
                let program = classifier(&mut self.ebpf, name);
                // aya's `attach_to_link` is `BPF_LINK_UPDATE` with the link's and the program's fds.
                let id = program.attach_to_link(link)?;
                let fd_link = FdLink::try_from(program.take_link(id)?)?;
                self.pinned_count += 1;
                let pins = self.pins.as_ref().ok_or("nothing is pinned")?;
                let new_path = pins.links().join(pins::link_pin_name(
                    name,
                    ifindex,
                    direction_of(attach_type),
                    &self.run_stem,
                    self.pinned_count,
                ));
                // The new pin first: the link always has a pin (or this run's fd) holding it.
                let pinned = fd_link.pin(&new_path)?;
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(pin = %path.display(), %error, "cannot remove an earlier run's link pin");
                }
                Ok(Attachment::Pinned(pinned))
            }
            Earlier::Filter { priority, handle } => {
                let link = SchedClassifierLink::attached(ifname, attach_type, priority, TcHandle::from(handle), None)?;
                Ok(Attachment::Program(classifier(&mut self.ebpf, name).attach_to_link(link)?))
            }
        }
    }

    /// Attaches `name` at `attach_type` of `ifname` in the chosen mode: in place of what an
    /// earlier run left there if it left something, else anew.
    fn attach_program(
        &mut self,
        name: &'static str,
        ifindex: u32,
        ifname: &str,
        attach_type: TcAttachType,
    ) -> Result<Attachment, KernelError> {
        let attach_error = |source| KernelError::Attach { ifname: ifname.to_owned(), source };
        if let Some(earlier) = self.earlier.remove(&(name.to_owned(), ifindex, direction_of(attach_type))) {
            match self.take_over(name, ifindex, ifname, attach_type, earlier.clone()) {
                Ok(attachment) => {
                    self.taken_over += 1;
                    tracing::debug!(ifname, program = name, ?earlier, "earlier attachment taken over in place");
                    return Ok(attachment);
                }
                // Attached beside it instead; the earlier one goes after adoption.
                Err(error) => tracing::warn!(ifname, program = name, ?earlier, %error,
                    "cannot take over an earlier run's attachment: attaching beside it"),
            }
        }
        if self.mode == AttachMode::Tcx {
            // TCX (kernel ≥ 6.6): a link per interface, appended after any there is (an earlier
            // run's, which goes once this one runs), gone with the interface, or with the daemon
            // unless pinned.
            let program = classifier(&mut self.ebpf, name);
            let id = program
                .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(|e| attach_error(boxed(e)))?;
            let Some(pins) = &self.pins else { return Ok(Attachment::Program(id)) };
            self.pinned_count += 1;
            let path = pins.links().join(pins::link_pin_name(
                name,
                ifindex,
                direction_of(attach_type),
                &self.run_stem,
                self.pinned_count,
            ));
            let link = program.take_link(id).map_err(|e| attach_error(boxed(e)))?;
            let fd_link = FdLink::try_from(link).map_err(|e| attach_error(boxed(e)))?;
            // A link that cannot be pinned is detached as it drops here: the attach fails.
            return fd_link.pin(&path).map(Attachment::Pinned).map_err(|e| attach_error(boxed(e)));
        }
        match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => {
                self.clsact_added.insert(ifindex);
                if let Some(pins) = &self.pins {
                    pins.record_clsact(ifindex);
                }
            }
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(attach_error(boxed(e))),
        }
        let priority = attach::priority(name).unwrap_or(attach::PRIORITY_HUB);
        // The first handle of the range no other daemon on this interface holds.
        let mut last_error = None;
        for minor in attach::HANDLE_MINORS {
            let options = NlOptions { priority, handle: TcHandle::new(attach::HANDLE_MAJOR, minor), classid: None };
            match classifier(&mut self.ebpf, name).attach_with_options(ifname, attach_type, TcAttachOptions::Netlink(options)) {
                Ok(link) => return Ok(Attachment::Program(link)),
                Err(ProgramError::TcError(TcError::NetlinkError(e))) if e.raw_os_error() == Some(libc::EEXIST) => {
                    last_error = Some(e);
                }
                Err(e) => {
                    self.forget_clsact(ifindex);
                    return Err(attach_error(boxed(e)));
                }
            }
        }
        self.forget_clsact(ifindex);
        Err(attach_error(last_error.map_or_else(|| "no free filter handle".into(), boxed)))
    }

    /// Removes the `clsact` qdisc of `ifindex` if netdevd added it and no filter is left. Not
    /// only in netlink mode: an earlier run in netlink mode may have added it.
    fn forget_clsact(&mut self, ifindex: u32) {
        if !self.clsact_added.contains(&ifindex) {
            return;
        }
        match attach::remove_clsact_if_empty(ifindex) {
            Ok(true) => {
                self.clsact_added.remove(&ifindex);
                if let Some(pins) = &self.pins {
                    pins.forget_clsact(ifindex);
                }
            }
            // Another filter still uses it (a program of ours in the other direction, or
            // another tool's added since): it stays.
            Ok(false) => {}
            Err(error) => tracing::debug!(ifindex, %error, "clsact removal"),
        }
    }

    fn program(&mut self) -> &mut SchedClassifier {
        classifier(&mut self.ebpf, programs::HUB_TC)
    }

    /// Detaches `attachment` of program `name`; a vanished interface is not an error.
    fn release(&mut self, name: &'static str, ifindex: u32, attachment: Attachment) {
        match attachment {
            Attachment::Program(id) => {
                if let Err(error) = classifier(&mut self.ebpf, name).detach(id) {
                    // The interface may already be gone, which detaches the link by itself.
                    tracing::debug!(ifindex, %error, "detach");
                }
            }
            // Unpinned and closed, the link has no reference left and detaches.
            Attachment::Pinned(link) => match link.unpin() {
                Ok(link) => drop(link),
                Err(error) => tracing::warn!(ifindex, %error, "cannot unpin a link"),
            },
        }
    }

}

/// One of the classifiers `load` checked.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    // `load` checked that the program exists and has this type.
    ebpf.program_mut(name)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .expect("the classifiers were checked at load")
}

impl Drop for EbpfDataplane {
    /// Detaches every program explicitly (dropping `ebpf` would too) so that the `clsact` qdiscs
    /// the daemon added can go after them.
    fn drop(&mut self) {
        let hub_links: Vec<u32> = self.links.keys().copied().collect();
        for ifindex in hub_links {
            self.detach(ifindex);
        }
        let tunnel_links: Vec<(u32, TunnelProgram)> = self.tunnel_links.keys().copied().collect();
        for (ifindex, program) in tunnel_links {
            self.detach_tunnel(ifindex, program);
        }
        let added: Vec<u32> = self.clsact_added.iter().copied().collect();
        for ifindex in added {
            self.forget_clsact(ifindex);
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn attach(&mut self, ifindex: u32, ifname: &str, hook: Hook) -> Result<(), KernelError> {
        let attach_type = match hook {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        };
        let link = self.attach_program(programs::HUB_TC, ifindex, ifname, attach_type)?;
        self.links.insert(ifindex, link);
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) {
        if let Some(link) = self.links.remove(&ifindex) {
            self.release(programs::HUB_TC, ifindex, link);
        }
        self.forget_clsact(ifindex);
    }

    fn set_port(&mut self, ifindex: u32, config: PortConfig, member: HubMember) -> Result<(), KernelError> {
        let slot_port = SlotPort { member, segment_slot: config.segment_slot, generation: config.generation };
        self.slot_ports
            .set(config.slot, slot_port, 0)
            .map_err(|e| KernelError::Map { map: maps::SLOT_PORTS, source: boxed(e) })?;
        self.ports.insert(ifindex, config, 0).map_err(|e| KernelError::Map { map: maps::PORTS, source: boxed(e) })
    }

    fn remove_port(&mut self, ifindex: u32, slot: u32) {
        let _ = self.ports.remove(&ifindex);
        // The next port at this slot starts from zero. Array entries cannot be deleted, only
        // overwritten; a slot outside the map has nothing to clear.
        if let Ok(zeroes) = PerCpuValues::try_from(vec![PortCounters::default(); self.cpus]) {
            let _ = self.counters.set(slot, zeroes, 0);
        }
        let _ = self.learned.set(slot, LearnedMac::default(), 0);
        // Learned MACs pointing here stop matching: no port has generation 0. `forget_learned`
        // deletes them afterwards.
        let _ = self.slot_ports.set(slot, SlotPort::default(), 0);
    }

    fn set_segment(&mut self, slot: u32, members: &[HubMember], learning: bool) -> Result<(), KernelError> {
        let (value, big) = segment_value(members, learning);
        // A big list before the count that sends frames to it; a small one after it.
        if let Some(big) = &big {
            self.big_hubs.insert(slot, **big, 0).map_err(|e| KernelError::Map { map: maps::BIG_HUBS, source: boxed(e) })?;
        }
        self.hubs.set(slot, value, 0).map_err(|e| KernelError::Map { map: maps::HUBS, source: boxed(e) })?;
        if big.is_none() {
            let _ = self.big_hubs.remove(&slot);
        }
        Ok(())
    }

    fn remove_segment(&mut self, slot: u32) {
        let _ = self.set_segment(slot, &[], false);
    }

    fn forget_learned(&mut self, removed: &RemovedSlots) {
        // Keys first: deleting while iterating a hash map can skip entries.
        let stale: Vec<HubMacKey> = self
            .hub_macs
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, entry)| removed.ports.contains(&entry.slot) || removed.segments.contains(&key.segment_slot))
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            let _ = self.hub_macs.remove(&key);
        }
    }

    fn learned_macs(&self, slot: u32) -> Vec<LearnedEntry> {
        let now = monotonic_ns();
        self.hub_macs
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.segment_slot == slot)
            .map(|(key, entry)| LearnedEntry {
                mac: key.mac,
                ifindex: entry.ifindex,
                slot: entry.slot,
                generation: entry.generation,
                age_ns: now.saturating_sub(entry.seen_ns),
            })
            .collect()
    }

    fn set_rx_filter(
        &mut self,
        ifindex: u32,
        filter: &RxFilterTables,
        old: Option<&RxFilterTables>,
    ) -> Result<(), KernelError> {
        let key = |mac: [u8; 6]| RxMacKey { ifindex, mac, _pad: [0; 2] };
        // Table entries and VLANs first, modes last: the filter tightens only once it is complete.
        for (mac, kind) in &filter.macs {
            self.rx_macs
                .insert(key(*mac), *kind, 0)
                .map_err(|e| KernelError::Map { map: maps::RX_MACS, source: boxed(e) })?;
        }
        self.rx_vlans
            .insert(ifindex, filter.vlans, 0)
            .map_err(|e| KernelError::Map { map: maps::RX_VLANS, source: boxed(e) })?;
        self.rx_filters
            .insert(ifindex, filter.config, 0)
            .map_err(|e| KernelError::Map { map: maps::RX_FILTERS, source: boxed(e) })?;
        for mac in old.into_iter().flat_map(|o| o.macs.keys()) {
            if !filter.macs.contains_key(mac) {
                let _ = self.rx_macs.remove(&key(*mac));
            }
        }
        Ok(())
    }

    fn remove_rx_filter(&mut self, ifindex: u32, old: &RxFilterTables) {
        let _ = self.rx_filters.remove(&ifindex);
        let _ = self.rx_vlans.remove(&ifindex);
        for mac in old.macs.keys() {
            let _ = self.rx_macs.remove(&RxMacKey { ifindex, mac: *mac, _pad: [0; 2] });
        }
    }

    fn inject(&mut self, ifindex: u32, hook: Hook, frame: &[u8]) -> Result<(), KernelError> {
        // `struct __sk_buff` (192 bytes) with `cb[0]` = the port and `cb[1]` = the redirect flags.
        const CB_OFFSET: usize = 48;
        let mut ctx = [0u8; 192];
        let flags: u32 = match hook {
            // `BPF_F_INGRESS` from <linux/bpf.h>.
            Hook::Ingress => 1,
            Hook::Egress => 0,
        };
        ctx[CB_OFFSET..CB_OFFSET + 4].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[CB_OFFSET + 4..CB_OFFSET + 8].copy_from_slice(&flags.to_ne_bytes());
        let program: &SchedClassifier = self
            .ebpf
            .program(programs::INJECT)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .ok_or_else(|| KernelError::Inject { ifindex, source: "no inject program".into() })?;
        program
            .test_run(TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ..TestRunOptions::default() })
            .map(drop)
            .map_err(|e| KernelError::Inject { ifindex, source: boxed(e) })
    }

    fn counters(&self, slot: u32) -> PortCounters {
        summed(self.counters.get(&slot, 0), PortCounters::accumulate)
    }

    fn set_tunnel(&mut self, port_ifindex: u32, config: &TunnelConfig) -> Result<(), KernelError> {
        ensure_counters(&mut self.tunnel_counters, maps::TUNNEL_COUNTERS, port_ifindex, self.cpus)?;
        let mut config = *config;
        // The L2TPv3 counter goes on from where the program left it.
        if let Ok(current) = self.tunnels.get(&port_ifindex, 0) {
            config.counter = current.counter;
        }
        self.tunnels.insert(port_ifindex, config, 0).map_err(|e| KernelError::Map { map: maps::TUNNELS, source: boxed(e) })
    }

    fn remove_tunnel(&mut self, port_ifindex: u32) {
        let _ = self.tunnels.remove(&port_ifindex);
        let _ = self.tunnel_counters.remove(&port_ifindex);
    }

    fn set_tunnel_rx(&mut self, key: TunnelRxKey, port_ifindex: u32) -> Result<(), KernelError> {
        self.tunnel_rx.insert(key, port_ifindex, 0).map_err(|e| KernelError::Map { map: maps::TUNNEL_RX, source: boxed(e) })
    }

    fn remove_tunnel_rx(&mut self, key: TunnelRxKey) {
        let _ = self.tunnel_rx.remove(&key);
    }

    fn attach_tunnel(&mut self, ifindex: u32, ifname: &str, program: TunnelProgram) -> Result<(), KernelError> {
        let link = self.attach_program(tunnel_program_name(program), ifindex, ifname, TcAttachType::Ingress)?;
        self.tunnel_links.insert((ifindex, program), link);
        Ok(())
    }

    fn detach_tunnel(&mut self, ifindex: u32, program: TunnelProgram) {
        if let Some(link) = self.tunnel_links.remove(&(ifindex, program)) {
            self.release(tunnel_program_name(program), ifindex, link);
        }
        self.forget_clsact(ifindex);
    }

    fn tunnel_counters(&self, port_ifindex: u32) -> TunnelCounters {
        summed(self.tunnel_counters.get(&port_ifindex, 0), TunnelCounters::accumulate)
    }

    fn prune(&mut self, plan: &crate::plan::Plan) -> usize {
        /// Deletes the keys of `map` that `keep` refuses; keys are read first, since deleting
        /// while iterating a hash map can skip entries.
        fn prune_map<K: aya::Pod, V: aya::Pod>(map: &mut BpfHashMap<MapData, K, V>, keep: impl Fn(&K, &V) -> bool) -> usize {
            let stale: Vec<K> = map.iter().filter_map(Result::ok).filter(|(key, value)| !keep(key, value)).map(|(key, _)| key).collect();
            stale.iter().filter(|key| map.remove(key).is_ok()).count()
        }
        let segment_slots: HashSet<u32> = plan.segment_slots.values().copied().collect();
        let mut removed = prune_map(&mut self.ports, |ifindex, _| plan.ports.contains_key(ifindex));
        removed += prune_map(&mut self.big_hubs, |slot, _| segment_slots.contains(slot));
        removed += prune_map(&mut self.rx_filters, |ifindex, _| plan.rx_filters.contains_key(ifindex));
        removed += prune_map(&mut self.rx_vlans, |ifindex, _| plan.rx_filters.contains_key(ifindex));
        removed += prune_map(&mut self.rx_macs, |key, _| {
            plan.rx_filters.get(&key.ifindex).is_some_and(|filter| filter.macs.contains_key(&key.mac))
        });
        removed += prune_map(&mut self.tunnels, |ifindex, _| plan.tunnels.contains_key(ifindex));
        removed += prune_map(&mut self.tunnel_rx, |key, ifindex| plan.tunnel_rx.get(key) == Some(ifindex));
        let stale: Vec<u32> =
            self.tunnel_counters.keys().filter_map(Result::ok).filter(|ifindex| !plan.tunnels.contains_key(ifindex)).collect();
        removed += stale.iter().filter(|ifindex| self.tunnel_counters.remove(ifindex).is_ok()).count();
        removed
    }

    fn remove_earlier_attachments(&mut self) -> usize {
        // In either mode: an earlier run may have attached in netlink mode.
        let removed = attach::remove_leftovers();
        let added: Vec<u32> = self.clsact_added.iter().copied().collect();
        for ifindex in added {
            self.forget_clsact(ifindex);
        }
        removed
    }

    fn describe(&self) -> Option<serde_json::Value> {
        let mut described = self.info.as_ref().and_then(|info| serde_json::to_value(info).ok())?;
        if let Some(object) = described.as_object_mut() {
            object.insert("abi".to_owned(), self.abi.clone().into());
            object.insert("pinned".to_owned(), self.pins.is_some().into());
            object.insert("taken-over".to_owned(), self.taken_over.into());
        }
        Some(described)
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::{MEMBER_LINK_UP, MEMBER_MONITOR};

    use super::*;

    fn members(count: u32, monitors: u32) -> Vec<HubMember> {
        (0..count)
            .map(|i| HubMember {
                ifindex: i + 1,
                flags: MEMBER_LINK_UP | if i < monitors { MEMBER_MONITOR } else { 0 },
                slot: i,
            })
            .collect()
    }

    #[test]
    fn two_port_segments_never_learn() {
        let (value, big) = segment_value(&members(2, 0), true);
        assert_eq!((value.flags, value.count, big.is_none()), (0, 2, true));
        let (value, _) = segment_value(&members(3, 0), true);
        assert_eq!(value.flags, HUB_FLAG_LEARNING);
        let (value, _) = segment_value(&members(3, 0), false);
        assert_eq!(value.flags, 0);
    }

    #[test]
    fn monitors_are_listed_and_too_many_mean_flooding() {
        let (value, _) = segment_value(&members(5, 2), true);
        assert_eq!(value.monitor_count, 2);
        assert_eq!(value.monitors[1].ifindex, 2);
        let too_many = u32::try_from(MAX_HUB_MONITORS).unwrap() + 1;
        let (value, _) = segment_value(&members(too_many + 1, too_many), true);
        assert_eq!((value.flags, value.monitor_count), (0, 0));
    }

    #[test]
    fn big_segments_keep_their_list_apart() {
        let inline = u32::try_from(INLINE_HUB_PORTS).unwrap();
        let (value, big) = segment_value(&members(inline, 0), true);
        assert!(big.is_none());
        assert_eq!(value.members[INLINE_HUB_PORTS - 1].ifindex, inline);
        let (value, big) = segment_value(&members(1024, 0), true);
        let big = big.expect("a big list");
        assert_eq!(value.count, 1024);
        assert_eq!(value.members[0], HubMember::default());
        assert_eq!(big.members[1023].ifindex, 1024);
    }
}
