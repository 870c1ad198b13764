//! `cargo xtask demo`: a live migration of a running control service.
//! `cargo xtask demo cell`: a controller of four field devices moved round
//! a cell of three hosts (see [`cell`]). `cargo xtask demo container`: the
//! controller and its standby as runc containers, each host with a
//! container runtime of its own; migrated in standby mode.
//!
//! Builds the test hosts (cps, src with a standby namespace, dst), starts a
//! daemon on src and on dst, the Markov controller of gundall2022 on src
//! (with its standby) and the CPS simulator on cps, sending one input every
//! millisecond. Then `dataplane migrate --mode standby` moves the controller
//! to dst while the CPS runs. Prints the migration's phase table and the
//! CPS's verdict, and writes a timeline picture (SVG) of the migration.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use dataplane_tests::{
    CPS_V4, Cell, ContainerStart, DST_PEER, MigrationSetup, SERVICE_V4, chain_state, cps_verdict,
    cps_verdicts, dataplane_bin, kill_pid, read_trace, sock,
};

const CYCLES: u64 = 4000;
const PERIOD_US: u64 = 1000;

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "standby".into());
    if mode == "cell" {
        return cell();
    }
    println!(
        "building the test hosts: cps, src (+ a standby namespace), dst; starting both daemons"
    );
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    let (setup, mode) = match mode.as_str() {
        "container" => (
            MigrationSetup::containerised("demo", &[], (true, ContainerStart::ByDaemon), true),
            "standby".to_string(),
        ),
        _ => (MigrationSetup::new("demo", &[], mode == "standby"), mode),
    };
    let containers = setup.runtimes.as_ref();
    println!(
        "Markov controller (gundall2022 Sec. VII-B) on src at {}{}{}",
        setup.service,
        if containers.is_some() {
            ", in runc container markov"
        } else {
            ""
        },
        if setup.standby.is_some() {
            ", its standby beside it"
        } else {
            ""
        }
    );
    let trace = std::env::temp_dir().join(format!("dataplane-demo-{}.trace", std::process::id()));
    println!("CPS sends {CYCLES} inputs, one every {PERIOD_US} µs, and checks every output");
    let cps_started = Instant::now();
    let cps = setup.start_cps(CYCLES, PERIOD_US, Some(&trace));
    std::thread::sleep(Duration::from_millis(1000));
    println!("\n$ dataplane migrate markov --to {DST_PEER} --mode {mode}");
    let migration_started = cps_started.elapsed();
    let status = Command::new(dataplane_bin())
        .arg("--socket")
        .arg(&setup.src.socket)
        .args(["migrate", "markov", "--to", DST_PEER, "--mode", &mode])
        .status();
    let verdict = cps_verdict(cps);
    let migrated = status?.success();
    let report = setup
        .src
        .client()
        .call("migration.status", serde_json::Value::Null)?[0]
        .clone();
    println!("\nCPS verdict over {} cycles:", verdict["sent"]);
    println!(
        "  answered {}  missed {}  duplicates {}  out of order {}  wrong {}",
        verdict["answered"],
        verdict["missed"],
        verdict["duplicates"],
        verdict["out_of_order"],
        verdict["wrong"]
    );
    let gap = &verdict["extra_gap_us"];
    println!(
        "  output gap beyond T_U: p50 {} µs, p99 {} µs, max {} µs (at cycle {})",
        gap["p50"], gap["p99"], gap["max"], gap["at_cycle"]
    );
    if let Some((step, _)) = chain_state(&setup.hosts.dst, setup.service) {
        println!("  the controller on dst has taken {step} inputs");
    }
    if let Some((src, dst)) = containers {
        println!(
            "  runc list: on src {:?}, on dst {:?}",
            src.wait_listed(&[]),
            dst.listed()
        );
    }
    let svg = PathBuf::from("target/demo-timeline.svg");
    std::fs::write(
        &svg,
        timeline(
            &std::fs::read_to_string(&trace)?,
            &report,
            migration_started,
        ),
    )?;
    let _ = std::fs::remove_file(&trace);
    println!("\ntimeline: {}", svg.display());
    kill_pid(report["destination_pid"].as_u64().unwrap_or(0));
    anyhow::ensure!(migrated, "the migration failed: {}", report["error"]);
    anyhow::ensure!(
        verdict["missed"] == 0 && verdict["duplicates"] == 0 && verdict["wrong"] == 0,
        "the CPS saw missed, duplicate or wrong outputs"
    );
    Ok(())
}

