//! netdevd: the daemon. `netdevd [--config FILE] [--qmp unix:PATH,server=on,wait=off]… [--chardev KEYVAL]… [--netdev KEYVAL]…`
//!
//! Descriptors open when it starts (beyond 0-2, and beyond systemd's activated sockets) are the
//! ones `--netdev tap,fd=N` may name. SIGTERM and SIGINT stop it (every netdev goes); SIGUSR2 stops
//! it leaving the kernel datapath running for the next daemon (as `x-exit-preserve`); SIGHUP
//! reloads the configuration file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dataplane::{
    config::{Overrides, Settings},
    daemon::{Daemon, Host, ShutdownCause, adopt, record},
    fd::InheritedFds,
    instance::{self, Instance},
    logging::{self, LogFormat},
    metrics::{MetricsAddr, MetricsListener},
    chardev::ChardevSpec,
    netdev::Netdev,
    systemd,
    kernel::{
        attach::{self, AttachChoice},
        ebpf::{self, EbpfDataplane, ObjectSource},
        pins::{self, PinDir},
    },
    port::link::Netlink,
    qmp::server::{self, Listener},
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "netdevd", version, about = "QEMU's netdev API over QMP, forwarded in the kernel by eBPF")]
struct Args {
    /// Write the man page and shell completions into DIR and exit (used by packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    x_generate_docs: Option<PathBuf>,
    /// Configuration file (default: /etc/netdevd/netdevd.toml if present, else built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// QMP server socket, as QEMU's -qmp: unix:PATH[,server=on,wait=off] or tcp:IP:PORT (repeatable;
    /// tcp needs --insecure-tcp-qmp).
    #[arg(long, value_name = "ADDRESS")]
    qmp: Vec<String>,
    /// Allows tcp: QMP listeners. Whoever can connect controls a root daemon (only options that
    /// run programs are refused to TCP clients); prefer the unix socket.
    #[arg(long)]
    insecure_tcp_qmp: bool,
    /// A netdev to create at start, as QEMU's -netdev: TYPE,id=ID[,KEY=VALUE…] (repeatable).
    #[arg(long, value_name = "KEYVAL")]
    netdev: Vec<String>,
    /// A socket chardev to create at start, before the netdevs, as QEMU's -chardev:
    /// socket,id=ID,path=PATH[,server=on,wait=off][,reconnect=SECONDS] or fd=N (repeatable).
    #[arg(long, value_name = "KEYVAL")]
    chardev: Vec<String>,
    /// The eBPF object to load instead of the one built into netdevd.
    #[arg(long, value_name = "FILE")]
    bpf_object: Option<PathBuf>,
    /// The resolver file `user` netdevs forward DNS to (its first `nameserver`), instead of
    /// /etc/resolv.conf: tests point it at a local stub server.
    #[arg(long, value_name = "FILE")]
    user_resolv_conf: Option<PathBuf>,
    /// How programs are attached: `auto` (TCX where the kernel has it, else TC filters through
    /// netlink) or `netlink` (TC filters even where TCX works). Default from NETDEVD_X_ATTACH.
    #[arg(long, value_name = "MODE")]
    x_attach: Option<AttachChoice>,
    /// Netdevs the daemon holds at most (default from the config's limits.max-netdevs, 4096).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_netdevs: Option<u64>,
    /// Seconds a script=, downscript= or helper= program may run before it is killed (default
    /// from the config's limits.setup-timeout, 10).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    setup_timeout: Option<u64>,
    /// The directory of the daemon's lock and state: one daemon per directory; the interfaces a
    /// crashed run of it left are removed at start.
    #[arg(long, value_name = "DIR", default_value = instance::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The bpffs mount where maps and TCX links are pinned (under netdevd/INSTANCE/ABI), so the
    /// kernel datapath can outlive the daemon (x-exit-preserve, SIGUSR2, a crash) and the next
    /// daemon adopts it. Not a bpffs: nothing is pinned.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Use HASH as the ABI hash instead of the object's (tests simulate an incompatible upgrade).
    #[arg(long, value_name = "HASH", hide = true, value_parser = abi_override)]
    x_abi_hash: Option<String>,
    /// Log lines as `text` or `json` (one object a line); default from the config file's [log] format.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at GET /metrics on unix:PATH or tcp:IP:PORT (default: the config
    /// file's [metrics] listen; off when neither is given).
    #[arg(long, value_name = "ADDRESS")]
    metrics: Option<MetricsAddr>,
}

