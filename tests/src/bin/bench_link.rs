//! `cargo xtask bench link [ROUNDS] [SIZE_MIB...]` (default 5, 16 64): what
//! sealing the peer link costs, against the same link in clear
//! (`peer_insecure`), in one run, alternating so that both see the same
//! machine:
//!
//! - checkpoint images streamed from src to dst over the link (the
//!   daemon's transfer, SHA-256 included): MB/s, ROUNDS times each way of
//!   keeping the link;
//! - standby migrations of a SIZE MiB controller while the CPS sends every
//!   1 ms: T_M and its transfer phase (p50 over ROUNDS each), each one exact
//!   (no missed, duplicate or wrong output) or the run fails.
//!
//! Prints the ratios sealed / clear.
use std::time::{Duration, Instant};

use dataplane_tests::{MigrationSetup, Sample, cps_verdict, kill_pid, report_phase};
use dataplane_user::peer::{self, Link, MAX_FRAME, Peer, Trust, frame, transfer};

const PERIOD_US: u64 = 1000;
/// The migration starts this far into the CPS's run.
const LEAD: Duration = Duration::from_millis(400);
/// dst's peer link, and the port the streaming test listens on there.
const DST: &str = "198.51.100.2";
const STREAM_PORT: u16 = 7081;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let rounds = args.next().transpose()?.unwrap_or(5);
    let sizes: Vec<usize> = args.collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![16, 64]
    } else {
        sizes
    };
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);

    println!("images streamed src -> dst over the peer link, {rounds} rounds each (p50)");
    println!(
        "{:>5} {:>8} {:>12} {:>12} {:>7}",
        "MiB", "bytes", "sealed MB/s", "clear MB/s", "ratio"
    );
    for &size in &sizes {
        let (bytes, sealed, clear) = stream_rates(size, rounds)?;
        println!(
            "{size:>5} {:>8} {:>12.0} {:>12.0} {:>6.2}x",
            bytes,
            sealed,
            clear,
            sealed / clear
        );
    }

    println!("\nstandby migrations while the CPS sends every 1 ms, {rounds} each (p50, ms)");
    println!(
        "{:>5} {:>10} {:>10} {:>7} {:>15} {:>15} {:>7}",
        "MiB", "T_M sealed", "T_M clear", "ratio", "transfer sealed", "transfer clear", "ratio"
    );
    for &size in &sizes {
        let mut runs = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (i, sealed) in [true, false].into_iter().enumerate() {
                runs[i].push(migrate(size, sealed, round)?);
            }
        }
        let p50 = |runs: &[(f64, f64)], which: fn(&(f64, f64)) -> f64| {
            Sample::new(runs.iter().map(which))
                .percentile(0.5)
                .unwrap_or(f64::NAN)
        };
        let (tm, transfer) = (|r: &(f64, f64)| r.0, |r: &(f64, f64)| r.1);
        let (tm_s, tm_c) = (p50(&runs[0], tm), p50(&runs[1], tm));
        let (tr_s, tr_c) = (p50(&runs[0], transfer), p50(&runs[1], transfer));
        println!(
            "{size:>5} {tm_s:>10.1} {tm_c:>10.1} {:>6.2}x {tr_s:>15.1} {tr_c:>15.1} {:>6.2}x",
            tm_s / tm_c,
            tr_s / tr_c
        );
    }
    Ok(())
}

fn controller_args(size: usize) -> [String; 4] {
    [
        "--state-mib".into(),
        size.to_string(),
        "--dirty-pages".into(),
        "4".into(),
    ]
}

/// One standby migration of a SIZE MiB controller, the link sealed or in
/// clear: (T_M, its transfer phase), in ms. Anything but an exact
/// migration fails the run.
fn migrate(size: usize, sealed: bool, round: usize) -> anyhow::Result<(f64, f64)> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let clear = if sealed { "" } else { "peer_insecure = true\n" };
    let tag = format!("lk{size}{}{round}", if sealed { "s" } else { "c" });
    let setup = MigrationSetup::with_configs(&tag, &args, true, clear, clear);
    let cps = setup.start_cps(3000 + 20 * size as u64, PERIOD_US, None);
    std::thread::sleep(LEAD);
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(report["state"] == "done", "{size} MiB: {}", report["error"]);
    for field in ["missed", "duplicates", "wrong"] {
        anyhow::ensure!(
            verdict[field].as_u64() == Some(0),
            "{size} MiB, sealed {sealed}: {field} in {verdict}"
        );
    }
    let transfer_us = report_phase(&report, "transfer").1;
    let total_us = report["total_us"].as_u64().unwrap_or(0);
    Ok((total_us as f64 / 1e3, transfer_us as f64 / 1e3))
}

