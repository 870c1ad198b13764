//! A migration ready to start ([`MigrationSetup`]): two daemons and a
//! controller on the test hosts; the stop-and-copy and pre-copy baselines;
//! the CPS simulator's verdicts.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use dataplane_user::kernel::loader::Dataplane;

use crate::{
    container::Runtime,
    daemon::{DaemonProcess, Flow},
    hosts::{CPS_V4, CPS_V6, Loaded, SERVICE_V4, SERVICE_V6, TestHosts, sock},
    netns::NetNs,
    services::ChainService,
    timing::cpu_split,
};

/// Two daemons on `src` and `dst` with a peer link, and a Markov controller
/// on `src` registered as service "markov" on the flow 192.0.2.1:4000 ->
/// 192.0.2.10:5000 ([2001:db8::1]:4000 -> [2001:db8::10]:5000 with
/// [`MigrationSetup::ipv6`]): a migration ready to start.
pub struct MigrationSetup {
    pub hosts: TestHosts,
    pub src: DaemonProcess,
    pub dst: DaemonProcess,
    pub controller: ChainService,
    /// Standby mode: the standby's namespace (linked to `src` by the veth
    /// stby0), its dataplane and its controller.
    pub standby: Option<(Loaded, ChainService, NetNs)>,
    /// The controller's address (the same on both hosts).
    pub service: SocketAddr,
    /// The controller's flows: one, or (`with_devices`) one per field
    /// device, all to `service`.
    flows: Vec<Flow>,
    tag: String,
    /// [`MigrationSetup::containerised`]: src's and dst's container
    /// runtimes (dropped last: they delete what containers remain).
    pub runtimes: Option<(Runtime, Runtime)>,
}

/// The CPS's port on the flow of [`MigrationSetup`]'s service "markov".
const CPS_PORT: u16 = 4000;

/// The address of [`MigrationSetup::add_services`]'s services, on `src` only.
pub const EXTRA_SERVICE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

/// The destination daemon's peer link address in [`MigrationSetup`].
pub const DST_PEER: &str = "198.51.100.2:7070";
/// The source daemon's peer link address in [`MigrationSetup`] (it lists
/// it; it does not listen).
pub const SRC_PEER: &str = "198.51.100.1:7070";

impl MigrationSetup {
    /// Builds it; `controller_args` go to the controller after its address.
    /// With `standby`, a standby controller runs in a namespace of its own
    /// on the source host, fed by the source's dataplane.
    pub fn new(tag: &str, controller_args: &[&str], standby: bool) -> Self {
        Self::with_source_config(tag, controller_args, standby, "")
    }

    /// As `new`, with `extra` TOML lines in the source daemon's configuration.
    pub fn with_source_config(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        extra: &str,
    ) -> Self {
        Self::with_configs(tag, controller_args, standby, extra, "")
    }

    /// As `new`, with `src_extra` and `dst_extra` TOML lines in the source's
    /// and the destination's daemon configuration.
    pub fn with_configs(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        src_extra: &str,
        dst_extra: &str,
    ) -> Self {
        let flow = (sock(CPS_V4, CPS_PORT), sock(SERVICE_V4, 5000));
        Self::build(
            tag,
            controller_args,
            standby,
            (src_extra, dst_extra),
            vec![flow],
            None,
        )
    }

    /// As `new`, the controller (and the standby) as containers `markov`
    /// (`markov-standby`) of image "markov-controller" in src's runtime,
    /// started as `start` says; the image is in dst's store too
    /// (`dst_image`: false leaves it out).
    pub fn containerised(
        tag: &str,
        controller_args: &[&str],
        (standby, start): (bool, ContainerStart),
        dst_image: bool,
    ) -> Self {
        let podman = start == ContainerStart::ByPodman;
        let runtimes = (
            Runtime::new(tag, "src", podman),
            Runtime::new(tag, "dst", podman),
        );
        runtimes.0.install_image(CONTROLLER).expect("src's image");
        if dst_image {
            runtimes.1.install_image(CONTROLLER).expect("dst's image");
        }
        let flow = (sock(CPS_V4, CPS_PORT), sock(SERVICE_V4, 5000));
        let (src_extra, dst_extra) = (runtimes.0.config(), runtimes.1.config());
        Self::build(
            tag,
            controller_args,
            standby,
            (&src_extra, &dst_extra),
            vec![flow],
            Some((runtimes, start)),
        )
    }

