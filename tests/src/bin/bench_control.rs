//! `cargo xtask bench control`: requests per second and latency of `status`
//! over the daemon's real control socket, beside a baseline in the same run:
//! a minimal line-echo server on a Unix socket in this process, which is the
//! floor any request over such a socket pays.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use dataplane_tests::{DaemonProcess, Sample, TestHosts, bar};

const REQUESTS: usize = 20_000;
const REQUEST: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}\n";

/// Latencies of REQUESTS round trips of one line over `socket`, one at a
/// time, in µs; and how long they all took.
fn measure(socket: &Path) -> (Sample, Duration) {
    let mut stream = UnixStream::connect(socket).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let mut latencies = Vec::with_capacity(REQUESTS);
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        stream.write_all(REQUEST).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = start.elapsed();
    assert!(
        line.contains("\"result\""),
        "the last reply is a result: {line}"
    );
    (Sample::new(latencies), total)
}

/// A server that answers each line with a fixed small JSON-RPC result.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind the baseline socket");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.unwrap();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    writer
                        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n")
                        .unwrap();
                    line.clear();
                }
            });
        }
    });
}

/// Prints a row; its p50 and p99 (20,000 requests are plenty for both).
fn row(name: &str, (latencies, total): &(Sample, Duration)) -> (f64, f64) {
    let p = |q: f64| latencies.percentile(q).expect("enough requests");
    let rate = REQUESTS as f64 / total.as_secs_f64();
    println!(
        "{name:<34} {rate:>10.0} {:>9.1} {:>9.1} {:>9.1}",
        p(0.5),
        p(0.99),
        latencies.max().expect("requests")
    );
    (p(0.5), p(0.99))
}

fn main() {
    let hosts = TestHosts::new("bctl");
    let config = format!(
        "interface = \"eth0\"\npin_root = \"{}\"\ninput_ring_mib = 8\noutput_ring_mib = 1\n\
         socket_rate = 0\n",
        hosts.pin_root("src").display()
    );
    let daemon = DaemonProcess::start(&hosts.src, "bctl", &config);
    let mut client = daemon.client();
    for i in 0..4u16 {
        let flow = serde_json::json!({"cps": format!("192.0.2.1:{}", 4000 + i), "service": "192.0.2.10:5000"});
        client.call("flow.add", flow).unwrap();
    }
    let baseline_path =
        std::env::temp_dir().join(format!("dataplane-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&baseline_path);
    echo_server(&baseline_path);

    // Warm both up, then measure one after the other.
    measure(&baseline_path);
    let baseline = measure(&baseline_path);
    measure(&daemon.socket);
    let status = measure(&daemon.socket);
    let _ = std::fs::remove_file(&baseline_path);

    println!("{REQUESTS} requests each, one at a time on one connection (4 flows known)");
    println!();
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9}",
        "", "req/s", "p50 us", "p99 us", "max us"
    );
    let (b50, b99) = row("baseline: line echo, same socket", &baseline);
    let (s50, s99) = row("daemon: status", &status);
    println!();
    println!(
        "status vs baseline: p50 {:.1}x, p99 {:.1}x",
        s50 / b50,
        s99 / b99
    );
    println!(
        "{}",
        bar(
            "p99 of status under 1000 us",
            &format!("p99 {s99:.1} us (n {})", status.0.n()),
            s99 < 1000.0
        )
    );
}
