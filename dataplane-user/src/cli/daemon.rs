//! `dataplane daemon`: the configuration from the file and the flags, and
//! the daemon's runtime.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use dataplane_user::{
    config::{DEFAULT_CONFIG, DEFAULT_SOCKET, DaemonConfig},
    daemon::Daemon,
    kernel::loader::DEFAULT_PIN_ROOT,
};

use super::{Context, Failure};

/// Run the daemon: adopt or load the dataplane, serve the control socket and the peer link.
#[derive(clap::Args)]
pub struct Args {
    /// Configuration file; flags below override its keys.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Service-facing interface (overrides `interface`).
    #[arg(long)]
    pub interface: Option<String>,
    /// Link to the peer host (overrides `peer_interface`).
    #[arg(long)]
    pub peer_interface: Option<String>,
    /// Peer-link listen address (overrides `peer_listen`).
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
}

pub fn run(cx: &Context, args: Args) -> Result<(), Failure> {
    let Args {
        config,
        interface,
        peer_interface,
        peer_listen,
    } = args;
    let mut config = match (DaemonConfig::read(&config), &interface) {
        (Ok(config), _) => config,
        // Without a file, flags alone may configure the daemon.
        (Err(_), Some(interface)) if !config.exists() => {
            DaemonConfig::parse(&format!("interface = {interface:?}")).context("flags")?
        }
        (Err(e), _) => return Err(Failure::Local(e.into())),
    };
    config.interface = interface.unwrap_or(config.interface);
    config.peer_interface = peer_interface.or(config.peer_interface);
    config.peer_listen = peer_listen.or(config.peer_listen);
    if cx.pin_root != Path::new(DEFAULT_PIN_ROOT) {
        config.pin_root = cx.pin_root.clone();
    }
    if cx.socket != Path::new(DEFAULT_SOCKET) {
        config.socket = cx.socket.clone();
    }
    let runtime = daemon_runtime(config.realtime_priority)?;
    runtime
        .block_on(async { Daemon::start(config)?.serve().await })
        .context("daemon")?;
    Ok(())
}

/// The daemon's runtime; with a `realtime_priority`, every thread of it
/// (this one too) runs at that SCHED_FIFO priority.
fn daemon_runtime(realtime_priority: u8) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if realtime_priority > 0 {
        dataplane_user::host::tasks::run_realtime(realtime_priority).with_context(|| {
            format!("realtime_priority {realtime_priority}: SCHED_FIFO for the daemon")
        })?;
        // Threads start as ordinary tasks (reset-on-fork): each lifts itself.
        builder.on_thread_start(move || {
            if let Err(e) = dataplane_user::host::tasks::run_realtime(realtime_priority) {
                tracing::warn!("a daemon thread stays an ordinary task: {e}");
            }
        });
    }
    builder.build().context("starting tokio")
}
