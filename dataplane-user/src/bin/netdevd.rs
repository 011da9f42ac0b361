//! netdevd: the daemon. `netdevd [--config FILE] [--qmp unix:PATH,server=on,wait=off]… [--chardev KEYVAL]… [--netdev KEYVAL]…`
//!
//! Descriptors open when it starts (beyond 0-2, and beyond systemd's activated sockets) are the
//! ones `--netdev tap,fd=N` may name. SIGTERM and SIGINT stop it; SIGHUP reloads the configuration file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dataplane::{
    config::{Overrides, Settings},
    daemon::{Daemon, Host, ShutdownCause},
    fd::InheritedFds,
    instance::{self, Instance},
    logging::{self, LogFormat},
    metrics::{MetricsAddr, MetricsListener},
    chardev::ChardevSpec,
    netdev::Netdev,
    systemd,
    kernel::{
        attach::{self, AttachChoice},
        ebpf::{EbpfDataplane, ObjectSource},
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
        .block_on(run(settings, attach, inherited, Startup { overrides, metrics, activated, instance }))
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
}

async fn run(settings: Settings, attach: AttachChoice, mut inherited: InheritedFds, startup: Startup) -> Result<()> {
    let instance = &startup.instance;
    let netlink = Netlink::connect().context("cannot open a netlink socket")?.with_mark(instance.mark());
    let leftovers = instance::remove_leftovers(&netlink, &instance.mark()).await;
    tracing::info!(state_dir = %instance.dir().display(), mark = instance.mark(), leftovers_removed = leftovers.len(),
        "state directory locked");
    let source = match settings.bpf_object.clone() {
        Some(path) => ObjectSource::File(path),
        None => ObjectSource::default_source()
            .context("this netdevd was built without the eBPF object: pass --bpf-object (run cargo xtask build-ebpf)")?,
    };
    let mut dataplane = EbpfDataplane::load(&source)?;
    // The trial attach needs an interface of its own: a veth that exists only for it.
    let (scratch, scratch_peer) = dataplane::port::pair::pair_names();
    let made = netlink.add_veth(&scratch, &scratch_peer, 1500).await.is_ok();
    let info = attach::choose(attach, made.then(|| dataplane.trial_tcx(&scratch)));
    if made && let Ok(Some(link)) = netlink.find(&scratch).await {
        let _ = netlink.delete(link.ifindex).await;
    }
    tracing::info!(kernel = %info.kernel, mode = ?info.attach_mode, forced = info.forced,
        leftovers_removed = info.leftovers_removed, "dataplane attach mode");
    dataplane.set_info(info);
    let daemon = Daemon::new(Some(Host { dataplane: Box::new(dataplane), netlink }));
    // What a crashed run recorded is gone with its leftovers: the file starts afresh.
    daemon.record_state_in(instance.dir().join("netdevs.json")).await;
    if let Some(path) = settings.user_resolv_conf.clone() {
        daemon.set_user_resolv_conf(path);
    }
    daemon.set_max_netdevs(settings.max_netdevs).await;
    dataplane::port::set_program_timeout(std::time::Duration::from_secs(settings.setup_timeout));
    let mut configured_chardevs = settings.chardevs.clone();
    for chardev in settings.chardevs {
        let id = chardev.id.clone();
        if let Err(error) = daemon.add_chardev(chardev, &mut inherited).await {
            daemon.tear_down().await;
            bail!("-chardev {id}: {error}");
        }
    }
    let mut configured: Vec<Netdev> = settings.netdevs.clone();
    for netdev in settings.netdevs {
        let id = netdev.id.clone();
        if let Err(error) = daemon.add_netdev(netdev, &mut inherited).await {
            daemon.tear_down().await;
            bail!("-netdev {id}: {error}");
        }
    }
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

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let signals = {
        let daemon = daemon.clone();
        let overrides = startup.overrides;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => break,
                    _ = interrupt.recv() => break,
                    _ = hangup.recv() => reload(&daemon, &overrides, &mut configured_chardevs, &mut configured).await,
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
    // A signal or `quit`: the netdevs go now.
    systemd::notify_or_warn("STOPPING=1");
    signals.abort();
    daemon.tear_down().await;
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
            let outcome = daemon.reload_chardevs(chardevs, &next.chardevs).await;
            for failure in &outcome.failed {
                tracing::error!(%failure, "reload: a configured chardev could not be changed");
            }
            *chardevs = next.chardevs;
            let outcome = daemon.reload_netdevs(configured, &next.netdevs).await;
            for failure in &outcome.failed {
                tracing::error!(%failure, "reload: a configured netdev could not be changed");
            }
            tracing::info!(removed = outcome.removed, added = outcome.added, failed = outcome.failed.len(),
                "configuration reloaded");
            *configured = next.netdevs;
        }
        Err(error) => {
            let error = anyhow::Error::from(error);
            tracing::error!(error = format!("{error:#}"), "reload: configuration not read, nothing changed");
        }
    }
    systemd::notify_or_warn("READY=1");
}
