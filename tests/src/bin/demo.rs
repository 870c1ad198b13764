//! `cargo xtask demo`: builds the test hosts, loads the dataplane on `src`
//! and `dst`, and has the CPS send one input every millisecond for a second
//! while `src` numbers, logs and mirrors them and `dst` logs and delivers
//! them to a replica. The live migration itself comes with later issues.
use std::{
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use dataplane_common::{FLOW_MIRROR, counter};
use dataplane_tests::{CPS_V4, SERVICE_V4, TestHosts, count_datagrams, sock};
use dataplane_user::{LogReader, Record, flow, loader::MAP_INPUTS};

const INPUTS: u64 = 1000;
const PERIOD: Duration = Duration::from_millis(1);

fn main() -> anyhow::Result<()> {
    println!("building test hosts cps, src, dst (network namespaces, veth, a bridge)");
    let hosts = TestHosts::new("demo");
    let mut src = hosts.load_src();
    let mut dst = hosts.load_dst();
    let (cps, service) = (sock(CPS_V4, 4000), sock(SERVICE_V4, 5000));
    let key = flow::udp(cps, service);
    src.dataplane.add_flow(key, FLOW_MIRROR)?;
    dst.dataplane.add_flow(key, 0)?;
    println!("dataplane loaded on src (capture + mirror) and dst (receive + gate: deliver)");
    println!("flow: {}", flow::display(&key));

    let primary = hosts.src.run(|| UdpSocket::bind(service))?;
    let replica = hosts.dst.run(|| UdpSocket::bind(service))?;
    let sender = hosts.cps.run(|| UdpSocket::bind(cps))?;
    let receivers =
        [primary, replica].map(|socket| count_datagrams(socket, Duration::from_millis(500)));

    println!("CPS sends {INPUTS} inputs, one every {PERIOD:?}");
    let start = Instant::now();
    for i in 0..INPUTS {
        sender.send_to(format!("input {i}").as_bytes(), service)?;
        let next = start + PERIOD * (i as u32 + 1);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let src_log = runtime.block_on(drain(src.dataplane.open_log(MAP_INPUTS)?))?;
    let dst_log = runtime.block_on(drain(dst.dataplane.open_log(MAP_INPUTS)?))?;
    let [got_primary, got_replica] = receivers.map(|r| r.join().unwrap());

    println!();
    println!("{:<34} {:>10} {:>10}", "", "src", "dst");
    println!(
        "{:<34} {:>10} {:>10}",
        "inputs delivered to the service", got_primary, got_replica
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "records in the input log",
        src_log.len(),
        dst_log.len()
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "sequence numbers",
        range(&src_log),
        range(&dst_log)
    );
    let (sc, dc) = (src.dataplane.counters()?, dst.dataplane.counters()?);
    for (name, index) in [
        ("captured", counter::CAPTURED),
        ("mirrored", counter::MIRRORED),
        ("mirror frames received", counter::MIRROR_RECEIVED),
        ("delivered by the gate", counter::DELIVERED),
        ("ring full", counter::RING_FULL),
    ] {
        println!("{name:<34} {:>10} {:>10}", sc.get(index), dc.get(index));
    }
    let matched = src_log
        .iter()
        .zip(&dst_log)
        .filter(|(s, d)| s.header.seq == d.header.seq && s.frame == d.frame)
        .count() as u64;
    println!();
    println!("dst logged {matched} of src's {INPUTS} inputs with the same number and bytes");
    anyhow::ensure!(matched == INPUTS, "the mirror lost or changed inputs");
    Ok(())
}

async fn drain(ring: aya::maps::RingBuf<aya::maps::MapData>) -> anyhow::Result<Vec<Record>> {
    let mut reader = LogReader::spawn(ring, 4096)?;
    let mut records = Vec::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), reader.next()).await {
        records.push(r);
    }
    records.sort_by_key(|r| r.header.seq);
    Ok(records)
}

fn range(log: &[Record]) -> String {
    match (log.first(), log.last()) {
        (Some(a), Some(b)) => format!("{}..={}", a.header.seq, b.header.seq),
        _ => "none".into(),
    }
}