fn main() -> std::process::ExitCode {
    // First of all, before netdevd opens descriptors of its own.
    // systemd's activated sockets first (taking them edits the environment, before any thread
    // starts); every other descriptor open now is one `--netdev …,fd=N` may name.
    let activated = systemd::take_listeners();
    let mut inherited = InheritedFds::snapshot();
    if let Ok(listeners) = &activated {
        inherited.exclude(listeners.iter().map(std::os::fd::AsRawFd::as_raw_fd));
    }
    match activated.context("socket activation").and_then(|activated| start(inherited, activated)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line, as QEMU reports start-up errors; no backtrace.
            eprintln!("netdevd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start(inherited: InheritedFds, activated: Vec<std::os::unix::net::UnixListener>) -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.x_generate_docs {
        use clap::CommandFactory;
        return dataplane::docs::generate(Args::command(), "8", dir).context("cannot write the man page and completions");
    }
    let attach = match args.x_attach {
        Some(choice) => choice,
        None => match std::env::var("NETDEVD_X_ATTACH") {
            Ok(text) => text.parse().map_err(|e: String| anyhow::anyhow!("NETDEVD_X_ATTACH: {e}"))?,
            Err(_) => AttachChoice::Auto,
        },
    };
    let overrides = Overrides {
        config: args.config,
        qmp: args.qmp,
        netdevs: args.netdev,
        chardevs: args.chardev,
        bpf_object: args.bpf_object,
        insecure_tcp_qmp: args.insecure_tcp_qmp,
    };
    let mut settings = Settings::load(&overrides)?;
    settings.user_resolv_conf = args.user_resolv_conf;
    if let Some(limit) = args.max_netdevs {
        settings.max_netdevs = usize::try_from(limit).unwrap_or(usize::MAX);
    }
    if let Some(seconds) = args.setup_timeout {
        settings.setup_timeout = seconds;
    }
    if settings.max_netdevs == 0 || settings.setup_timeout == 0 {
        bail!("limits.max-netdevs and limits.setup-timeout must be at least 1");
    }
    let metrics = match (args.metrics, &settings.metrics) {
        (Some(addr), _) => Some(addr),
        (None, Some(spec)) => Some(spec.parse::<MetricsAddr>().map_err(anyhow::Error::msg)?),
        (None, None) => None,
    };
    logging::init(&settings.log_level, args.log_format.unwrap_or(settings.log_format));
    if !nix::unistd::geteuid().is_root() {
        bail!("netdevd must run as root: it creates interfaces and loads eBPF programs");
    }
    raise_fd_limit();
    // Held until the process ends: before anything is created, so a second daemon touches nothing.
    let instance = Instance::acquire(&args.state_dir)?;
    dataplane::privileges::drop_unneeded_capabilities().context("cannot drop the capabilities netdevd does not need")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(settings, attach, inherited, Startup { overrides, metrics, activated, instance, bpffs: args.bpffs, abi: args.x_abi_hash }))
}

/// A forced ABI hash becomes a directory name: letters and digits only.
fn abi_override(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(text.to_owned())
    } else {
        Err("an ABI hash is 1 to 64 letters and digits".to_owned())
    }
}

/// Many clients and netdevs each hold descriptors: the soft limit goes up to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the `rlimit` passed by pointer, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the open-files limit");
            }
        }
    }
}

