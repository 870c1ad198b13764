//! `dataplane daemon`: owns the host's dataplane and serves the control
//! socket and the peer link.
//!
//! On start it re-adopts a pinned dataplane (as a restart after SIGKILL
//! finds it) or loads one from the configuration. On SIGTERM or SIGINT it
//! stops serving and leaves the dataplane pinned, attached and counting.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use dataplane_common::{FLOW_MIRROR, counter};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    sync::broadcast,
};

use crate::{
    config::DaemonConfig,
    control,
    control::{Line, Response, RpcError, code},
    kernel::{
        flow,
        loader::{Dataplane, LoadError, MAP_INPUTS, MAP_OUTPUTS},
        logs::{LogReader, Tap},
    },
    metrics, migration,
    migration::destination,
    peer,
    service::{FlowSpec, Service},
};

/// The daemon's state, shared by every connection.
pub struct Daemon {
    config: DaemonConfig,
    dataplane: Mutex<Dataplane>,
    adopted: bool,
    started: Instant,
    services: Arc<Mutex<BTreeMap<String, Service>>>,
    /// Every migration this daemon ran or runs, by id.
    migrations: Arc<Mutex<BTreeMap<String, MigrationEntry>>>,
    /// The standing readers of the input and output logs (set by `serve`).
    taps: std::sync::OnceLock<(Arc<Tap>, Arc<Tap>)>,
    /// Migration phase changes, for `migration.watch`.
    events: broadcast::Sender<Value>,
}

/// A migration's latest report, and its abort switch.
struct MigrationEntry {
    report: crate::report::Report,
    abort: Arc<AtomicBool>,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("socket group {0:?} does not exist")]
    NoGroup(String),
    #[error("peer link on {address}: {source}")]
    PeerListen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("reading the logs: {0}")]
    Log(std::io::Error),
}

