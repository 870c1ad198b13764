//! A cell of three hosts ([`Cell`]): `a`, `b` and `c` on one service
//! network and one migration network, each with a daemon that lists the
//! two others and listens for them, and services that move among them.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    daemon::{DaemonProcess, Flow},
    hosts::{HostAddresses, TestHosts},
    migration::CONTROLLER_COMM,
    netns::NetNs,
    services::{ChainService, in_netns, in_netns_at, kill_pid, pids_named},
    timing::service_config,
};

/// The cell's hosts, by name.
pub const CELL: [&str; 3] = ["a", "b", "c"];

/// `c`'s own addresses (`a` is [`TestHosts::src`], `b` is [`TestHosts::dst`]).
pub const C_ADDRESSES: HostAddresses = (
    Ipv4Addr::new(192, 0, 2, 40),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x40),
    Ipv4Addr::new(198, 51, 100, 4),
);

/// Three hosts and their daemons. `a` is the test hosts' `src` (the
/// service address 192.0.2.10 on its eth0), `b` their `dst` (that address
/// on lo), `c` one more host with no service address at all, whose peer
/// link is on the service network. Each daemon builds a place for
/// standbys; the services it starts run in one directory all hosts share,
/// as /var/lib/dataplane/services is the same path on every host.
pub struct Cell {
    pub hosts: TestHosts,
    c: NetNs,
    /// In [`CELL`]'s order.
    daemons: Vec<DaemonProcess>,
    /// The daemons' `services_dir`.
    services_dir: std::path::PathBuf,
    /// The daemons' `images_dir`s.
    images_dirs: Vec<std::path::PathBuf>,
}

impl Cell {
    /// Builds it; `tag` keeps names apart between tests of one process.
    pub fn new(tag: &str) -> Self {
        let hosts = TestHosts::new(tag);
        let c = hosts.add_host("c", C_ADDRESSES);
        let services_dir = std::path::PathBuf::from(format!(
            "/tmp/dataplane-test-{}-{tag}-services",
            std::process::id()
        ));
        let mut cell = Self {
            hosts,
            c,
            daemons: Vec::new(),
            services_dir,
            images_dirs: Vec::new(),
        };
        for name in CELL {
            let others: Vec<(&str, String)> = CELL
                .iter()
                .filter(|&&o| o != name)
                .map(|&o| (o, Self::peer(o)))
                .collect();
            let others: Vec<(&str, &str)> = others.iter().map(|(o, a)| (*o, a.as_str())).collect();
            let images_dir = std::path::PathBuf::from(format!(
                "/tmp/dataplane-test-{}-{tag}-{name}-images",
                std::process::id()
            ));
            let config = format!(
                "interface = \"eth0\"\npeer_interface = \"peer0\"\npin_root = \"{}\"\n\
                 input_ring_mib = 8\noutput_ring_mib = 4\n\
                 images_dir = \"{}\"\n\
                 services_dir = \"{}\"\npeer_listen = \"{}\"\n{}{}{}",
                cell.hosts.pin_root(name).display(),
                images_dir.display(),
                cell.services_dir.display(),
                Self::peer(name),
                cell.hosts.peer_config(name, &others),
                cell.hosts.standby_config(name),
                service_config(),
            );
            let daemon = DaemonProcess::start(cell.host(name), &format!("{tag}-{name}"), &config);
            cell.daemons.push(daemon);
            cell.images_dirs.push(images_dir);
        }
        cell
    }

    /// The network namespace of host `name`.
    pub fn host(&self, name: &str) -> &NetNs {
        host_of(&self.hosts, &self.c, name)
    }

    /// The daemon of host `name`.
    pub fn daemon(&self, name: &str) -> &DaemonProcess {
        &self.daemons[Self::index(name)]
    }

    /// SIGKILLs host `name`'s daemon and starts it again.
    pub fn kill_and_restart(&mut self, name: &str) {
        let host = host_of(&self.hosts, &self.c, name);
        self.daemons[Self::index(name)].kill_and_restart(host);
    }

    fn index(name: &str) -> usize {
        CELL.iter()
            .position(|&n| n == name)
            .unwrap_or_else(|| panic!("no host {name} in the cell"))
    }

    /// Host `name`'s peer-link address: on the migration network for `a`
    /// and `b`; `c`'s peer link runs on the service network, apart from its
    /// mirror copies (which a source learns to address at `prepare`).
    pub fn peer(name: &str) -> String {
        match name {
            "a" => "198.51.100.1:7070",
            "b" => "198.51.100.2:7070",
            _ => "192.0.2.40:7070",
        }
        .to_string()
    }

    /// Starts a Markov controller on host `on` serving `flows` (with
    /// several, all to one service address and port: one field device
    /// each, `--per-device`), makes the service address that host's (a
    /// /32 on its eth0, unless it has it already) and registers it there
    /// as service `name`.
    pub fn start_service(&self, on: &str, name: &str, flows: &[Flow]) -> ChainService {
        let (host, service) = (self.host(on), flows[0].1);
        self.give_address(on, service);
        let address = service.to_string();
        let mut args = vec![address.as_str()];
        if flows.len() > 1 {
            args.push("--per-device");
        }
        let controller = ChainService::spawn(host, "markov-controller", &args, service);
        let daemon = self.daemon(on);
        for &flow in flows {
            daemon.add_flow(flow);
        }
        let flows = flows_json(flows);
        daemon
            .client()
            .call(
                "service.register",
                serde_json::json!({"name": name, "pid": controller.pid, "flows": flows}),
            )
            .expect("service.register");
        controller
    }

