//! `dataplane daemon`: owns the host's dataplane and serves the control
//! socket and the peer link. This module holds its state and lifecycle;
//! [`handlers`] what each control method does.
//!
//! On start it re-adopts a pinned dataplane (as a restart after SIGKILL
//! finds it) or loads one from the configuration. On SIGTERM or SIGINT it
//! stops serving, rolls back the migrations in flight (both sides, within
//! [`STOP_WITHIN`]), and leaves the dataplane pinned, attached and counting.
mod handlers;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use dataplane_common::counter;
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    config::DaemonConfig,
    control::server,
    kernel::{
        loader::{Dataplane, LoadError, MAP_INPUTS, MAP_OUTPUTS},
        logs::{LogReader, Tap},
    },
    migration::{
        destination,
        journal::Files,
        recovery,
        seed::{Seeder, StandbyRequest},
    },
    peer,
    registry::{Registry, RegistryError},
    report::Report,
};

/// The daemon's state, shared by every connection.
pub struct Daemon {
    config: DaemonConfig,
    dataplane: Mutex<Dataplane>,
    adopted: bool,
    started: Instant,
    services: Arc<Registry>,
    /// Every migration this daemon ran or runs, by id.
    migrations: Arc<Mutex<BTreeMap<String, MigrationEntry>>>,
    /// The hot replicas of its services, by service.
    replicas: Arc<Mutex<BTreeMap<String, handlers::Replica>>>,
    /// The services this host took over from a source that stopped.
    takeovers: Arc<Mutex<Vec<crate::migration::failover::Takeover>>>,
    /// The standing readers of the input and output logs (set by `serve`).
    taps: std::sync::OnceLock<(Arc<Tap>, Arc<Tap>)>,
    /// Where standby requests go (set by `serve`; see [`Seeder`]).
    standby_requests: std::sync::OnceLock<mpsc::UnboundedSender<StandbyRequest>>,
    /// Migration phase changes, for `migration.watch`.
    events: broadcast::Sender<Report>,
    /// Whom the peer links are with, and this host's identity.
    trust: Arc<peer::Trust>,
    /// This host's side of migrations to it (set by `serve` when it
    /// serves the peer link).
    replica_host: std::sync::OnceLock<Arc<destination::Host>>,
}

/// A migration's latest report, its abort switch, and its task.
struct MigrationEntry {
    report: Report,
    abort: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

/// How long a stopping daemon waits for its migrations to roll back (or,
/// handed over, to finish) before it exits anyway; a journal left then is
/// acted on at the next start. Time for a dump to stop, a replay to give
/// the held inputs back, and the peer link's 3 s timeout.
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

/// Whom the peer links are with: the listed peers, sealed with this host's
/// identity (made at first start) unless `peer_insecure`. A daemon with no
/// peer link (neither `peer_listen` nor `peers`) needs no identity.
fn trust(config: &DaemonConfig) -> Result<peer::Trust, DaemonError> {
    let peers = config.peers.clone();
    if config.peer_insecure {
        tracing::warn!(
            "peer_insecure: peer links cross in clear and unauthenticated; anyone who \
             reaches peer_listen can have this host restore checkpoint images as root"
        );
    }
    if config.peer_insecure || (config.peer_listen.is_none() && peers.is_empty()) {
        return Ok(peer::Trust::insecure(peers));
    }
    let (identity, made) = peer::Identity::load_or_create(&config.identity)?;
    let path = config.identity.display();
    if made {
        tracing::info!(%path, key = %identity.public(), "made this host's identity key");
    } else {
        tracing::info!(%path, key = %identity.public(), "this host's identity key");
    }
    Ok(peer::Trust::sealed(identity, peers))
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Socket(#[from] server::BindError),
    #[error("peer link on {address}: {source}")]
    PeerListen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("reading the logs: {0}")]
    Log(std::io::Error),
    #[error("images_dir {}: {source}", path.display())]
    ImagesDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] peer::IdentityError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the standbys' place: {0}")]
    Standby(#[from] crate::standby::StandbyError),
}

impl Daemon {
    /// Adopts the pinned dataplane, or loads it as `config` says.
    pub fn start(config: DaemonConfig) -> Result<Self, DaemonError> {
        // Checkpoint images hold a service's whole memory, and journals
        // name its processes: every file this daemon and the CRIU it starts
        // write (CRIU's images, images received over the peer link,
        // journals, directories) is for root alone. CRIU creates its images
        // 0644 less the umask it inherits (its logs 0600), with no option
        // to say otherwise, so the umask is the one place that covers it, this
        // daemon's own writers and any later one. A restored service gets
        // its own umask back from its image.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let standby_mac = config
            .standby_host()
            .map(|standby| standby.ensure(&config.interface))
            .transpose()?;
        let options = config.load_options(standby_mac);
        let (dataplane, adopted) = match Dataplane::open(&options.pin_root) {
            Ok(dataplane) => (dataplane, true),
            Err(LoadError::NotLoaded(_)) => (Dataplane::load(&options)?, false),
            Err(e) => return Err(e.into()),
        };
        let flows = dataplane.flows()?.len();
        if adopted {
            let counters = dataplane.counters()?;
            tracing::info!(
                pin_root = %options.pin_root.display(),
                flows,
                seen = counters.get(counter::SEEN),
                captured = counters.get(counter::CAPTURED),
                "re-adopted the pinned dataplane; it kept running"
            );
        } else {
            tracing::info!(interface = %config.interface, pin_root = %options.pin_root.display(), "loaded the dataplane");
        }
        let trust = Arc::new(trust(&config)?);
        let (services, notes) = Registry::open(&config.registry)?;
        for note in notes {
            tracing::warn!("{note}");
        }
        if !services.is_empty() {
            tracing::info!(services = services.len(), path = %config.registry.display(),
                "adopted the registered services that still run");
        }
        Ok(Self {
            config,
            dataplane: Mutex::new(dataplane),
            adopted,
            started: Instant::now(),
            services: Arc::new(services),
            migrations: Arc::new(Mutex::new(BTreeMap::new())),
            replicas: Arc::new(Mutex::new(BTreeMap::new())),
            takeovers: Arc::new(Mutex::new(Vec::new())),
            taps: std::sync::OnceLock::new(),
            standby_requests: std::sync::OnceLock::new(),
            events: broadcast::channel(256).0,
            trust,
            replica_host: std::sync::OnceLock::new(),
        })
    }