impl Daemon {
    /// Adopts the pinned dataplane, or loads it as `config` says.
    pub fn start(config: DaemonConfig) -> Result<Self, DaemonError> {
        let options = config
            .load_options()
            .expect("the configuration was checked when read");
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
        match &config.peer_key {
            Some(key) => peer::set_key(key.clone()),
            None => tracing::warn!(
                "no peer_key configured: the peer link is unauthenticated, and any host that \
                 reaches peer_listen can drive a migration to this host; set the same peer_key \
                 on both daemons"
            ),
        }
        Ok(Self {
            config,
            dataplane: Mutex::new(dataplane),
            adopted,
            started: Instant::now(),
            services: Arc::new(Mutex::new(BTreeMap::new())),
            migrations: Arc::new(Mutex::new(BTreeMap::new())),
            taps: std::sync::OnceLock::new(),
            events: broadcast::channel(256).0,
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
        // Migrations the previous run of this daemon left half-done.
        crate::migration::journal::recover(
            &daemon.config.pin_root,
            &daemon.config.images_dir,
            daemon.config.standby_pin_root.as_deref(),
        );
        let criu = daemon.config.criu();
        tokio::task::spawn_blocking(move || criu.log_capabilities());
        if let Some(address) = daemon.config.peer_listen {
            let peers = TcpListener::bind(address)
                .await
                .map_err(|source| DaemonError::PeerListen { address, source })?;
            tracing::info!(%address, "serving the peer link");
            let host = destination::Host {
                images_root: daemon.config.images_dir.clone(),
                pin_root: daemon.config.pin_root.clone(),
                interface: daemon.config.interface.clone(),
                peer_interface: daemon.config.peer_interface.clone(),
                criu: daemon.config.criu(),
                inputs: Some(taps.0.clone()),
                outputs: Some(taps.1.clone()),
            };
            destination::recover(&host);
            let host = Arc::new(host);
            tokio::spawn(peer::serve(
                peers,
                daemon.config.peer_key.clone(),
                move |link, from| destination::serve_link(link, from, host.clone()),
            ));
        }
        // Last: a client that finds the socket finds the peer link up too.
        let listener = bind_socket(&daemon.config)?;
        let socket_path = daemon.config.socket.clone();
        tracing::info!(socket = %socket_path.display(), "serving the control socket");
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
        let connections = Arc::new(tokio::sync::Semaphore::new(
            daemon.config.socket_max_connections as usize,
        ));
        let mut turned_away = 0u64;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => match connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let daemon = daemon.clone();
                            tokio::spawn(async move {
                                daemon.serve_client(stream).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            turned_away += 1;
                            let most = daemon.config.socket_max_connections;
                            if turned_away.is_power_of_two() {
                                let peer = stream.peer_cred().ok();
                                tracing::warn!(
                                    pid = peer.and_then(|c| c.pid()),
                                    uid = peer.map(|c| c.uid()),
                                    gid = peer.map(|c| c.gid()),
                                    turned_away,
                                    "refused a control connection: {most} are open"
                                );
                            }
                            tokio::spawn(refuse_connection(stream, most));
                        }
                    },
                    Err(e) => tracing::warn!("accepting a control connection: {e}"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        // A migration in flight stops at its next phase and rolls back.
        for entry in daemon.migrations.lock().unwrap().values() {
            entry.abort.store(true, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(&socket_path);
        tracing::info!("stopped; the dataplane stays pinned and attached");
        Ok(())
    }

    async fn serve_client(self: Arc<Self>, stream: UnixStream) {
        let peer = stream.peer_cred().ok();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut watching: Option<broadcast::Receiver<Value>> = None;
        let (rate, burst) = (self.config.socket_rate, self.config.socket_burst);
        let mut limit = control::RateLimit::new(rate, burst);
        let mut limited = 0u64;
        loop {
            let line = match &mut watching {
                None => control::read_line(&mut reader).await,
                Some(events) => tokio::select! {
                    line = control::read_line(&mut reader) => line,
                    event = events.recv() => {
                        let out = match event {
                            Ok(params) => control::notification("migration.phase", params),
                            Err(broadcast::error::RecvError::Lagged(n)) => control::notification(
                                "migration.lagged", json!({"missed": n})),
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if write.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                },
            };
            if let Ok(Line::Text(_) | Line::TooLong) = &line
                && !limit.allow(Instant::now())
            {
                limited += 1;
                if limited.is_power_of_two() {
                    tracing::warn!(
                        pid = peer.and_then(|c| c.pid()),
                        uid = peer.map(|c| c.uid()),
                        gid = peer.map(|c| c.gid()),
                        limited,
                        "control connection rate limited: over {rate} requests a second"
                    );
                }
                let text = match &line {
                    Ok(Line::Text(text)) => &text[..],
                    _ => b"",
                };
                if let Some(reply) = control::rate_limited(text, rate, burst)
                    && write.write_all(reply.line().as_bytes()).await.is_err()
                {
                    return;
                }
                continue;
            }
            let reply = match line {
                Ok(Line::Closed) | Err(_) => return,
                Ok(Line::Endless) => {
                    let error = RpcError::new(
                        code::INVALID_REQUEST,
                        format!(
                            "request line over {} bytes and no end in sight: closing the connection",
                            control::MAX_SKIP
                        ),
                    );
                    let reply = Response::to(Value::Null, Err(error)).line();
                    let _ = write.write_all(reply.as_bytes()).await;
                    return;
                }
                Ok(Line::TooLong) => Some(Response::to(
                    Value::Null,
                    Err(RpcError::new(
                        code::INVALID_REQUEST,
                        format!("request line over {} bytes", control::MAX_LINE),
                    )),
                )),
                Ok(Line::Text(text)) => {
                    let (reply, watch) = self.answer(&text, watching.is_some(), peer).await;
                    if watch {
                        watching = Some(self.events.subscribe());
                    }
                    reply
                }
            };
            if let Some(reply) = reply
                && write.write_all(reply.line().as_bytes()).await.is_err()
            {
                return;
            }
        }
    }

    /// The reply to one request line (none for a notification), and whether
    /// the connection now streams migration events.
    async fn answer(
        &self,
        text: &[u8],
        streaming: bool,
        peer: Option<tokio::net::unix::UCred>,
    ) -> (Option<Response>, bool) {
        let request = match crate::control::parse_request(text) {
            Ok(request) => request,
            Err(response) => return (Some(*response), false),
        };
        let outcome = if streaming {
            Err(RpcError::new(
                code::STREAMING,
                "this connection streams migration.watch notifications; send requests on another connection",
            ))
        } else {
            if !is_read_only(&request.method) {
                tracing::info!(
                    method = %request.method,
                    pid = peer.and_then(|c| c.pid()),
                    uid = peer.map(|c| c.uid()),
                    gid = peer.map(|c| c.gid()),
                    "control request"
                );
            }
            self.call(&request.method, request.params).await
        };
        let watch = request.method == "migration.watch" && outcome.is_ok();
        let reply = request.id.map(|id| Response::to(id, outcome));
        (reply, watch)
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "status" => self.status(),
            "metrics" => Ok(Value::String(self.metrics()?)),
            "flow.add" => self.flow_add(params),
            "flow.remove" => self.flow_remove(params),
            "flow.list" => self.flow_list(),
            "service.register" => self.service_register(params),
            "service.unregister" => self.service_unregister(params),
            "service.list" => Ok(json!(
                self.services.lock().unwrap().values().collect::<Vec<_>>()
            )),
            "migration.start" => self.migration_start(params),
            "migration.status" => self.migration_status(params),
            "migration.abort" => {
                let MigrationId { id } = parse(params)?;
                match self.migrations.lock().unwrap().get(&id) {
                    Some(entry) if entry.report.state == "running" => {
                        entry.abort.store(true, Ordering::Relaxed);
                        Ok(json!({"aborting": id}))
                    }
                    Some(entry) => Err(RpcError::new(
                        code::CONFLICT,
                        format!("migration {id} is {} already", entry.report.state),
                    )),
                    None => Err(RpcError::new(code::NOT_FOUND, format!("no migration {id}"))),
                }
            }
            "migration.watch" => Ok(json!({"watching": true})),
            "peer.ping" => self.peer_ping(params).await,
            other => Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!("no method {other:?}; docs/api.md lists them"),
            )),
        }
    }

    fn status(&self) -> Result<Value, RpcError> {
        let dataplane = self.dataplane.lock().unwrap();
        let counters = dataplane.counters().map_err(dataplane_error)?;
        let counters: serde_json::Map<String, Value> = counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (name.to_string(), json!(counters.get(i as u32))))
            .collect();
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pin_root": dataplane.pin_root(),
            "adopted": self.adopted,
            "uptime_s": self.started.elapsed().as_secs(),
            "interfaces": {
                "service": self.config.interface,
                "peer": self.config.peer_interface,
            },
            "programs": dataplane.attached_programs().map_err(dataplane_error)?,
            "flows": flows_json(&dataplane)?,
            "counters": counters,
            "services": self.services.lock().unwrap().values().collect::<Vec<_>>(),
            "migrations": self.migrations.lock().unwrap().values().map(|e| &e.report).collect::<Vec<_>>(),
            "peer_listen": self.config.peer_listen,
            "peer_auth": self.config.peer_key.is_some(),
        }))
    }