/// What `run` needs besides the settings: how to read them again, the sockets to serve and the
/// state directory it holds.
struct Startup {
    overrides: Overrides,
    metrics: Option<MetricsAddr>,
    /// QMP sockets passed by systemd; they replace the configured addresses.
    activated: Vec<std::os::unix::net::UnixListener>,
    instance: Instance,
    bpffs: PathBuf,
    /// The ABI hash forced by `--x-abi-hash`.
    abi: Option<String>,
}

async fn run(settings: Settings, attach: AttachChoice, mut inherited: InheritedFds, startup: Startup) -> Result<()> {
    let instance = &startup.instance;
    let netlink = Netlink::connect().context("cannot open a netlink socket")?.with_mark(instance.mark());
    // An earlier run's record: what it had, to adopt. A damaged one adopts nothing.
    let state_file = instance.dir().join("netdevs.json");
    let record = record::read(&state_file).unwrap_or_else(|error| {
        tracing::warn!(path = %state_file.display(), %error, "the state file cannot be read: nothing is adopted");
        None
    });
    // Chardevs come back even without netdevs: a frontend may reconnect to a server's socket.
    let chardev_record = record.clone().filter(|r| !r.chardevs.is_empty());
    let record = record.filter(|r| !r.netdevs.is_empty());
    let kept = record.as_ref().map(adopt::kept_interfaces).unwrap_or_default();
    let leftovers = instance::remove_leftovers(&netlink, &instance.mark(), &kept).await;
    tracing::info!(state_dir = %instance.dir().display(), mark = instance.mark(), leftovers_removed = leftovers.len(),
        adopting = record.as_ref().map_or(0, |r| r.netdevs.len()), "state directory locked");
    let source = match settings.bpf_object.clone() {
        Some(path) => ObjectSource::File(path),
        None => ObjectSource::default_source()
            .context("this netdevd was built without the eBPF object: pass --bpf-object (run cargo xtask build-ebpf)")?,
    };
    let abi = match startup.abi.clone() {
        Some(forced) => forced,
        None => ebpf::abi_hash(&source)?,
    };
    let mut pin_dir = PinDir::prepare(&startup.bpffs, instance.id(), &abi);
    if record.is_none()
        && let Some(stale) = pin_dir.take()
    {
        // Nothing to adopt: pins of an earlier run (a crash before anything was recorded) go,
        // and the maps start empty; its record of the clsact qdiscs it added stays until they go.
        stale.remove_abis();
        pin_dir = PinDir::prepare(&startup.bpffs, instance.id(), &abi);
    }
    // An earlier run's pins: its links go once the new programs are attached; maps of the
    // same ABI are taken over by the load, maps of another ABI go with their directory.
    let earlier_links = pin_dir.as_ref().map(PinDir::link_pins).unwrap_or_default();
    let other_abis = pin_dir.as_ref().map(PinDir::other_abis).unwrap_or_default();
    let reused_maps = pin_dir.as_ref().is_some_and(PinDir::has_maps);
    let mut dataplane = EbpfDataplane::load(&source, pin_dir.clone(), &abi)?;
    tracing::info!(abi, pinned = pin_dir.is_some(), reused_maps, earlier_links = earlier_links.len(),
        other_abis = other_abis.len(), "eBPF object loaded");
    // The trial attach needs an interface of its own: a veth that exists only for it.
    let (scratch, scratch_peer) = dataplane::port::pair::pair_names();
    let made = netlink.add_veth(&scratch, &scratch_peer, 1500).await.is_ok();
    let info = attach::choose(attach, made.then(|| dataplane.trial_tcx(&scratch)), record.is_some());
    if made && let Ok(Some(link)) = netlink.find(&scratch).await {
        let _ = netlink.delete(link.ifindex).await;
    }
    tracing::info!(kernel = %info.kernel, mode = ?info.attach_mode, forced = info.forced,
        leftovers_removed = info.leftovers_removed, "dataplane attach mode");
    dataplane.set_info(info);
    if record.is_some() {
        // Adoption swaps the new programs into these in place (bpf_link_update, tc filter replace).
        dataplane.find_earlier(&earlier_links);
    }
    let daemon = Daemon::new(Some(Host { dataplane: Box::new(dataplane), netlink }));
    daemon.set_can_preserve(pin_dir.is_some());
    if let Some(path) = settings.user_resolv_conf.clone() {
        daemon.set_user_resolv_conf(path);
    }
    daemon.set_max_netdevs(settings.max_netdevs).await;
    dataplane::port::set_program_timeout(std::time::Duration::from_secs(settings.setup_timeout));
    let mut configured_chardevs = settings.chardevs.clone();
    match &chardev_record {
        // The earlier run's chardevs come back first (its vhost-user netdevs name them), then the
        // configuration's are brought in line with them as a reload does.
        Some(earlier) => {
            for failure in daemon.adopt_chardevs(earlier, &mut inherited).await {
                tracing::warn!(%failure, "a chardev of the earlier run could not be adopted");
            }
            let previous = Daemon::recorded_chardev_configuration(earlier);
            let outcome = daemon.reload_chardevs(&previous, &settings.chardevs, &mut inherited).await;
            if let Some(failure) = outcome.failed.first() {
                daemon.tear_down().await;
                bail!("-chardev: {failure}");
            }
        }
        None => {
            for chardev in settings.chardevs {
                let id = chardev.id.clone();
                if let Err(error) = daemon.add_chardev(chardev, &mut inherited).await {
                    daemon.tear_down().await;
                    bail!("-chardev {id}: {error}");
                }
            }
        }
    }
    daemon.set_configured_chardevs(configured_chardevs.iter().map(|c| c.id.clone())).await;
    let mut configured: Vec<Netdev> = settings.netdevs.clone();
    let started = match &record {
        Some(record) => {
            let adopted = daemon.adopt(record, &mut inherited).await;
            for failure in &adopted.failed {
                tracing::warn!(%failure, "a netdev of the earlier run could not be adopted");
            }
            tracing::info!(kept = adopted.kept.len(), recreated = adopted.recreated.len(), failed = adopted.failed.len(),
                "earlier run adopted");
            let previous = Daemon::recorded_configuration(record);
            daemon.reconcile_configured(&previous, &settings.netdevs, &mut inherited).await
        }
        None => {
            let mut result = Ok(());
            for netdev in settings.netdevs {
                let id = netdev.id.clone();
                if let Err(error) = daemon.add_netdev(netdev, &mut inherited).await {
                    result = Err((id, error));
                    break;
                }
            }
            result
        }
    };
    if let Err((id, error)) = started {
        daemon.tear_down().await;
        daemon.remove_earlier_attachments().await;
        if let Some(pins) = &pin_dir {
            pins.remove_all();
        }
        bail!("-netdev {id}: {error}");
    }
    daemon.set_configured(configured.iter().map(|n| n.id.clone())).await;
    // From here on the file is this run's.
    daemon.record_state_in(state_file).await;
    // The new programs are in place: what the earlier run left and this one did not take over
    // (a port that did not come back, a take-over that failed) stops now.
    for link in &earlier_links {
        if let Err(error) = std::fs::remove_file(link)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pin = %link.display(), %error, "cannot remove an earlier run's link");
        }
    }
    for dir in &other_abis {
        pins::remove_tree(dir);
    }
    {
        let removed = daemon.remove_earlier_attachments().await;
        tracing::info!(removed, "earlier run's TC filters removed");
    }
    // Caught before the socket exists: a client that sees it may signal at once (the handler
    // task below takes a signal that came in between).
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut preserve = signal(SignalKind::user_defined2())?;
    let mut listeners = Vec::new();
    for listener in startup.activated {
        listeners.push(Listener::inherited(listener).context("socket activation")?);
        tracing::info!("QMP listening on a socket passed by systemd");
    }
    let configured_listen = if listeners.is_empty() { settings.listen.as_slice() } else { &[] };
    for addr in configured_listen {
        match Listener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(error) => {
                daemon.tear_down().await;
                return Err(error.into());
            }
        }
        tracing::info!(%addr, "QMP listening");
    }
    if let Some(addr) = &startup.metrics {
        match MetricsListener::bind(addr).await {
            Ok(listener) => {
                tokio::spawn(listener.serve(daemon.clone()));
                tracing::info!(%addr, "metrics served");
            }
            Err(error) => {
                daemon.tear_down().await;
                bail!("cannot serve metrics on {addr}: {error}");
            }
        }
    }

    let signals = {
        let daemon = daemon.clone();
        let overrides = startup.overrides;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                    _ = hangup.recv() => reload(&daemon, &overrides, &mut configured_chardevs, &mut configured).await,
                    _ = preserve.recv() => match daemon.exit_preserving(ShutdownCause::HostSignal) {
                        Ok(()) => {
                            tracing::info!("SIGUSR2 received, exiting with the kernel datapath preserved");
                            return;
                        }
                        Err(error) => tracing::error!(%error, "SIGUSR2 ignored"),
                    },
                }
            }
            tracing::info!("signal received, shutting down");
            daemon.shut_down(ShutdownCause::HostSignal);
        })
    };

    // Clients can connect, the configured netdevs exist and SIGTERM is handled: systemd may start
    // what depends on us.
    systemd::notify_or_warn("READY=1\nSTATUS=serving QMP");
    server::serve(daemon.clone(), listeners, settings.max_message_bytes).await;
    systemd::notify_or_warn("STOPPING=1");
    signals.abort();
    if daemon.preserving() {
        // `x-exit-preserve` or SIGUSR2: interfaces, pinned maps and links, filters and the state
        // file stay for the next daemon. Nothing is dropped: dropping the loaded object would
        // detach the filters it owns. The kernel releases the lock and every descriptor.
        tracing::info!("stopped, kernel datapath preserved");
        std::process::exit(0);
    }
    // A signal or `quit`: the netdevs go now, and the pins with them.
    daemon.tear_down().await;
    if let Some(pins) = &pin_dir {
        pins.remove_all();
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP (`systemctl reload`): reads the configuration again with the same command line and
/// brings the configured netdevs in line with it; a file that does not parse changes nothing.
async fn reload(daemon: &Daemon, overrides: &Overrides, chardevs: &mut Vec<ChardevSpec>, configured: &mut Vec<Netdev>) {
    systemd::notify_or_warn(&systemd::reloading_message());
    match Settings::load(overrides) {
        Ok(next) => {
            // Chardevs first: a new vhost-user netdev names one.
            let outcome = daemon.reload_chardevs(chardevs, &next.chardevs, &mut dataplane::fd::NoFds).await;
            for failure in &outcome.failed {
                tracing::error!(%failure, "reload: a configured chardev could not be changed");
            }
            *chardevs = next.chardevs;
            daemon.set_configured_chardevs(chardevs.iter().map(|c| c.id.clone())).await;
            let outcome = daemon.reload_netdevs(configured, &next.netdevs).await;
            for failure in &outcome.failed {
                tracing::error!(%failure, "reload: a configured netdev could not be changed");
            }
            tracing::info!(removed = outcome.removed, added = outcome.added, failed = outcome.failed.len(),
                "configuration reloaded");
            *configured = next.netdevs;
            daemon.set_configured(configured.iter().map(|n| n.id.clone())).await;
        }
        Err(error) => {
            let error = anyhow::Error::from(error);
            tracing::error!(error = format!("{error:#}"), "reload: configuration not read, nothing changed");
        }
    }
    systemd::notify_or_warn("READY=1");
}
