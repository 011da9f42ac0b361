//! netdevd: the daemon. `netdevd [--config FILE] [--qmp unix:PATH,server=on,wait=off]… [--netdev KEYVAL]…`

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dataplane::{
    config::{Overrides, Settings},
    daemon::{Daemon, Host, ShutdownCause},
    fd::NoFds,
    kernel::{
        attach::{self, AttachChoice},
        ebpf::{EbpfDataplane, ObjectSource},
    },
    port::link::Netlink,
    qmp::server::{self, Listener},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if !nix::unistd::geteuid().is_root() {
        bail!("netdevd must run as root: it creates interfaces and loads eBPF programs");
    }
    dataplane::privileges::drop_unneeded_capabilities().context("cannot drop the capabilities netdevd does not need")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(settings, attach))
}

async fn run(settings: Settings, attach: AttachChoice) -> Result<()> {
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
    for netdev in settings.netdevs {
        let id = netdev.id.clone();
        if let Err(error) = daemon.add_netdev(netdev, &mut NoFds).await {
            daemon.tear_down().await;
            bail!("-netdev {id}: {error}");
        }
    }
    let mut listeners = Vec::new();
    for addr in &settings.listen {
        match Listener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(error) => {
                daemon.tear_down().await;
                return Err(error.into());
            }
        }
        tracing::info!(%addr, "QMP listening");
    }

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let signals = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
                _ = hangup.recv() => {}
            }
            tracing::info!("signal received, shutting down");
            daemon.shut_down(ShutdownCause::HostSignal);
        })
    };

    server::serve(daemon.clone(), listeners, settings.max_message_bytes).await;
    signals.abort();
    daemon.tear_down().await;
    tracing::info!("stopped");
    Ok(())
}