    fn metrics(&self) -> Result<String, RpcError> {
        let dataplane = self.dataplane.lock().unwrap();
        let counters = dataplane.counters().map_err(dataplane_error)?;
        let flows = dataplane.flows().map_err(dataplane_error)?.len();
        Ok(metrics::render(
            &counters,
            flows,
            self.services.lock().unwrap().len(),
        ))
    }

    fn flow_add(&self, params: Value) -> Result<Value, RpcError> {
        let FlowParams {
            cps,
            service,
            mirror,
        } = parse(params)?;
        let key = flow::udp(cps, service);
        let flags = if mirror { FLOW_MIRROR } else { 0 };
        let id = self
            .dataplane
            .lock()
            .unwrap()
            .add_flow(key, flags)
            .map_err(dataplane_error)?;
        Ok(json!({"id": id, "flow": flow::display(&key)}))
    }

    fn flow_remove(&self, params: Value) -> Result<Value, RpcError> {
        let FlowSpec { cps, service } = parse(params)?;
        let key = flow::udp(cps, service);
        if let Some(user) = self
            .services
            .lock()
            .unwrap()
            .values()
            .find(|s| s.flows.iter().any(|f| flow::udp(f.cps, f.service) == key))
        {
            return Err(RpcError::new(
                code::CONFLICT,
                format!(
                    "service {} uses this flow: service.unregister it first",
                    user.name
                ),
            ));
        }
        self.dataplane
            .lock()
            .unwrap()
            .remove_flow(&key)
            .map_err(dataplane_error)?;
        Ok(json!({"removed": flow::display(&key)}))
    }

    fn flow_list(&self) -> Result<Value, RpcError> {
        flows_json(&self.dataplane.lock().unwrap())
    }