    /// As `new`, the controller serving `devices` field devices (flows
    /// from CPS ports 4000.. to 192.0.2.10:5000, `--per-device`).
    pub fn with_devices(tag: &str, controller_args: &[&str], devices: u16, standby: bool) -> Self {
        let service = sock(SERVICE_V4, 5000);
        let flows = (0..devices)
            .map(|i| (sock(CPS_V4, CPS_PORT + i), service))
            .collect();
        let mut args = controller_args.to_vec();
        args.push("--per-device");
        Self::build(tag, &args, standby, ("", ""), flows, None)
    }

    /// As `new` without a standby, the controller on the IPv6 flow.
    pub fn ipv6(tag: &str) -> Self {
        Self::ipv6_with_configs(tag, "", "")
    }

    /// As `ipv6`, with these lines added to src's and dst's configurations.
    pub fn ipv6_with_configs(tag: &str, src_extra: &str, dst_extra: &str) -> Self {
        let flow = (
            SocketAddr::from((CPS_V6, CPS_PORT)),
            SocketAddr::from((SERVICE_V6, 5000)),
        );
        Self::build(tag, &[], false, (src_extra, dst_extra), vec![flow], None)
    }

    fn build(
        tag: &str,
        controller_args: &[&str],
        standby: bool,
        (src_extra, dst_extra): (&str, &str),
        flows: Vec<Flow>,
        containers: Option<((Runtime, Runtime), ContainerStart)>,
    ) -> Self {
        let service = flows[0].1;
        let hosts = TestHosts::new(tag);
        let standby_ns = standby.then(|| hosts.add_standby());
        let standby_dataplane = standby_ns
            .as_ref()
            .map(|ns| Loaded::new(ns, &hosts.standby_options()));
        let standby_config = standby_ns
            .as_ref()
            .map(|ns| {
                format!(
                    "standby_interface = \"stby0\"\n\
                     standby_netns = \"{}\"\nstandby_pin_root = \"{}\"\n",
                    ns.path().display(),
                    hosts.pin_root("stb").display()
                )
            })
            .unwrap_or_default();
        let config = |host: &str, peer: (&str, &str), listen: &str| {
            // `extra` may size the input ring itself (TOML refuses a key twice).
            let ring = if listen.contains("input_ring_mib") {
                ""
            } else {
                "input_ring_mib = 8\n"
            };
            format!(
                "interface = \"eth0\"\npeer_interface = \"peer0\"\n\
                 pin_root = \"{}\"\n{ring}output_ring_mib = 4\n\
                 images_dir = \"/tmp/dataplane-test-{}-{tag}-{host}-images\"\n\
                 {}{listen}",
                hosts.pin_root(host).display(),
                std::process::id(),
                hosts.peer_config(host, &[peer]),
            )
        };
        let src_config = config(
            "src",
            ("dst", DST_PEER),
            &format!("{standby_config}{src_extra}"),
        );
        let dst_config = config(
            "dst",
            ("src", SRC_PEER),
            &format!("peer_listen = \"{DST_PEER}\"\n{dst_extra}"),
        );
        let src = DaemonProcess::start(&hosts.src, &format!("{tag}-src"), &src_config);
        let dst = DaemonProcess::start(&hosts.dst, &format!("{tag}-dst"), &dst_config);
        let mut args = vec![service.to_string()];
        args.extend(controller_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The daemon registers the containers it starts; the test, the rest.
        let by_daemon = matches!(containers, Some((_, ContainerStart::ByDaemon)));
        let (controller, standby_controller) = match &containers {
            Some((runtimes, ContainerStart::ByDaemon)) => {
                start_containers(&src, &runtimes.0, &args, &flows, standby)
            }
            _ => {
                let start = |host: &NetNs, id: &str| match &containers {
                    Some(((src, _), _)) => {
                        ChainService::in_container(host, src, id, (CONTROLLER, &args), service)
                    }
                    None => ChainService::spawn(host, CONTROLLER, &args, service),
                };
                let controller = start(&hosts.src, "markov");
                let standby_controller = standby_ns.as_ref().map(|ns| {
                    let standby = start(ns, "markov-standby");
                    // The standby only has to be fed; it serves nothing until
                    // it is checkpointed and restored (with the primary's
                    // CPUs). Off the real-time CPU it takes no time from the
                    // serving instance.
                    if let Some((_, machinery)) = cpu_split() {
                        dataplane_user::host::tasks::pin(standby.pid, &[machinery])
                            .expect("pin the standby");
                    }
                    standby
                });
                for &flow in &flows {
                    src.add_flow(flow);
                }
                (controller, standby_controller)
            }
        };
        let standby = standby_ns.map(|ns| {
            (
                standby_dataplane.expect("loaded with the namespace"),
                standby_controller.expect("started with the namespace"),
                ns,
            )
        });
        let setup = Self {
            hosts,
            src,
            dst,
            controller,
            standby,
            service,
            flows,
            tag: tag.to_string(),
            runtimes: containers.map(|c| c.0),
        };
        if !by_daemon {
            setup.register();
        }
        setup
    }

    /// Asserts that the source daemon knows service "markov" with its
    /// controller: after a restart, from the registry it keeps on disk.
    pub fn assert_registered(&self) {
        let list = self
            .src
            .client()
            .call("service.list", serde_json::json!({}))
            .expect("service.list");
        let known = list.as_array().is_some_and(|services| {
            services
                .iter()
                .any(|s| s["name"] == "markov" && s["pid"] == self.controller.pid)
        });
        assert!(known, "service markov is not known to src: {list}");
    }

    /// Registers the controller (and its standby) as service "markov" on
    /// the source daemon.
    fn register(&self) {
        let standby = self.standby.is_some();
        let service = match &self.runtimes {
            // By container id: the daemon finds the processes.
            Some((src, _)) => serde_json::json!({"container": "markov",
                "standby_container": standby.then_some("markov-standby"),
                "runtime": src.name()}),
            None => serde_json::json!({"pid": self.controller.pid,
                "standby_pid": self.standby.as_ref().map(|s| s.1.pid)}),
        };
        self.register_service("markov", service, &self.flows);
    }

    /// Registers service `name` on src with `fields` (its processes or
    /// containers) and `flows`.
    fn register_service(&self, name: &str, mut fields: serde_json::Value, flows: &[Flow]) {
        let flows: Vec<_> = flows
            .iter()
            .map(|(cps, service)| serde_json::json!({"cps": cps, "service": service}))
            .collect();
        let fields = fields.as_object_mut().expect("an object");
        fields.insert("name".into(), name.into());
        fields.insert("flows".into(), flows.into());
        self.src
            .client()
            .call("service.register", fields.clone().into())
            .expect("service.register");
    }

    /// The (first) flow of service "markov": (the CPS's end, the service's).
    pub fn flow(&self) -> Flow {
        self.flows[0]
    }

    /// The id of service "markov"'s flow in the source's dataplane.
    pub fn source_flow_id(&self) -> u32 {
        let key = dataplane_user::kernel::flow::udp(self.flows[0].0, self.service);
        let flows = Dataplane::open(&self.hosts.pin_root("src"))
            .and_then(|d| d.flows())
            .expect("the source's flows");
        flows
            .into_iter()
            .find_map(|(k, config)| (k == key).then_some(config.flow_id))
            .expect("service markov's flow on the source")
    }

    /// Starts `n` more Markov controllers on `src` (no standby), on
    /// [`EXTRA_SERVICE_V4`] ports 5001.., each on its own flow from CPS
    /// port 4001.. and registered as service "markov-I". Their address is
    /// not the migrated service's: a migration's announce moves that address,
    /// every port of it, to `dst`, and these stay on `src`. Call it once.
    pub fn add_services(&self, n: u16) -> Vec<(ChainService, Flow)> {
        self.hosts.src.ip(&[
            "addr",
            "add",
            &format!("{EXTRA_SERVICE_V4}/24"),
            "dev",
            "eth0",
        ]);
        (1..=n)
            .map(|i| {
                let flow = (
                    sock(CPS_V4, CPS_PORT + i),
                    sock(EXTRA_SERVICE_V4, self.service.port() + i),
                );
                let addr = flow.1.to_string();
                let controller =
                    ChainService::spawn(&self.hosts.src, "markov-controller", &[&addr], flow.1);
                self.src.add_flow(flow);
                let pid = serde_json::json!({"pid": controller.pid});
                self.register_service(&format!("markov-{i}"), pid, &[flow]);
                (controller, flow)
            })
            .collect()
    }

    /// Starts the CPS simulator on `cps`: `count` inputs every `period_us`,
    /// with its per-cycle trace written to `trace` if given.
    pub fn start_cps(
        &self,
        count: u64,
        period_us: u64,
        trace: Option<&std::path::Path>,
    ) -> std::process::Child {
        let mut command = self.hosts.cps_command(&self.flows, count, period_us);
        if let Some(trace) = trace {
            command.arg("--trace").arg(trace);
        }
        command.spawn().expect("start the CPS simulator")
    }

    /// Stops the source host: both its interfaces go down together (one
    /// `ip -batch`, microseconds apart), then its daemon and its
    /// controller are SIGKILLed.
    pub fn stop_source_host(&mut self) {
        self.source_links_down();
        self.src.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
        crate::kill_pid(self.controller.pid as u64);
    }

    /// Stops the source host as a power cut would, for a measurement: as
    /// [`MigrationSetup::stop_source_host`], but its daemon and controller
    /// are frozen (SIGSTOP), not killed. Killed processes are torn down on
    /// this machine's CPUs, which the other test hosts share, for
    /// milliseconds; a host that loses power costs its neighbours nothing.
    /// They are killed with the setup.
    pub fn freeze_source_host(&mut self) {
        self.source_links_down();
        for pid in [self.src.pid(), self.controller.pid] {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    fn source_links_down(&self) {
        let batch = std::env::temp_dir().join(format!("dp-{}-stop-src", self.tag));
        std::fs::write(&batch, "link set eth0 down\nlink set peer0 down\n")
            .expect("write the batch");
        self.hosts.src.ip(&["-batch", &batch.to_string_lossy()]);
        let _ = std::fs::remove_file(&batch);
    }

    /// As `start_cps` without a trace, with more `args` for the simulator.
    pub fn start_cps_with(&self, count: u64, period_us: u64, args: &[&str]) -> std::process::Child {
        let mut command = self.hosts.cps_command(&self.flows, count, period_us);
        command.args(args);
        command.spawn().expect("start the CPS simulator")
    }

    /// As `start_cps`, sending `burst` inputs at 20 kHz on each SIGUSR1.
    pub fn start_bursty_cps(
        &self,
        count: u64,
        period_us: u64,
        burst: u64,
        trace: &std::path::Path,
    ) -> std::process::Child {
        let mut command = self.hosts.cps_command(&self.flows, count, period_us);
        command
            .args(["--burst", &burst.to_string()])
            .arg("--trace")
            .arg(trace);
        command.spawn().expect("start the CPS simulator")
    }

    /// The destination daemon's image directory.
    pub fn dst_images_dir(&self) -> PathBuf {
        self.images_dir("dst")
    }

    /// The image directory of `host`'s daemon ("src" or "dst").
    pub fn images_dir(&self, host: &str) -> PathBuf {
        PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{}-{host}-images",
            std::process::id(),
            self.tag
        ))
    }

    /// What a migration rolled back must not leave on dst, one line each:
    /// a restored instance in its namespace, a flow in its dataplane, a
    /// file (images, a journal) in its images_dir. Empty: nothing.
    pub fn left_on_dst(&self) -> Vec<String> {
        let instances = Self::instances_on(&self.hosts.dst)
            .into_iter()
            .map(|p| format!("instance {p}"));
        let flows = Dataplane::open(&self.hosts.pin_root("dst"))
            .and_then(|d| d.flows())
            .expect("dst's flows")
            .into_iter()
            .map(|(key, _)| format!("flow {}", dataplane_user::kernel::flow::display(&key)));
        let files = files_under(&self.dst_images_dir()).into_iter();
        instances.chain(flows).chain(files).collect()
    }

    /// The controller instances running in `host`'s network namespace.
    pub fn instances_on(host: &crate::NetNs) -> Vec<u32> {
        crate::pids_named(CONTROLLER_COMM)
            .into_iter()
            .filter(|&p| crate::in_netns(p, host))
            .collect()
    }

    /// Subscribes to `migration.watch` on the source, lets the CPS run
    /// 300 ms, and starts a migration with `params`: the phase stream and
    /// the migration's id.
    pub fn migrate_watched(
        &self,
        params: serde_json::Value,
    ) -> (dataplane_user::control::client::Client, String) {
        let mut watcher = self.src.client();
        watcher
            .call("migration.watch", serde_json::json!({}))
            .expect("migration.watch");
        std::thread::sleep(Duration::from_millis(300));
        (watcher, self.migrate(params))
    }

    /// Starts the CPS for `cycles` at 1 ms, migrates "markov" to `dst` with
    /// `params` added `lead` later, and waits for both to end: the final
    /// report and the CPS's verdict.
    pub fn migrate_while_cps_runs(
        &self,
        cycles: u64,
        lead: Duration,
        params: serde_json::Value,
    ) -> (serde_json::Value, serde_json::Value) {
        let cps = self.start_cps(cycles, 1000, None);
        std::thread::sleep(lead);
        let id = self.migrate(params);
        let report = self.wait(&id);
        (report, cps_verdict(cps))
    }

    /// Starts migrating "markov" to `dst` with `params` added; the migration id.
    pub fn migrate(&self, params: serde_json::Value) -> String {
        self.start_on_src("migration.start", params)
    }

    /// Calls `method` ("migration.start", "replica.start") on `src` for
    /// "markov" to `dst` with `params` added: the id it answers.
    fn start_on_src(&self, method: &str, params: serde_json::Value) -> String {
        let mut request = serde_json::json!({"service": "markov", "to": DST_PEER});
        request
            .as_object_mut()
            .unwrap()
            .extend(params.as_object().cloned().unwrap_or_default());
        let started = self.src.client().call(method, request).expect(method);
        started["id"].as_str().expect("an id").to_string()
    }

    /// Waits for migration `id` to end; its final report.
    pub fn wait(&self, id: &str) -> serde_json::Value {
        self.src.wait_for_migration(id)
    }

    /// Starts a hot replica of "markov" on `dst` with `params` added
    /// (`replica.start`); the replica's id.
    pub fn replicate(&self, params: serde_json::Value) -> String {
        self.start_on_src("replica.start", params)
    }

    /// Waits (60 s at most) until hot replica `id` is in sync or has
    /// ended; its report then.
    pub fn wait_in_sync(&self, id: &str) -> serde_json::Value {
        self.src
            .wait_for_report(id, |report| report["replica"]["state"] == "in_sync")
    }
}

impl Drop for MigrationSetup {
    /// Instances a migration restored outlive the daemons by design (a
    /// failover's, a test's that failed before it killed its own): they
    /// end with the test hosts. The daemons' image directories go too.
    fn drop(&mut self) {
        for host in [&self.hosts.src, &self.hosts.dst] {
            for pid in Self::instances_on(host) {
                crate::kill_pid(pid.into());
            }
        }
        // A failed test's are kept: CRIU's logs are there.
        if !std::thread::panicking() {
            for host in ["src", "dst"] {
                let _ = std::fs::remove_dir_all(self.images_dir(host));
            }
        }
    }
}

/// What a stop-and-copy migration took, phase by phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct StopAndCopy {
    /// The restored controller on `dst` (this process's child).
    pub pid: u32,
    /// The dump, with any pre-dump rounds before it.
    pub dump: Duration,
    /// CRIU's frozen time of the final dump, from stats-dump.
    pub frozen: Duration,
    pub copy: Duration,
    pub restore: Duration,
    pub image_bytes: u64,
    /// Pre-dump rounds taken (pre-copy only).
    pub rounds: usize,
}

