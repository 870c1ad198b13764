//! `cargo xtask bench replay [INPUTS]`: how fast logged inputs are replayed
//! into an instance through its gate, in batches (`Injector::BATCH` inputs
//! per BPF_PROG_RUN, the daemons' way) against one input per call (the
//! baseline, what the daemons did before), in one run on the test hosts.
//!
//! Each round loads a fresh dataplane on `dst`, gives a flow a sequenced
//! gate and a socket on the service address (a receive buffer large enough
//! for the whole round, read by a thread), and injects INPUTS inputs
//! (default 20,000) in order, as fast as the injector takes them. It checks
//! that every input was delivered once (the gate at INPUTS + 1, the socket
//! got INPUTS) and reports inputs/s and the machine's busy CPU per input
//! (wall time times CPUs less idle time: the kernel's deferred page-pool
//! frees run in kworkers, not in the injecting thread), the median over
//! rounds that alternate the ways. A third way replays in batches the
//! inputs of four flows (four field devices of one service, numbered as
//! one), interleaved as a controller of four devices takes them: its rate
//! against one flow's shows what several flows cost the replay.
use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use dataplane_common::{GATE_SEQUENCED, Gate, RECORD_MIRRORED, RecordHeader};
use dataplane_tests::{CPS_V4, MachineCpu, SERVICE_V4, TestHosts, sock};
use dataplane_user::kernel::{flow, injector::Injector, logs::Record};
use etherparse::PacketBuilder;

const INPUTS: u64 = 20_000;
const ROUNDS: usize = 3;

struct Round {
    per_second: f64,
    cpu_ns_per_input: u64,
}

fn main() -> anyhow::Result<()> {
    let inputs = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => INPUTS,
    };
    let mut rounds: [Vec<Round>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    // (inputs per call, flows)
    let ways = [(1, 1), (Injector::BATCH, 1), (Injector::BATCH, 4)];
    for round in 0..ROUNDS {
        for (way, &(batch, flows)) in ways.iter().enumerate() {
            rounds[way].push(replay(&format!("rp{round}{way}"), inputs, batch, flows)?);
        }
    }
    println!(
        "{inputs} inputs replayed in order through a sequenced gate, median of {ROUNDS} rounds"
    );
    println!("way                              inputs/s   CPU ns/input");
    let medians = rounds.map(|mut r| {
        r.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
        let per_second = r[r.len() / 2].per_second;
        r.sort_by_key(|r| r.cpu_ns_per_input);
        (per_second, r[r.len() / 2].cpu_ns_per_input)
    });
    for (&(batch, flows), (per_second, cpu)) in ways.iter().zip(medians) {
        let way = match (batch, flows) {
            (1, _) => "one input per call (baseline)".to_string(),
            (n, 1) => format!("batches of {n}"),
            (n, f) => format!("batches of {n}, {f} flows"),
        };
        println!("{way:<30} {per_second:>10.0} {cpu:>14}");
    }
    println!(
        "batches against one per call: {:.1}x the rate, {:.2}x the CPU per input",
        medians[1].0 / medians[0].0,
        medians[1].1 as f64 / medians[0].1.max(1) as f64
    );
    println!(
        "4 interleaved flows against 1, in batches: {:.2}x the rate, {:.2}x the CPU per input",
        medians[2].0 / medians[1].0,
        medians[2].1 as f64 / medians[1].1.max(1) as f64
    );
    Ok(())
}

/// One round: `inputs` inputs replayed `batch` at a time on fresh hosts,
/// the inputs of `flows` flows (CPS ports 4000 up, one service) in turn.
fn replay(tag: &str, inputs: u64, batch: usize, flows: u16) -> anyhow::Result<Round> {
    let hosts = TestHosts::new(tag);
    let mut dst = hosts.load_dst();
    let service = sock(SERVICE_V4, 5000);
    let keys: Vec<_> = (0..flows)
        .map(|i| flow::udp(sock(CPS_V4, 4000 + i), service))
        .collect();
    // One service's flows are numbered as one.
    let flow_id = 0;
    dst.dataplane.adopt_flows(&keys, flow_id)?;
    let gate = Gate {
        mode: GATE_SEQUENCED,
        next_expected: 1,
        ..Default::default()
    };
    dst.dataplane.set_gate(flow_id, gate)?;
    let socket = hosts.dst.run(|| UdpSocket::bind(service))?;
    // A replayed datagram holds a page of buffer: room for all of them.
    let bytes = (inputs as usize * 4096 * 2).min(i32::MAX as usize);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &bytes)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let reader = std::thread::spawn(move || {
        let (mut got, mut buf) = (0u64, [0u8; 64]);
        while socket.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let records: Vec<Record> = (1..=inputs)
        .map(|seq| input(flow_id, seq, 4000 + (seq % u64::from(flows)) as u16))
        .collect();
    let mut injector = hosts
        .dst
        .run(|| Injector::open(dst.dataplane.pin_root(), "peer0"))?;
    let machine = MachineCpu::now();
    let start = Instant::now();
    for chunk in records.chunks(batch) {
        hosts.dst.run(|| injector.inject(chunk))?;
    }
    let elapsed = start.elapsed();
    let got = reader.join().expect("the reader");
    // The busy time includes the reader's and the kworkers' deferred frees,
    // up to the reader's timeout (idle, so not counted).
    let busy = machine.busy_since();
    let next = dst.dataplane.gate(flow_id)?.next_expected;
    anyhow::ensure!(
        next == inputs + 1 && got == inputs,
        "batches of {batch}: the gate is at {next}, the socket got {got} of {inputs}"
    );
    Ok(Round {
        per_second: inputs as f64 / elapsed.as_secs_f64(),
        cpu_ns_per_input: busy.as_nanos() as u64 / inputs,
    })
}

/// Input `seq` of `flow_id`, from CPS port `port`, as the input log holds it.
fn input(flow_id: u32, seq: u64, port: u16) -> Record {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CPS_V4.octets(), SERVICE_V4.octets(), 64)
        .udp(port, 5000)
        .write(&mut frame, format!("input {seq}").as_bytes())
        .expect("a UDP frame");
    Record {
        header: RecordHeader {
            seq,
            flow_id,
            kind: RECORD_MIRRORED,
            frame_len: frame.len() as u32,
            captured_len: frame.len() as u32,
            ..Default::default()
        },
        frame: frame.into(),
    }
}