    /// Makes `service`'s address host `on`'s (a /32 on its eth0), unless
    /// it has it already.
    fn give_address(&self, on: &str, service: SocketAddr) {
        let host = self.host(on);
        if !host.run(|| dataplane_user::host::netdev::is_local(service.ip())) {
            let address = format!("{}/32", service.ip());
            host.ip(&["addr", "add", &address, "dev", "eth0"]);
        }
    }

    /// Has host `on`'s daemon start a Markov controller serving `flows` (as
    /// [`Self::start_service`]) as service `name`, with a standby if
    /// `standby` (`service.start`): its answer.
    pub fn start_by_daemon(
        &self,
        on: &str,
        name: &str,
        flows: &[Flow],
        standby: bool,
    ) -> serde_json::Value {
        let service = flows[0].1;
        self.give_address(on, service);
        let program = crate::daemon::dataplane_bin().with_file_name("markov-controller");
        let mut command = vec![program.display().to_string(), service.to_string()];
        if flows.len() > 1 {
            command.push("--per-device".into());
        }
        let flows = flows_json(flows);
        self.daemon(on)
            .client()
            .call(
                "service.start",
                serde_json::json!({"name": name, "flows": flows, "standby": standby,
                    "command": command}),
            )
            .expect("service.start")
    }

    /// Starts the CPS driving `flows`, `cycles` inputs on each at 1 ms,
    /// and lets it run 300 ms.
    pub fn start_cps(&self, flows: &[Flow], cycles: u64) -> std::process::Child {
        let cps = self
            .hosts
            .cps_command(flows, cycles, 1000)
            .spawn()
            .expect("start the CPS");
        std::thread::sleep(std::time::Duration::from_millis(300));
        cps
    }

    /// Starts migrating service `service` from host `from` to host `to`
    /// in `mode`: the migration's id.
    pub fn migrate(&self, service: &str, from: &str, to: &str, mode: &str) -> String {
        let started = self
            .daemon(from)
            .client()
            .call(
                "migration.start",
                serde_json::json!({"service": service, "to": Self::peer(to), "mode": mode}),
            )
            .expect("migration.start");
        started["id"].as_str().expect("an id").to_string()
    }

    /// Waits for migration `id` of host `from` to end: its final report.
    pub fn wait(&self, from: &str, id: &str) -> serde_json::Value {
        self.daemon(from).wait_for_migration(id)
    }

    /// The services host `name`'s daemon knows (`service.list`).
    pub fn services(&self, name: &str) -> Vec<serde_json::Value> {
        let list = self
            .daemon(name)
            .client()
            .call("service.list", serde_json::json!({}))
            .expect("service.list");
        list.as_array().cloned().unwrap_or_default()
    }

    /// Waits until host `name` has a standby of `service` registered (one
    /// seeded after a migration brought it there): its pid.
    pub fn wait_for_standby(&self, name: &str, service: &str) -> u32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let services = self.services(name);
            let entry = services.iter().find(|s| s["name"] == service);
            if let Some(pid) = entry.and_then(|s| s["standby_pid"].as_u64()) {
                return pid as u32;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{service} got no standby on {name}: {services:?}\n{}",
                self.daemon(name).log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Whether host `name` holds `address` (on any interface).
    pub fn holds(&self, name: &str, address: SocketAddr) -> bool {
        self.host(name)
            .run(|| dataplane_user::host::netdev::is_local(address.ip()))
    }

    /// The flows in host `name`'s dataplane.
    pub fn flows(&self, name: &str) -> Vec<String> {
        dataplane_user::kernel::loader::Dataplane::open(&self.hosts.pin_root(name))
            .and_then(|d| d.flows())
            .expect("the host's flows")
            .iter()
            .map(|(key, _)| dataplane_user::kernel::flow::display(key))
            .collect()
    }
}

/// `flows` as the control socket takes them.
pub fn flows_json(flows: &[Flow]) -> serde_json::Value {
    flows
        .iter()
        .map(|(cps, service)| serde_json::json!({"cps": cps, "service": service}))
        .collect()
}

fn host_of<'a>(hosts: &'a TestHosts, c: &'a NetNs, name: &str) -> &'a NetNs {
    match name {
        "a" => &hosts.src,
        "b" => &hosts.dst,
        "c" => c,
        other => panic!("no host {other} in the cell"),
    }
}

impl Drop for Cell {
    /// Restored controllers, and those the daemons started, are nobody's
    /// children here: killed by name.
    fn drop(&mut self) {
        for pid in pids_named(CONTROLLER_COMM) {
            if CELL.iter().any(|&name| {
                in_netns(pid, self.host(name)) || in_netns_at(pid, &self.hosts.standby_netns(name))
            }) {
                kill_pid(pid.into());
            }
        }
        let _ = std::fs::remove_dir_all(&self.services_dir);
        for dir in &self.images_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
