//! `cargo xtask bench checkpoint [SIZE_MIB...]` (default 1 16 64 256): a
//! controller with SIZE MiB of resident state (4 pages rewritten per input)
//! migrated in standby mode while the CPS sends every 1 ms, against a
//! stop-and-copy migration (CRIU dump, copy, CRIU restore, announce) of the
//! same service in the same run.
//!
//! For each it prints the frozen time (CRIU's), the checkpoint or dump, the
//! transfer or copy, the restore, the total, the time from the dump's start
//! to the instance restored and caught up on the destination, and what the
//! CPS saw: the largest output gap beyond T_U and the missed cycles, over
//! the whole run and, for ours, while the standby was checkpointed (the
//! serving instance's period must not stretch then). Its two bars are
//! judged on its own standby migrations (a failed one ends the run).
use std::time::Duration;

use dataplane_tests::{
    MigrationSetup, Sample, bar, cps_verdict, kill_pid, output_gaps, report_phase,
};

const PERIOD_US: u64 = 1000;
/// `dst`'s address on the peer link.
const PEER_DST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 2);
/// The migration starts this far into the CPS's run.
const LEAD: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1, 16, 64, 256]
    } else {
        sizes
    };
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    println!(
        "{:>5} {:<14} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>10}",
        "MiB",
        "migration",
        "frozen",
        "checkpoint",
        "transfer",
        "restore",
        "total",
        "ready",
        "CPS gap",
        "missed",
        "gap at",
        "gap in"
    );
    println!(
        "{:>5} {:<14} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>10}",
        "", "", "ms", "/dump ms", "/copy ms", "ms", "ms", "ms", "max ms", "", "cycle", "ckpt ms"
    );
    let mut standbys = Vec::new();
    for &size in &sizes {
        let ours = standby(size)?;
        let baseline = stop_and_copy(size)?;
        for (name, row) in [("ours, standby", &ours), ("stop-and-copy", &baseline)] {
            println!(
                "{size:>5} {name:<14} {:>9.1} {:>11.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.2} {:>7} {:>9} {:>10}",
                row.frozen_ms,
                row.checkpoint_ms,
                row.transfer_ms,
                row.restore_ms,
                row.total_ms,
                row.ready_ms,
                row.gap_ms,
                row.missed,
                row.gap_at,
                row.checkpoint_gap_ms
                    .map_or("-".into(), |g| format!("{g:.2}"))
            );
        }
        println!(
            "{size:>5} ratio ours/stop-and-copy: total {:.2}x, largest CPS gap {:.3}x",
            ours.total_ms / baseline.total_ms,
            ours.gap_ms / baseline.gap_ms.max(0.001)
        );
        standbys.push((size, ours));
    }
    for line in bars(&standbys) {
        println!("{line}");
    }
    println!(
        "\nimages onto dst, from the dump's start to every file there: dumped to src's disk \
         then streamed over the peer link with SHA-256 (what the daemon does), against CRIU's \
         page server on dst taking the pages as the dump reads them (the other images streamed)"
    );
    println!(
        "{:>5} {:>10} {:>12} {:>7} {:>16}",
        "MiB", "stream ms", "page srv ms", "ratio", "page srv start ms"
    );
    for &size in &sizes {
        let (stream, page_server, start) = images_onto_dst(size)?;
        println!(
            "{size:>5} {:>10.1} {:>12.1} {:>6.2}x {:>16.1}",
            ms(stream),
            ms(page_server),
            page_server.as_secs_f64() / stream.as_secs_f64(),
            ms(start)
        );
    }
    println!(
        "\n\"ready\": from the dump's start to the instance restored and caught up on dst \
         (ours: checkpoint start to restore-and-replay end). \"CPS gap\": the largest time \
         between two outputs at the CPS, minus T_U, over the whole run; \"gap in ckpt\": the \
         same over the cycles of the checkpoint phase (from S - 5 to S + its duration + 5)."
    );
    Ok(())
}