    fn service_register(&self, params: Value) -> Result<Value, RpcError> {
        let service: Service = parse(params)?;
        if service.name.is_empty() {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "a service needs a name",
            ));
        }
        for pid in std::iter::once(service.pid).chain(service.standby_pid) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(RpcError::new(code::NOT_FOUND, format!("no process {pid}")));
            }
        }
        if let Some(netns) = &service.netns
            && !Path::new(netns).exists()
        {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("no network namespace {netns}"),
            ));
        }
        let known = self
            .dataplane
            .lock()
            .unwrap()
            .flows()
            .map_err(dataplane_error)?;
        for f in &service.flows {
            let key = flow::udp(f.cps, f.service);
            if !known.iter().any(|(k, _)| *k == key) {
                return Err(RpcError::new(
                    code::NOT_FOUND,
                    format!(
                        "{} is not a known flow: flow.add it first",
                        flow::display(&key)
                    ),
                ));
            }
        }
        let mut services = self.services.lock().unwrap();
        if services.contains_key(&service.name) {
            return Err(RpcError::new(
                code::CONFLICT,
                format!("service {} is registered already", service.name),
            ));
        }
        if service.standby_pid.is_some() {
            self.feed_standby(&service)?;
        }
        let name = service.name.clone();
        services.insert(name.clone(), service);
        Ok(json!({"registered": name}))
    }

    /// Mirrors the service's flows to the standby's namespace, whose
    /// dataplane delivers them to the standby instance and keeps its
    /// outputs in (muted). The standby must get every input from its
    /// first: register the service before the CPS starts.
    fn feed_standby(&self, service: &Service) -> Result<(), RpcError> {
        let Some(pin_root) = &self.config.standby_pin_root else {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "a standby_pid needs a standby configured (standby_interface, standby_mac, \
                 standby_netns, standby_pin_root)",
            ));
        };
        let mut standby = Dataplane::open(pin_root).map_err(dataplane_error)?;
        let mut dataplane = self.dataplane.lock().unwrap();
        let flows = dataplane.flows().map_err(dataplane_error)?;
        for f in &service.flows {
            let key = flow::udp(f.cps, f.service);
            let Some((_, config)) = flows.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            standby
                .adopt_flow(key, config.flow_id, 0)
                .map_err(dataplane_error)?;
            let gate = dataplane_common::Gate {
                output: dataplane_common::OUTPUT_MUTE,
                // A replica fed in order from its first input: its
                // outputs are counted (a burst at the cutover must not
                // tag the answer to K as K+1's).
                tagging: dataplane_common::TAG_COUNTED,
                ..Default::default()
            };
            standby
                .set_gate(config.flow_id, gate)
                .map_err(dataplane_error)?;
            dataplane
                .set_flow_flags(&key, config.flags | dataplane_common::FLOW_STANDBY)
                .map_err(dataplane_error)?;
        }
        Ok(())
    }

    fn service_unregister(&self, params: Value) -> Result<Value, RpcError> {
        let ServiceName { name } = parse(params)?;
        match self.services.lock().unwrap().remove(&name) {
            Some(_) => Ok(json!({"unregistered": name})),
            None => Err(RpcError::new(code::NOT_FOUND, format!("no service {name}"))),
        }
    }

    fn migration_start(&self, params: Value) -> Result<Value, RpcError> {
        let request: migration::Request = parse(params)?;
        let Some(service) = self.services.lock().unwrap().get(&request.service).cloned() else {
            return Err(RpcError::new(
                code::NOT_FOUND,
                format!("no service {}", request.service),
            ));
        };
        let Some((inputs, outputs)) = self.taps.get().cloned() else {
            return Err(RpcError::new(
                code::INTERNAL_ERROR,
                "the log readers are not running",
            ));
        };
        let mut migrations = self.migrations.lock().unwrap();
        if migrations
            .values()
            .any(|e| e.report.state == "running" && e.report.service == service.name)
        {
            return Err(RpcError::new(
                code::CONFLICT,
                format!("service {} is migrating already", service.name),
            ));
        }
        let id = format!("{}-{}", service.name, migrations.len() + 1);
        let abort = Arc::new(AtomicBool::new(false));
        let report = crate::report::Report {
            id: id.clone(),
            service: service.name.clone(),
            to: request.to.to_string(),
            mode: request.mode,
            state: "running".into(),
            ..Default::default()
        };
        migrations.insert(
            id.clone(),
            MigrationEntry {
                report,
                abort: abort.clone(),
            },
        );
        let context = migration::Context {
            pin_root: self.config.pin_root.clone(),
            interface: self.config.interface.clone(),
            images_dir: self.config.images_dir.clone(),
            criu: self.config.criu(),
            inputs,
            outputs,
            standby: self
                .config
                .standby_netns
                .clone()
                .zip(self.config.standby_pin_root.clone()),
            abort,
        };
        let (table, events, services) = (
            self.migrations.clone(),
            self.events.clone(),
            self.services.clone(),
        );
        tracing::info!(%id, service = %service.name, to = %request.to, "migration started");
        let task_id = id.clone();
        tokio::spawn(async move {
            let progress = {
                let (table, events) = (table.clone(), events.clone());
                move |report: &crate::report::Report| {
                    if let Some(entry) = table.lock().unwrap().get_mut(&report.id) {
                        entry.report = report.clone();
                    }
                    let _ = events.send(json!(report));
                }
            };
            let report = migration::run(task_id, service, request, context, progress).await;
            match &report.error {
                None => {
                    tracing::info!(id = %report.id, total_us = report.total_us, "migration done");
                    // The service runs on the destination now.
                    services.lock().unwrap().remove(&report.service);
                }
                Some(e) => tracing::warn!(id = %report.id, "migration failed, rolled back: {e}"),
            }
        });
        Ok(json!({"id": id}))
    }

    fn migration_status(&self, params: Value) -> Result<Value, RpcError> {
        let migrations = self.migrations.lock().unwrap();
        if params.is_null() || params.as_object().is_some_and(|o| o.is_empty()) {
            let all: Vec<_> = migrations.values().map(|e| &e.report).collect();
            return Ok(json!(all));
        }
        let MigrationId { id } = parse(params)?;
        migrations
            .get(&id)
            .map(|e| json!(e.report))
            .ok_or_else(|| RpcError::new(code::NOT_FOUND, format!("no migration {id}")))
    }

    async fn peer_ping(&self, params: Value) -> Result<Value, RpcError> {
        let PeerAddress { address } = parse(params)?;
        let peer_error =
            |e: peer::PeerError| RpcError::new(code::PEER, format!("peer {address}: {e}"));
        let (mut stream, theirs) = peer::connect_with(address, self.config.peer_key.as_ref())
            .await
            .map_err(peer_error)?;
        let rtt = peer::ping(&mut stream).await.map_err(peer_error)?;
        Ok(
            json!({"host": theirs.host, "version": theirs.version, "rtt_us": rtt.as_micros() as u64}),
        )
    }
}

