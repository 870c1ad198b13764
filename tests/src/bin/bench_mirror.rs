//! `cargo xtask bench mirror`: what a mirror copy costs, made by a TC
//! bpf_clone_redirect (`clone`) or by an XDP devmap broadcast (`devmap`),
//! against capture without mirroring (`none`), in one run on the test hosts.
//!
//! Each round blasts the same inputs from the CPS at `src` and measures the
//! CPU time the whole machine spends (from /proc/stat: the sender, both
//! hosts' kernel paths and the services' sockets) until `src` has logged
//! every input and, when mirroring, `dst` has received every copy. The
//! sender's share is the same in every mode, so differences are the mirror's.
use std::{
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use dataplane_common::counter;
use dataplane_tests::{CPS_V4, Loaded, SERVICE_V4, TestHosts, count_datagrams, sock};
use dataplane_user::kernel::{
    flow,
    loader::{LoadOptions, MirrorMode},
};

const INPUTS: u64 = 200_000;
/// Inputs are sent in batches of BATCH every BATCH_PERIOD (100,000 inputs/s),
/// well inside what a veth queue holds between two polls.
const BATCH: u64 = 50;
const BATCH_PERIOD: Duration = Duration::from_micros(500);
const ROUNDS: usize = 5;
const RING_BYTES: u32 = 64 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    None,
    Clone,
    Devmap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none (capture only)",
            Mode::Clone => "clone (TC clone_redirect)",
            Mode::Devmap => "devmap (XDP broadcast)",
        }
    }
}

struct Round {
    /// The machine's busy CPU time per input that reached `src`'s XDP hook.
    cpu_ns_per_input: u64,
    /// Inputs sent that the veth dropped before the hook (its queue overflowed).
    lost_before_xdp: u64,
}

/// One round in `mode`.
fn run(hosts: &TestHosts, mode: Mode, devmap: &MirrorMode) -> anyhow::Result<Round> {
    let mirror_mode = if mode == Mode::Devmap {
        devmap.clone()
    } else {
        MirrorMode::Clone
    };
    let src_options = LoadOptions {
        mirror_mode,
        input_ring_bytes: RING_BYTES,
        ..hosts.src_options()
    };
    let dst_options = LoadOptions {
        input_ring_bytes: RING_BYTES,
        ..hosts.dst_options()
    };
    let mut src = Loaded::new(&hosts.src, &src_options);
    let mut dst = Loaded::new(&hosts.dst, &dst_options);
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    if mode == Mode::None {
        src.dataplane.add_flow(key, 0)?;
    } else {
        src.add_mirrored_flow(key, &hosts.dst);
    }
    dst.dataplane.add_flow(key, 0)?;
    let services = [&hosts.src, &hosts.dst].map(|host| {
        let socket = host.run(|| UdpSocket::bind(service)).expect("bind service");
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))
            .expect("SO_RCVBUFFORCE");
        count_datagrams(socket, Duration::from_millis(300))
    });
    let sender = hosts.cps.run(|| UdpSocket::bind(cps))?;
    let payload = [0x5Au8; 32];

    let machine = dataplane_tests::MachineCpu::now();
    let mut due = Instant::now();
    for _ in 0..INPUTS / BATCH {
        for _ in 0..BATCH {
            sender.send_to(&payload, service)?;
        }
        // A fixed offered rate, so idle time is not counted and CPU per input
        // compares; a late batch is not made up with a burst.
        due = (due + BATCH_PERIOD).max(Instant::now());
        thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    // Done when the counters stop moving.
    let mut last = (u64::MAX, u64::MAX);
    loop {
        thread::sleep(Duration::from_millis(100));
        let now = (
            src.dataplane.counters()?.get(counter::CAPTURED),
            dst.dataplane.counters()?.get(counter::MIRROR_RECEIVED),
        );
        if now == last {
            break;
        }
        last = now;
    }
    let busy = machine.busy_since();
    let [primary, replica] = services.map(|s| s.join().unwrap());
    let (sc, dc) = (src.dataplane.counters()?, dst.dataplane.counters()?);
    let captured = sc.get(counter::CAPTURED);
    let name = mode.name();
    anyhow::ensure!(
        sc.get(counter::RING_FULL) == 0 && dc.get(counter::RING_FULL) == 0,
        "{name}: the logs overflowed"
    );
    anyhow::ensure!(sc.get(counter::MIRROR_ERRORS) == 0, "{name}: mirror errors");
    anyhow::ensure!(
        primary == captured,
        "{name}: the primary got {primary} of {captured}"
    );
    let expected_replica = if mode == Mode::None { 0 } else { captured };
    anyhow::ensure!(
        replica == expected_replica,
        "{name}: the replica got {replica} of {expected_replica}"
    );
    Ok(Round {
        cpu_ns_per_input: busy.as_nanos() as u64 / captured,
        lost_before_xdp: INPUTS - captured,
    })
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let hosts = TestHosts::new("bench");
    let devmap = hosts.add_delivery_veth();
    let modes = [Mode::None, Mode::Clone, Mode::Devmap];
    let mut cpu: Vec<Vec<u64>> = vec![Vec::new(); modes.len()];
    let mut lost = vec![0u64; modes.len()];
    println!("{INPUTS} inputs per round at 100,000/s, {ROUNDS} rounds, modes interleaved");
    for round in 1..=ROUNDS {
        for (i, &mode) in modes.iter().enumerate() {
            let round = run(&hosts, mode, &devmap)?;
            cpu[i].push(round.cpu_ns_per_input);
            lost[i] += round.lost_before_xdp;
        }
        eprintln!("round {round} done");
    }
    let base = median(cpu[0].clone()) as f64;
    println!();
    println!(
        "{:<28} {:>14} {:>10} {:>16} {:>12}",
        "mode", "CPU ns/input", "vs none", "mirror ns/input", "lost on veth"
    );
    for (i, &mode) in modes.iter().enumerate() {
        let ns = median(cpu[i].clone());
        println!(
            "{:<28} {:>14} {:>9.2}x {:>16} {:>12}",
            mode.name(),
            ns,
            ns as f64 / base,
            ns as i64 - base as i64,
            lost[i],
        );
    }
    println!();
    println!(
        "CPU is the whole machine's (sender, both hosts' kernels, the services), from /proc/stat;"
    );
    println!(
        "\"mirror ns/input\" is the difference to capture without mirroring, and includes dst's receive path."
    );
    println!(
        "\"lost on veth\": inputs the CPS-side veth queue dropped before src's XDP hook, over all rounds."
    );
    Ok(())
}