/// The bars on the standby migrations (MiB, row), each judged on the
/// largest figure: the claims are about every migration.
fn bars(standbys: &[(usize, Row)]) -> [String; 2] {
    // None of a kind: no largest, not met.
    let largest = |values: Vec<f64>, unit: &str| {
        let sample = Sample::new(values);
        let shown = sample
            .max()
            .map_or("-".into(), |max| format!("{max:.2} {unit}"));
        let text = format!("max {shown} (n {})", sample.n());
        (sample.max().unwrap_or(f64::INFINITY), text)
    };
    let (stretch, stretch_text) = largest(
        standbys
            .iter()
            .filter_map(|(_, r)| r.checkpoint_gap_ms)
            .collect(),
        "ms",
    );
    let (ready, ready_text) = largest(
        standbys
            .iter()
            .filter(|(size, _)| *size == 16)
            .map(|(_, r)| r.ready_ms)
            .collect(),
        "ms, 16 MiB",
    );
    [
        bar(
            "the serving instance's period stretched by under 1 ms during a standby checkpoint",
            &stretch_text,
            stretch < 1.0,
        ),
        bar(
            "a 16 MiB service restored and caught up on dst within 300 ms of the dump's start",
            &ready_text,
            ready < 300.0,
        ),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Dumps a SIZE MiB controller on `src` twice, left running, and times
/// its images' way onto `dst` (dump start to every file there): (streamed
/// after the dump, through CRIU's page server, the page server's start-up).
fn images_onto_dst(size: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    use dataplane_user::peer::{Link, MAX_FRAME, frame, transfer};
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("ps{size}"), &args, false);
    let hosts = &setup.hosts;
    let scratch = std::env::temp_dir().join(format!("dataplane-ps-{}", std::process::id()));
    let (dumped, received) = (scratch.join("src"), scratch.join("dst"));
    std::fs::create_dir_all(&received)?;
    let criu = dataplane_user::criu::Criu::default();
    let runtime = tokio::runtime::Runtime::new()?;
    // Streams the files of `dir` from src to a receiver on dst, as the
    // daemons' peer link does.
    let stream = |dir: &std::path::Path, name: &str| -> anyhow::Result<()> {
        let listener = hosts
            .dst
            .run(|| std::net::TcpListener::bind((PEER_DST, 7071)))?;
        let sender = hosts
            .src
            .run(|| std::net::TcpStream::connect((PEER_DST, 7071)))?;
        let (receiver, _) = listener.accept()?;
        for s in [&sender, &receiver] {
            s.set_nonblocking(true)?;
        }
        runtime.block_on(async {
            let mut receiver = Link::plain(tokio::net::TcpStream::from_std(receiver)?);
            let mut sender = Link::plain(tokio::net::TcpStream::from_std(sender)?);
            let receive = async {
                let (_, begin) = receiver.recv(MAX_FRAME).await?;
                let migration = transfer::parse_begin(&begin)?;
                let quota = transfer::Quota::UNLIMITED;
                let got = transfer::receive(&mut receiver, &migration, &received, quota).await?;
                let receipt = serde_json::to_vec(&got)?;
                receiver.send(frame::IMAGES_OK, &receipt).await?;
                anyhow::Ok(())
            };
            let (sent, got) = tokio::join!(transfer::send(&mut sender, name, dir), receive);
            got?;
            sent?;
            anyhow::Ok(())
        })
    };

    let start = std::time::Instant::now();
    hosts.src.run(|| {
        criu.dump(
            &setup.controller.dump_request(dumped.join("stream"), true),
            false,
            &mut |_| true,
        )
    })?;
    stream(&dumped.join("stream"), "stream")?;
    let streamed = start.elapsed();

    let pages = received.join("pages");
    std::fs::create_dir_all(&pages)?;
    let launched = std::time::Instant::now();
    let mut page_server = std::process::Command::new("nsenter")
        .arg(format!("--net={}", hosts.dst.path().display()))
        .arg(dataplane_user::criu::DEFAULT_CRIU)
        .args(["page-server", "--port", "7072", "--address"])
        .arg(PEER_DST.to_string())
        .arg("--images-dir")
        .arg(&pages)
        .spawn()?;
    // Not probed with a connection: the page server serves only one.
    let listening = || {
        !hosts
            .dst
            .exec("ss", &["-Hltn", "sport = :7072"])
            .trim()
            .is_empty()
    };
    while !listening() {
        anyhow::ensure!(
            launched.elapsed() < Duration::from_secs(5),
            "no page server"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = launched.elapsed();
    let start = std::time::Instant::now();
    let mut request = setup.controller.dump_request(dumped.join("paged"), true);
    request.page_server = Some((PEER_DST, 7072).into());
    hosts
        .src
        .run(|| criu.dump(&request, false, &mut |_| true))?;
    stream(&dumped.join("paged"), "paged")?;
    anyhow::ensure!(page_server.wait()?.success(), "the page server failed");
    let paged = start.elapsed();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok((streamed, paged, started))
}

#[derive(Default)]
struct Row {
    frozen_ms: f64,
    checkpoint_ms: f64,
    transfer_ms: f64,
    restore_ms: f64,
    total_ms: f64,
    ready_ms: f64,
    gap_ms: f64,
    missed: u64,
    /// Where the largest gap was: the cycle, relative to K for ours.
    gap_at: String,
    /// The largest gap while the standby was checkpointed (ours only).
    checkpoint_gap_ms: Option<f64>,
}

fn controller_args(size: usize) -> [String; 4] {
    [
        "--state-mib".into(),
        size.to_string(),
        "--dirty-pages".into(),
        "4".into(),
    ]
}

/// Enough cycles to outlast the migration: about 20 ms per MiB, and 3 s.
fn cycles(size: usize) -> u64 {
    3000 + 20 * size as u64
}

fn standby(size: usize) -> anyhow::Result<Row> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("ck{size}"), &args, true);
    let trace = std::env::temp_dir().join(format!("dataplane-ck-{}.trace", std::process::id()));
    let cps = setup.start_cps(cycles(size), PERIOD_US, Some(&trace));
    std::thread::sleep(LEAD);
    let id = setup.migrate(serde_json::json!({"mode": "standby"}));
    let report = setup.wait(&id);
    let verdict = cps_verdict(cps);
    let gaps = output_gaps(&std::fs::read_to_string(&trace)?, PERIOD_US);
    let _ = std::fs::remove_file(&trace);
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(report["state"] == "done", "{size} MiB: {}", report["error"]);
    let phase = |name: &str| {
        let (start, duration) = report_phase(&report, name);
        (start as f64 / 1e3, duration as f64 / 1e3)
    };
    let (checkpoint_start, checkpoint_ms) = phase("checkpoint");
    let (restore_start, restore_ms) = phase("restore");
    // Cycle q carries input q: the checkpoint phase's inputs start near S.
    let s = report["checkpoint_seq"].as_u64().unwrap_or(0);
    let during = s.saturating_sub(5)..=s + checkpoint_ms.ceil() as u64 + 5;
    let checkpoint_gap_us = gaps
        .iter()
        .filter(|(cycle, _)| during.contains(cycle))
        .map(|&(_, gap)| gap)
        .max()
        .unwrap_or(0);
    Ok(Row {
        frozen_ms: report["frozen_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        checkpoint_ms,
        transfer_ms: phase("transfer").1,
        restore_ms,
        total_ms: report["total_us"].as_u64().unwrap_or(0) as f64 / 1e3,
        ready_ms: restore_start + restore_ms - checkpoint_start,
        gap_ms: verdict["extra_gap_us"]["max"].as_i64().unwrap_or(0) as f64 / 1e3,
        missed: verdict["missed"].as_u64().unwrap_or(0),
        gap_at: format!(
            "K{:+}",
            verdict["extra_gap_us"]["at_cycle"].as_i64().unwrap_or(0)
                - report["handover_seq"].as_i64().unwrap_or(0)
        ),
        checkpoint_gap_ms: Some(checkpoint_gap_us as f64 / 1e3),
    })
}

fn stop_and_copy(size: usize) -> anyhow::Result<Row> {
    let args = controller_args(size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let setup = MigrationSetup::new(&format!("cs{size}"), &args, false);
    let cps = setup.start_cps(cycles(size), PERIOD_US, None);
    std::thread::sleep(LEAD);
    let images =
        std::env::temp_dir().join(format!("dataplane-bench-{}-{size}", std::process::id()));
    let copied = images.with_extension("copy");
    let migrated = setup.stop_and_copy(&images, &copied);
    let verdict = cps_verdict(cps);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_dir_all(&copied);
    let moved = migrated?;
    kill_pid(moved.pid as u64);
    // The restored root is this process's child.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(moved.pid as i32), None);
    let total = moved.dump + moved.copy + moved.restore;
    Ok(Row {
        frozen_ms: ms(moved.frozen),
        checkpoint_ms: ms(moved.dump),
        transfer_ms: ms(moved.copy),
        restore_ms: ms(moved.restore),
        total_ms: ms(total),
        ready_ms: ms(total),
        gap_ms: verdict["extra_gap_us"]["max"].as_i64().unwrap_or(0) as f64 / 1e3,
        missed: verdict["missed"].as_u64().unwrap_or(0),
        gap_at: verdict["extra_gap_us"]["at_cycle"].to_string(),
        checkpoint_gap_ms: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every migration must meet a bar, and a bar without a migration of
    /// its kind (no 16 MiB size run) is not met.
    #[test]
    fn the_bars_hold_for_every_standby_migration() {
        let row = |gap: f64, ready: f64| Row {
            checkpoint_gap_ms: Some(gap),
            ready_ms: ready,
            ..Row::default()
        };
        let met = bars(&[(16, row(0.2, 180.0)), (1, row(0.1, 110.0))]);
        assert!(met.iter().all(|l| l.ends_with(": met")), "{met:?}");
        let over = bars(&[(16, row(0.2, 180.0)), (16, row(1.3, 310.0))]);
        assert!(over.iter().all(|l| l.ends_with("not met")), "{over:?}");
        assert!(bars(&[(1, row(0.1, 110.0))])[1].ends_with("(n 0): not met"));
    }
}