/// Inputs each field device sends in the cell demo, one per `PERIOD_US`.
const CELL_CYCLES: u64 = 6000;

/// Three hosts a, b and c, each with a daemon that lists the two others.
/// a's daemon starts a Markov controller that reads four field devices
/// (four flows into one socket), and its standby; the CPS host runs one
/// field device per flow, each sending every millisecond. The controller
/// goes a -> b in standby mode, then b -> c and c -> a leaving the
/// instance running, each with `dataplane migrate`. Then each device's
/// verdict.
fn cell() -> anyhow::Result<()> {
    println!("building a cell: hosts a, b, c and the CPS host; a daemon on each of a, b, c");
    let _tuning = dataplane_tests::tune_host_for_timing(dataplane_tests::Pin::Apart);
    let cell = Cell::new("democell");
    let service = sock(SERVICE_V4, 5000);
    let flows: Vec<_> = (0..4).map(|i| (sock(CPS_V4, 4000 + i), service)).collect();
    let controller = dataplane_bin().with_file_name("markov-controller");
    let mut start: Vec<String> = ["service", "start", "plc", "--standby"]
        .map(String::from)
        .into();
    for (cps, service) in &flows {
        start.extend(["--flow".into(), format!("{cps}={service}")]);
    }
    start.extend([
        "--".into(),
        controller.display().to_string(),
        service.to_string(),
        "--per-device".into(),
    ]);
    let dataplane = |host: &str, args: &[String]| -> anyhow::Result<()> {
        println!("\n[{host}]$ dataplane {}", args.join(" "));
        let status = Command::new(dataplane_bin())
            .arg("--socket")
            .arg(&cell.daemon(host).socket)
            .args(args)
            .status()?;
        anyhow::ensure!(status.success(), "dataplane {} failed ({status})", args[0]);
        Ok(())
    };
    dataplane("a", &start)?;
    println!(
        "\nfour field devices send {CELL_CYCLES} inputs each, one every {PERIOD_US} µs, \
         and check every output"
    );
    let cps = cell.start_cps(&flows, CELL_CYCLES);
    let mut migrated = Ok(());
    for (from, to, mode) in [
        ("a", "b", "standby"),
        ("b", "c", "leave-running"),
        ("c", "a", "leave-running"),
    ] {
        let args = ["migrate", "plc", "--to", &Cell::peer(to), "--mode", mode].map(String::from);
        migrated = dataplane(from, &args);
        if migrated.is_err() {
            break;
        }
    }
    let verdicts = cps_verdicts(cps);
    migrated?;
    println!("\neach field device's verdict:");
    println!(
        "{:>16}  {:>6}  {:>8}  {:>6}  {:>10}  {:>12}  {:>5}  {:>13}",
        "device",
        "sent",
        "answered",
        "missed",
        "duplicates",
        "out of order",
        "wrong",
        "max gap (µs)"
    );
    for ((cps, _), v) in flows.iter().zip(&verdicts) {
        let n = |key: &str| v[key].as_u64().unwrap_or(0);
        println!(
            "{:>16}  {:>6}  {:>8}  {:>6}  {:>10}  {:>12}  {:>5}  {:>13}",
            cps.to_string(),
            n("sent"),
            n("answered"),
            n("missed"),
            n("duplicates"),
            n("out_of_order"),
            n("wrong"),
            v["extra_gap_us"]["max"].as_i64().unwrap_or(0)
        );
    }
    let taken = chain_state(cell.host("a"), service).map_or(0, |s| s.0);
    println!(
        "the controller, back on a, has taken {taken} inputs ({} sent)",
        4 * CELL_CYCLES
    );
    anyhow::ensure!(verdicts.len() == flows.len(), "a device gave no verdict");
    anyhow::ensure!(
        verdicts.iter().all(|v| v["missed"] == 0
            && v["duplicates"] == 0
            && v["out_of_order"] == 0
            && v["wrong"] == 0),
        "a device saw missed, duplicate, out-of-order or wrong outputs"
    );
    anyhow::ensure!(
        taken == 4 * CELL_CYCLES,
        "the controller did not take every input"
    );
    Ok(())
}