impl MigrationSetup {
    /// The classic migration of the controller, the papers' baseline: CRIU
    /// dump (the service stops), copy the images, CRIU restore on `dst`,
    /// take the address there and announce it. Inputs meanwhile are lost.
    pub fn stop_and_copy(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
    ) -> anyhow::Result<StopAndCopy> {
        self.dump_copy_restore(images, copied, None)
    }

    /// kaur2020's iterative pre-copy of the controller: pre-dump rounds
    /// while it runs, stopped by `policy`, then the final dump, copy and
    /// restore as in `stop_and_copy`. CRIU's driver takes a single dump
    /// where the kernel cannot track memory (`rounds` is then 0).
    pub fn pre_copy(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        policy: &dataplane_user::planning::policy::StopPolicy,
    ) -> anyhow::Result<StopAndCopy> {
        self.dump_copy_restore(images, copied, Some(policy))
    }

    /// Runs CRIU where the daemons would: on the machinery's CPU when the
    /// run pins (CRIU's tasks inherit this thread's CPUs), and gives the
    /// restored controller its source's CPUs, as the destination daemon
    /// does; the baselines then pay what our live modes pay for CRIU.
    fn dump_copy_restore(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        precopy: Option<&dataplane_user::planning::policy::StopPolicy>,
    ) -> anyhow::Result<StopAndCopy> {
        use nix::{sched::CpuSet, unistd::Pid};
        let here = Pid::from_raw(0);
        let before = nix::sched::sched_getaffinity(here)?;
        if let Some((_, machinery)) = cpu_split() {
            let mut set = CpuSet::new();
            set.set(machinery)?;
            nix::sched::sched_setaffinity(here, &set)?;
        }
        let source_cpus =
            dataplane_user::host::tasks::cpus_of(self.controller.pid).unwrap_or_default();
        let outcome = self.dump_copy_restore_here(images, copied, precopy);
        nix::sched::sched_setaffinity(here, &before)?;
        let outcome = outcome?;
        if !source_cpus.is_empty() {
            dataplane_user::host::tasks::pin(outcome.pid, &source_cpus)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(outcome)
    }

    fn dump_copy_restore_here(
        &self,
        images: &std::path::Path,
        copied: &std::path::Path,
        precopy: Option<&dataplane_user::planning::policy::StopPolicy>,
    ) -> anyhow::Result<StopAndCopy> {
        use dataplane_user::criu::{
            Criu, DumpRequest, RestoreRequest, netns_inode, open_netns, stats,
        };
        let criu = Criu::default();
        let pid = self.controller.pid;
        let dump = DumpRequest {
            pid,
            images_dir: images.to_owned(),
            external: vec![format!("net[{}]:extnet", netns_inode(pid)?)],
            ..Default::default()
        };
        let start = std::time::Instant::now();
        let rounds = match precopy {
            Some(policy) => criu.iterative_dump(&dump, policy)?.rounds.len(),
            None => {
                criu.dump(&dump, false, &mut |_| true)?;
                0
            }
        };
        let dumped = start.elapsed();
        let frozen = Duration::from_micros(stats::dump(images).map_or(0, |s| s.frozen_time.into()));
        // Pre-dump rounds sit in subdirectories: copy the tree.
        let image_bytes = copy_tree(images, copied)?;
        let copied_at = start.elapsed();
        let netns = open_netns(&self.hosts.dst.path())?;
        let restore = RestoreRequest {
            images_dir: copied.to_owned(),
            inherit: vec![("extnet".into(), &netns)],
        };
        let restored = criu.restore(&restore, &mut |_, _| true)?;
        self.hosts.dst.run(|| -> anyhow::Result<()> {
            let addr = SERVICE_V4;
            dataplane_user::host::netdev::own_address("eth0", addr.into())?;
            dataplane_user::host::netdev::gratuitous_arp("eth0", addr)?;
            Ok(())
        })?;
        Ok(StopAndCopy {
            pid: restored,
            dump: dumped,
            frozen,
            copy: copied_at - dumped,
            restore: start.elapsed() - copied_at,
            image_bytes,
            rounds,
        })
    }
}

/// The controller's name in /proc (comm keeps 15 bytes).
pub const CONTROLLER_COMM: &str = "markov-controll";

/// The controller's program (and image) name.
const CONTROLLER: &str = "markov-controller";

/// Who starts [`MigrationSetup::containerised`]'s containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerStart {
    /// runc, from a bundle the test writes; then `service.register` by
    /// container id, as for a container an admin started.
    ByRunc,
    /// podman (`podman run --rootfs`), each host with its own storage;
    /// then `service.register` by container name, runtime podman.
    ByPodman,
    /// src's daemon: `service.start` with the image.
    ByDaemon,
}