    /// Serves the control socket (and the peer link if configured) until SIGTERM or SIGINT.
    pub async fn serve(self) -> Result<(), DaemonError> {
        let daemon = Arc::new(self);
        match daemon
            .dataplane
            .lock()
            .unwrap()
            .program_id(&daemon.config.interface, "ingress")
        {
            Ok(id) => {
                tokio::spawn(forward_kernel_logs(id));
            }
            Err(e) => tracing::warn!("kernel program logs will not be shown: {e}"),
        }
        let taps = {
            let dataplane = daemon.dataplane.lock().unwrap();
            let tap = |name| -> Result<Arc<Tap>, DaemonError> {
                let ring = dataplane.open_log(name)?;
                let reader = LogReader::spawn(ring, 4096).map_err(DaemonError::Log)?;
                Ok(Tap::spawn(reader))
            };
            (tap(MAP_INPUTS)?, tap(MAP_OUTPUTS)?)
        };
        let _ = daemon.taps.set(taps.clone());
        // The standbys' input log, read for a seeding's replay (and
        // drained meanwhile, or it fills).
        let standby_inputs = match daemon.config.standby_host() {
            None => None,
            Some(standby) => {
                let ring = Dataplane::open(&standby.pin_root)?.open_log(MAP_INPUTS)?;
                let reader = LogReader::spawn(ring, 4096).map_err(DaemonError::Log)?;
                Some(Tap::spawn(reader))
            }
        };
        let (standby_requests, requests) = mpsc::unbounded_channel();
        let _ = daemon.standby_requests.set(standby_requests.clone());
        let seeder = Seeder {
            standby: daemon.config.standby_host(),
            pin_root: daemon.config.pin_root.clone(),
            interface: daemon.config.interface.clone(),
            peer_interface: daemon.config.peer_interface.clone(),
            criu: daemon.config.criu(),
            inputs: taps.0.clone(),
            standby_inputs,
            services: daemon.services.clone(),
            images_dir: daemon.config.images_dir.join("standby"),
            cpus: crate::host::tasks::other_cpus(&daemon.config.service_cpus),
        };
        tokio::spawn(seeder.serve(requests));
        let files = Files::new(&daemon.config.images_dir);
        files.create().map_err(|source| DaemonError::ImagesDir {
            path: daemon.config.images_dir.clone(),
            source,
        })?;
        // Migrations the previous run of this daemon left half-done, either
        // side; hot replicas in sync are taken up again below.
        let recovered = recovery::recover(&daemon.recovery_host());
        let criu = daemon.config.criu();
        tokio::task::spawn_blocking(move || criu.log_capabilities());
        // Set when the daemon stops: migrations to this host roll back.
        let (stopping, stop) = watch::channel(false);
        let mut peer_links = None;
        if let Some(address) = daemon.config.peer_listen {
            let peers = TcpListener::bind(address)
                .await
                .map_err(|source| DaemonError::PeerListen { address, source })?;
            tracing::info!(%address, "serving the peer link");
            let (adoptions, mut adopted) = mpsc::unbounded_channel();
            let host = destination::Host {
                files: Files::new(&daemon.config.images_dir),
                pin_root: daemon.config.pin_root.clone(),
                interface: daemon.config.interface.clone(),
                peer_interface: daemon.config.peer_interface.clone(),
                mirror_from: daemon.config.mirror_interface(),
                criu: daemon.config.criu(),
                containers: daemon.config.containers(),
                inputs: Some(taps.0.clone()),
                outputs: Some(taps.1.clone()),
                limits: destination::Limits {
                    images: peer::transfer::Quota {
                        files: daemon.config.images_max_files,
                        bytes: daemon.config.images_max_mib.saturating_mul(1 << 20),
                    },
                    idle: std::time::Duration::from_secs(daemon.config.migration_idle_s),
                },
                services: daemon.services.clone(),
                services_dir: daemon.config.services_dir.clone(),
                standby_requests: standby_requests.clone(),
                stopping: stop,
                failover_after: std::time::Duration::from_millis(daemon.config.failover_after_ms),
                takeovers: daemon.takeovers.clone(),
                parked: Default::default(),
                adoptions,
                peer_listen: address,
            };
            let host = Arc::new(host);
            let _ = daemon.replica_host.set(host.clone());
            let adopter = daemon.clone();
            tokio::spawn(async move {
                while let Some(adoption) = adopted.recv().await {
                    adopter.adopt_replica(adoption);
                }
            });
            for (id, incoming) in &recovered.replicas {
                let outcome = destination::resume_replica(&host, id.clone(), incoming);
                tracing::warn!("migration {id} to this host: {outcome}");
            }
            // Each link holds a sender: the receiver ends when all have gone.
            let (alive, ended) = mpsc::channel::<()>(1);
            let listener = tokio::spawn(peer::serve(
                peers,
                daemon.trust.clone(),
                move |link, from| {
                    let (host, alive) = (host.clone(), alive.clone());
                    async move {
                        let _alive = alive;
                        destination::serve_link(link, from, host).await
                    }
                },
            ));
            peer_links = Some((listener, ended));
        }
        for (id, outgoing) in recovered.sources {
            daemon.resume_replica(id, outgoing);
        }
        // Last: a client that finds the socket finds the peer link up too.
        let config = &daemon.config;
        let listener = server::bind(&config.socket, config.socket_group.as_deref())?;
        let socket_path = config.socket.clone();
        tracing::info!(socket = %socket_path.display(), "serving the control socket");
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let limits = server::Limits {
            rate: config.socket_rate,
            burst: config.socket_burst,
            max_connections: config.socket_max_connections,
        };
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        server::serve(listener, daemon.clone(), limits, stop).await;
        let _ = std::fs::remove_file(&socket_path);
        let _ = stopping.send(true);
        daemon.wait_for_migrations(peer_links).await;
        tracing::info!("stopped; the dataplane stays pinned and attached");
        Ok(())
    }