/// An SVG of the migration: the CPS's output gap per cycle over time, the
/// phases as bands above it, the flip at K marked.
fn timeline(trace: &str, report: &serde_json::Value, migration_started: Duration) -> String {
    // (sent µs, answered µs) per cycle.
    let cycles: Vec<(u64, u64)> = read_trace(trace)
        .into_iter()
        .map(|c| (c.sent_us, c.answered_us))
        .collect();
    let origin = migration_started.as_micros() as i64;
    let total = report["total_us"].as_i64().unwrap_or(0);
    // Show from 100 ms before the migration to 100 ms after it.
    let (from, to) = (origin - 100_000, origin + total + 100_000);
    let (width, height, top) = (1000.0, 460.0, 90.0);
    // The plot's floor; the time axis and its labels sit below it.
    let floor = height - 70.0;
    // Margins keep the first and last tick labels inside the picture.
    let (left, right) = (40.0, 30.0);
    let x = |t: i64| left + (t - from) as f64 / (to - from) as f64 * (width - left - right);
    let gaps: Vec<(i64, i64)> = cycles
        .windows(2)
        .filter(|w| w[0].1 != 0 && w[1].1 != 0)
        .map(|w| (w[1].1 as i64, w[1].1 as i64 - w[0].1 as i64))
        .filter(|(t, _)| (from..to).contains(t))
        .collect();
    let max_gap = gaps.iter().map(|g| g.1).max().unwrap_or(1000).max(2000) as f64;
    let y = |gap: i64| floor - gap as f64 / max_gap * (floor - top);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' \
         font-family='sans-serif' font-size='11'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    let colors = [
        "#cfe2f3", "#f4cccc", "#d9ead3", "#fff2cc", "#d9d2e9", "#fce5cd", "#d0e0e3", "#eeeeee",
    ];
    let phases: Vec<(i64, i64, &str)> = report["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|phase| {
            let start = origin + phase["start_us"].as_i64().unwrap_or(0);
            let end = start + phase["duration_us"].as_i64().unwrap_or(0);
            (start, end, phase["name"].as_str().unwrap_or("?"))
        })
        .collect();
    let labels: Vec<(f64, f64)> = phases
        .iter()
        .map(|&(start, _, name)| (x(start), label_width(name)))
        .collect();
    // The bands first, then every label above them, so that no band hides
    // the end of its left neighbour's label.
    for (i, &(start, end, _)) in phases.iter().enumerate() {
        let (x0, x1) = (x(start), x(end));
        svg += &format!(
            "<rect x='{x0:.1}' y='10' width='{:.1}' height='{:.1}' fill='{}'/>\n",
            (x1 - x0).max(1.0),
            floor - 10.0,
            colors[i % colors.len()],
        );
    }
    for (&(start, _, name), row) in phases.iter().zip(label_rows(&labels)) {
        svg += &format!(
            "<text x='{:.1}' y='{}'>{name}</text>\n",
            x(start),
            22 + row * 14
        );
    }
    let k = report["handover_seq"].as_u64().unwrap_or(0) as usize;
    if let Some(&(sent, _)) = cycles.get(k) {
        let xf = x(sent as i64);
        svg += &format!(
            "<line x1='{xf:.1}' y1='10' x2='{xf:.1}' y2='{floor}' stroke='red' stroke-width='2'/>\n\
             <text x='{:.1}' y='80' fill='red'>flip: input K+1 = {}</text>\n",
            xf + 4.0,
            k + 1
        );
    }
    let points: String = gaps
        .iter()
        .map(|&(t, g)| format!("{:.1},{:.1} ", x(t), y(g)))
        .collect();
    svg += &format!("<polyline points='{points}' fill='none' stroke='black' stroke-width='1'/>\n");
    // The time axis: ms since the migration started, at round steps.
    svg += &format!(
        "<line x1='{left}' y1='{floor}' x2='{}' y2='{floor}' stroke='black'/>\n",
        width - right
    );
    let ms = |t: i64| (t - origin) as f64 / 1000.0;
    for tick in ticks(ms(from), ms(to)) {
        let xt = x(origin + (tick * 1000.0) as i64);
        svg += &format!(
            "<line x1='{xt:.1}' y1='{floor}' x2='{xt:.1}' y2='{:.1}' stroke='black'/>\n\
             <text x='{xt:.1}' y='{:.1}' text-anchor='middle'>{tick}</text>\n",
            floor + 5.0,
            floor + 18.0
        );
    }
    let (t_u, end) = (y(PERIOD_US as i64), width - right);
    svg += &format!(
        "<line x1='{left}' y1='{t_u:.1}' x2='{end}' y2='{t_u:.1}' stroke='gray' stroke-dasharray='4'/>\n\
         <text x='{left}' y='{:.1}'>T_U = 1 ms</text>\n\
         <text x='{:.1}' y='{:.1}' text-anchor='middle'>ms since the migration started</text>\n\
         <text x='{left}' y='{:.1}'>output gap at the CPS per cycle (top of scale {:.1} ms)</text>\n</svg>\n",
        t_u - 4.0,
        (left + end) / 2.0,
        floor + 34.0,
        height - 10.0,
        max_gap / 1000.0,
    );
    svg
}