/// Has `src`'s daemon start service "markov" (and its standby) as
/// containers of the controller's image in `runtime` (`service.start`
/// with `image`), the controller given `args`, fed by `flows`: handles
/// that delete the containers on drop.
fn start_containers(
    src: &DaemonProcess,
    runtime: &Runtime,
    args: &[&str],
    flows: &[Flow],
    standby: bool,
) -> (ChainService, Option<ChainService>) {
    let mut command = vec![format!("/bin/{CONTROLLER}")];
    command.extend(args.iter().map(|a| a.to_string()));
    let flows: Vec<_> = flows
        .iter()
        .map(|(cps, service)| serde_json::json!({"cps": cps, "service": service}))
        .collect();
    let started = src
        .client()
        .call(
            "service.start",
            serde_json::json!({"name": "markov", "flows": flows, "standby": standby,
                "command": command, "image": CONTROLLER}),
        )
        .expect("service.start with an image");
    let services = runtime.services_dir().join("markov");
    let handle = |id: &str, pid: &serde_json::Value, bundle: PathBuf| {
        let pid = pid.as_u64().expect("a pid") as u32;
        ChainService::of(runtime.adopt(id, bundle, pid))
    };
    let controller = handle("markov", &started["pid"], services.join("bundle"));
    let standby = standby.then(|| {
        handle(
            "markov-standby",
            &started["standby_pid"],
            services.join("standby/bundle"),
        )
    });
    (controller, standby)
}

/// Every file under `dir` (none if it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| match e.file_type().is_ok_and(|t| t.is_dir()) {
            true => files_under(&e.path()),
            false => vec![e.path().display().to_string()],
        })
        .collect()
}

/// Copies the directory tree `from` to `to`; the bytes copied.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(to)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        bytes += if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?
        } else {
            std::fs::copy(entry.path(), target)?
        };
    }
    Ok(bytes)
}

/// Waits for a CPS simulator to finish; its verdict.
pub fn cps_verdict(child: std::process::Child) -> serde_json::Value {
    cps_verdicts(child).swap_remove(0)
}

/// Waits for a CPS simulator to finish; its verdict on each flow.
pub fn cps_verdicts(child: std::process::Child) -> Vec<serde_json::Value> {
    let output = child.wait_with_output().expect("the CPS simulator");
    assert!(output.status.success(), "cps-sim failed: {}", output.status);
    output
        .stdout
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("a JSON verdict"))
        .collect()
}