    /// What recovery works with on this host.
    pub(super) fn recovery_host(&self) -> recovery::Host {
        recovery::Host {
            files: Files::new(&self.config.images_dir),
            pin_root: self.config.pin_root.clone(),
            standby_pin_root: self.config.standby_host().map(|s| s.pin_root),
            interface: self.config.interface.clone(),
            services: self.services.clone(),
            containers: self.config.containers(),
            keeps_replicas: self.config.peer_listen.is_some(),
        }
    }

    /// Rolls back what migrations are in flight, both ways, and waits for
    /// them, [`STOP_WITHIN`] at most: a migration from this host stops at
    /// its next step (a dump or a hold under way ends at once) and rolls
    /// back, or finishes if it has handed over; a migration to this host
    /// rolls back between two steps (see [`destination::Host::stopping`]).
    async fn wait_for_migrations(&self, peer_links: Option<(JoinHandle<()>, mpsc::Receiver<()>)>) {
        let deadline = tokio::time::Instant::now() + STOP_WITHIN;
        // Hot replicas in sync are left as they are, for the next start.
        let left = self.leave_replicas();
        let tasks: Vec<(String, JoinHandle<()>)> = {
            let mut migrations = self.migrations.lock().unwrap();
            migrations
                .iter_mut()
                .filter_map(|(id, entry)| {
                    let in_sync = entry.report.replica.as_ref().map(|r| r.state)
                        == Some(crate::report::ReplicaState::InSync);
                    if !(left.contains(id) && in_sync) {
                        entry.abort.store(true, Ordering::Relaxed);
                    }
                    Some((id.clone(), entry.task.take()?))
                })
                .collect()
        };
        for (id, task) in tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(%id, "migration still running at exit; its journal finishes it at the next start");
            }
        }
        if let Some((listener, mut ended)) = peer_links {
            // No new links; the listener's own sender goes with it.
            listener.abort();
            let _ = listener.await;
            if tokio::time::timeout_at(deadline, ended.recv())
                .await
                .is_err()
            {
                tracing::warn!(
                    "a migration to this host still running at exit; its journal finishes it at \
                     the next start"
                );
            }
        }
    }
}

/// Forwards the kernel programs' aya-log records (they share one log map)
/// into this process's log stream, through the `log` crate's bridge to tracing.
async fn forward_kernel_logs(program_id: u32) {
    let logger = match aya_log::EbpfLogger::init_from_id(program_id) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("kernel program logs will not be shown: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives.
    let mut logger = match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("kernel program logs will not be shown: {e}");
            return;
        }
    };
    while let Ok(mut ready) = logger.readable_mut().await {
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