/// Dumps a SIZE MiB controller on src once, then streams its images to dst
/// over a sealed link and over one in clear, alternately, `rounds` times
/// each: (bytes, sealed MB/s p50, clear MB/s p50).
fn stream_rates(size: usize, rounds: usize) -> anyhow::Result<(u64, f64, f64)> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("ls{size}"), &args, false);
    let hosts = &setup.hosts;
    let scratch = std::env::temp_dir().join(format!("dataplane-ls-{}", std::process::id()));
    let (dumped, received) = (scratch.join("src"), scratch.join("dst"));
    std::fs::create_dir_all(&received)?;
    let criu = dataplane_user::criu::Criu::default();
    let request = setup.controller.dump_request(dumped.clone(), true);
    hosts
        .src
        .run(|| criu.dump(&request, false, &mut |_| true))?;
    let runtime = tokio::runtime::Runtime::new()?;
    let address: std::net::SocketAddr = format!("{DST}:{STREAM_PORT}").parse()?;
    let (src_id, dst_id) = (hosts.identity("src").1, hosts.identity("dst").1);
    let listed = |name: &str, key: &peer::Identity| Peer {
        name: name.into(),
        address,
        key: Some(key.public()),
    };
    let mut rates = [Vec::new(), Vec::new()];
    let mut bytes = 0;
    for round in 0..rounds {
        for (i, sealed) in [true, false].into_iter().enumerate() {
            let (admitting, dialing) = if sealed {
                (
                    Trust::sealed(dst_id.clone(), vec![listed("src", &src_id)]),
                    Trust::sealed(src_id.clone(), vec![listed("dst", &dst_id)]),
                )
            } else {
                (
                    Trust::insecure(vec![]),
                    Trust::insecure(vec![listed("dst", &dst_id)]),
                )
            };
            let std_listener = hosts.dst.run(|| std::net::TcpListener::bind(address))?;
            std_listener.set_nonblocking(true)?;
            let into = received.join(format!("{round}-{sealed}"));
            std::fs::create_dir_all(&into)?;
            let elapsed = hosts.src.run(|| {
                runtime.block_on(async {
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    let serving = tokio::spawn(peer::serve(
                        listener,
                        std::sync::Arc::new(admitting),
                        move |link: Link, _| receive(link, into.clone()),
                    ));
                    let start = Instant::now();
                    let (mut link, _) = peer::connect(&dialing, address).await?;
                    let sent = transfer::send(&mut link, "stream", &dumped).await?;
                    let elapsed = start.elapsed();
                    // The listener goes with its task: gone before the next round binds.
                    serving.abort();
                    let _ = serving.await;
                    anyhow::Ok((elapsed, sent.received.bytes))
                })
            })?;
            bytes = elapsed.1;
            rates[i].push(bytes as f64 / elapsed.0.as_secs_f64() / 1e6);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let p50 = |v: &[f64]| {
        Sample::new(v.iter().copied())
            .percentile(0.5)
            .unwrap_or(f64::NAN)
    };
    Ok((bytes, p50(&rates[0]), p50(&rates[1])))
}

/// The receiving end of one stream: the images, then the receipt.
async fn receive(mut link: Link, into: std::path::PathBuf) -> Result<(), peer::PeerError> {
    let (kind, begin) = link.recv(MAX_FRAME).await?;
    if kind != frame::IMAGES {
        return Err(peer::PeerError::Garbage(format!("frame type {kind}")));
    }
    let migration = transfer::parse_begin(&begin)?;
    let got = transfer::receive(&mut link, &migration, &into, transfer::Quota::UNLIMITED).await?;
    let receipt = serde_json::to_vec(&got).expect("serializes");
    link.send(frame::IMAGES_OK, &receipt).await
}
