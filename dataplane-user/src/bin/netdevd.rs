//! netdevd: the daemon. `netdevd [--config FILE] [--qmp unix:PATH,server=on,wait=off]… [--netdev KEYVAL]…`
//!
//! SIGTERM and SIGINT stop it; SIGHUP reloads the configuration file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dataplane::{
    config::{Overrides, Settings},
    daemon::{Daemon, Host, ShutdownCause},
    fd::NoFds,
    logging::{self, LogFormat},
    metrics::{MetricsAddr, MetricsListener},
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
#[command(version, about = "QEMU's netdev API over QMP, forwarded in the kernel by eBPF")]
struct Args {
    /// Configuration file (default: /etc/netdevd/netdevd.toml if present, else built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// QMP server socket, as QEMU's -qmp: unix:PATH[,server=on,wait=off] or tcp:IP:PORT (repeatable).
    #[arg(long, value_name = "ADDRESS")]
    qmp: Vec<String>,
    /// A netdev to create at start, as QEMU's -netdev: TYPE,id=ID[,KEY=VALUE…] (repeatable).
    #[arg(long, value_name = "KEYVAL")]
    netdev: Vec<String>,
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
    /// Log lines as `text` or `json` (one object a line); default from the config file's [log] format.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at GET /metrics on unix:PATH or tcp:IP:PORT (default: the config
    /// file's [metrics] listen; off when neither is given).
    #[arg(long, value_name = "ADDRESS")]
    metrics: Option<MetricsAddr>,
}

fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line, as QEMU reports start-up errors; no backtrace.
            eprintln!("netdevd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> Result<()> {
    let args = Args::parse();
    let attach = match args.x_attach {
        Some(choice) => choice,
        None => match std::env::var("NETDEVD_X_ATTACH") {
            Ok(text) => text.parse().map_err(|e: String| anyhow::anyhow!("NETDEVD_X_ATTACH: {e}"))?,
            Err(_) => AttachChoice::Auto,
        },
    };
    let overrides = Overrides { config: args.config, qmp: args.qmp, netdevs: args.netdev, bpf_object: args.bpf_object };
    let mut settings = Settings::load(&overrides)?;
    settings.user_resolv_conf = args.user_resolv_conf;
    let metrics = match (args.metrics, &settings.metrics) {
        (Some(addr), _) => Some(addr),
        (None, Some(spec)) => Some(spec.parse::<MetricsAddr>().map_err(anyhow::Error::msg)?),
        (None, None) => None,
    };
    // Before any thread starts: taking them edits the environment.
    let inherited = systemd::take_listeners().context("socket activation")?;
    logging::init(&settings.log_level, args.log_format.unwrap_or(settings.log_format));
    if !nix::unistd::geteuid().is_root() {
        bail!("netdevd must run as root: it creates interfaces and loads eBPF programs");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(settings, attach, Startup { overrides, metrics, inherited }))
}

/// What `run` needs besides the settings: how to read them again, and the sockets to serve.
struct Startup {
    overrides: Overrides,
    metrics: Option<MetricsAddr>,
    /// QMP sockets passed by systemd; they replace the configured addresses.
    inherited: Vec<std::os::unix::net::UnixListener>,
}

async fn run(settings: Settings, attach: AttachChoice, startup: Startup) -> Result<()> {
    let source = match settings.bpf_object.clone() {
        Some(path) => ObjectSource::File(path),
        None => ObjectSource::default_source()
            .context("this netdevd was built without the eBPF object: pass --bpf-object (run cargo xtask build-ebpf)")?,
    };
    let mut dataplane = EbpfDataplane::load(&source)?;
    let netlink = Netlink::connect().context("cannot open a netlink socket")?;
    // The trial attach needs an interface of its own: a veth that exists only for it.
    let scratch = format!("ndprobe{}", std::process::id() % 100_000);
    let made = netlink.add_veth(&scratch, &format!("{scratch}p"), 1500).await.is_ok();
    let info = attach::choose(attach, made.then(|| dataplane.trial_tcx(&scratch)));
    if made && let Ok(Some(link)) = netlink.find(&scratch).await {
        let _ = netlink.delete(link.ifindex).await;
    }
    tracing::info!(kernel = %info.kernel, mode = ?info.attach_mode, forced = info.forced,
        leftovers_removed = info.leftovers_removed, "dataplane attach mode");
    dataplane.set_info(info);
    let daemon = Daemon::new(Some(Host { dataplane: Box::new(dataplane), netlink }));
    if let Some(path) = settings.user_resolv_conf.clone() {
        daemon.set_user_resolv_conf(path);
    }
    let mut configured: Vec<Netdev> = settings.netdevs.clone();
    for netdev in settings.netdevs {
        let id = netdev.id.clone();
        if let Err(error) = daemon.add_netdev(netdev, &mut NoFds).await {
            daemon.tear_down().await;
            bail!("-netdev {id}: {error}");
        }
    }
    let mut listeners = Vec::new();
    for listener in startup.inherited {
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
                    _ = hangup.recv() => reload(&daemon, &overrides, &mut configured).await,
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
async fn reload(daemon: &Daemon, overrides: &Overrides, configured: &mut Vec<Netdev>) {
    systemd::notify_or_warn(&systemd::reloading_message());
    match Settings::load(overrides) {
        Ok(next) => {
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