/// About how wide `text` is at 11 px sans-serif.
fn label_width(text: &str) -> f64 {
    text.len() as f64 * 6.5 + 6.0
}

/// A row for each label (x, width), so that no two labels in one row
/// overlap: each takes the first row whose last label ends before it.
fn label_rows(labels: &[(f64, f64)]) -> Vec<usize> {
    let mut row_ends: Vec<f64> = Vec::new();
    labels
        .iter()
        .map(|&(x, width)| {
            let row = row_ends
                .iter()
                .position(|&end| end <= x)
                .unwrap_or(row_ends.len());
            if row == row_ends.len() {
                row_ends.push(x + width);
            } else {
                row_ends[row] = x + width;
            }
            row
        })
        .collect()
}

/// Round tick values (1, 2, 2.5 or 5 times a power of ten apart) between
/// `from` and `to`, at most about eight of them.
fn ticks(from: f64, to: f64) -> Vec<f64> {
    let raw = (to - from) / 8.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * power);
    let first = (from / step).ceil() as i64;
    let last = (to / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_in_a_row_do_not_overlap() {
        let labels = [
            (0.0, 60.0),
            (10.0, 60.0),
            (20.0, 60.0),
            (65.0, 40.0),
            (500.0, 60.0),
        ];
        let rows = label_rows(&labels);
        assert_eq!(rows, [0, 1, 2, 0, 0]);
        for (i, a) in labels.iter().enumerate() {
            for (j, b) in labels.iter().enumerate().skip(i + 1) {
                if rows[i] == rows[j] {
                    assert!(a.0 + a.1 <= b.0, "labels {i} and {j} overlap");
                }
            }
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        // 512 ms / 8 = 64 ms: the next round step is 100 ms.
        let t = ticks(-100.0, 412.0);
        assert_eq!(t, [-100.0, 0.0, 100.0, 200.0, 300.0, 400.0]);
        let t = ticks(-100.0, 1900.0);
        assert!(
            t.windows(2)
                .all(|w| w[1] - w[0] == 250.0 || w[1] - w[0] == 500.0),
            "{t:?}"
        );
        assert!((4..=12).contains(&t.len()), "{t:?}");
        let small = ticks(-0.3, 1.1);
        assert!(small.contains(&0.0) && small.contains(&1.0), "{small:?}");
    }
}