/// Methods that only read; every other request is logged with its
/// caller's credentials (pid, uid, gid).
fn is_read_only(method: &str) -> bool {
    matches!(
        method,
        "status"
            | "metrics"
            | "flow.list"
            | "service.list"
            | "migration.status"
            | "migration.watch"
    )
}

/// Tells a client over `socket_max_connections` why, and closes.
async fn refuse_connection(mut stream: UnixStream, most: u32) {
    let error = RpcError::new(
        code::BUSY,
        format!(
            "{most} control connections are open already (socket_max_connections): close one and retry"
        ),
    );
    let reply = Response::to(Value::Null, Err(error)).line();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        stream.write_all(reply.as_bytes()),
    )
    .await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowParams {
    cps: SocketAddr,
    service: SocketAddr,
    #[serde(default)]
    mirror: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceName {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationId {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerAddress {
    address: SocketAddr,
}

/// Parses a method's params, naming what is wrong with them.
fn parse<T: serde::de::DeserializeOwned>(params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params).map_err(|e| {
        RpcError::new(
            code::INVALID_PARAMS,
            format!("invalid params: {e}; see docs/api.md"),
        )
    })
}

fn dataplane_error(e: LoadError) -> RpcError {
    match e {
        LoadError::UnknownFlow(_) => RpcError::new(code::NOT_FOUND, e.to_string()),
        LoadError::DuplicateFlow(_) => RpcError::new(code::CONFLICT, e.to_string()),
        e => RpcError::new(code::DATAPLANE, e.to_string()),
    }
}

fn flows_json(dataplane: &Dataplane) -> Result<Value, RpcError> {
    let mut flows = Vec::new();
    for (key, config) in dataplane.flows().map_err(dataplane_error)? {
        let sequence = dataplane
            .sequence(config.flow_id)
            .map_err(dataplane_error)?;
        flows.push(json!({
            "id": config.flow_id,
            "cps": flow::source(&key),
            "service": flow::destination(&key),
            "mirror": config.flags & FLOW_MIRROR != 0,
            "last_seq": sequence.last_seq,
            "last_delivered": sequence.last_delivered,
        }));
    }
    flows.sort_by_key(|f| f["id"].as_u64());
    Ok(Value::Array(flows))
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

/// Binds the control socket: a stale file is replaced, the mode is 0660, and
/// the group is the configured one.
fn bind_socket(config: &DaemonConfig) -> Result<UnixListener, DaemonError> {
    let path = &config.socket;
    let err = |source| DaemonError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon serves it",
        )));
    }
    // Bound under a temporary name and renamed into place once its mode and
    // group are set, so no client ever finds it with looser permissions.
    let staging = path.with_extension(format!("staging-{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(err)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(group) = &config.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| DaemonError::NoGroup(group.clone()))?
            .gid;
        nix::unistd::chown(&staging, None, Some(gid)).map_err(|e| err(e.into()))?;
    }
    std::fs::rename(&staging, path).map_err(err)?;
    Ok(listener)
}
