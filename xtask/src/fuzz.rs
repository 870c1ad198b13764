//! `cargo xtask fuzz [SECONDS]`: runs each cargo-fuzz target of `fuzz/` for
//! SECONDS and prints what libFuzzer did: executions, executions a second,
//! corpus size, crashes. Fails when a target found a crash (or a timeout, or
//! an out-of-memory), naming the input libFuzzer saved.
use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The fuzz targets, in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "control_request",
    "peer_frame",
    "mirror_header",
    "criu_response",
    "peer_seal",
];

/// Build options, the same for `cargo fuzz build` and `run` (else `run`
/// rebuilds): release with debug assertions and overflow checks.
const BUILD: &[&str] = &["--release", "--debug-assertions"];

/// What one target's run gave.
struct Outcome {
    target: &'static str,
    executions: u64,
    exec_per_sec: u64,
    corpus: String,
    elapsed: Duration,
    /// Inputs libFuzzer saved as crashes, timeouts or out-of-memory.
    findings: Vec<String>,
}

/// Installs cargo-fuzz if missing, builds the targets, runs each for `seconds`.
pub fn run(seconds: u64) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask is not in the workspace")?
        .to_path_buf();
    install_cargo_fuzz()?;
    let start = Instant::now();
    let mut build = vec!["+nightly", "fuzz", "build"];
    build.extend(BUILD);
    let status = Command::new("cargo")
        .args(&build)
        .current_dir(&root)
        .status()
        .context("running cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed ({status})");
    }
    eprintln!(
        "fuzz: built {} targets ({:.1} s)",
        TARGETS.len(),
        start.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for target in TARGETS {
        eprintln!("fuzz: {target} for {seconds} s");
        let outcome = run_target(&root, target, seconds)?;
        for path in &outcome.findings {
            eprintln!("fuzz: {target} found {path}");
        }
        outcomes.push(outcome);
    }
    print_table(&outcomes, seconds);
    let findings: Vec<&String> = outcomes.iter().flat_map(|o| &o.findings).collect();
    if !findings.is_empty() {
        for path in &findings {
            println!("crash: {path}");
        }
        bail!(
            "{} finding(s); reproduce one with `cargo +nightly fuzz run TARGET PATH`",
            findings.len()
        );
    }
    Ok(())
}

/// `cargo install cargo-fuzz --locked` unless `cargo fuzz` works already.
fn install_cargo_fuzz() -> anyhow::Result<()> {
    let start = Instant::now();
    let version = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let done = match version {
        Some(v) => format!("{v} present"),
        None => {
            let status = Command::new("cargo")
                .args(["install", "cargo-fuzz", "--locked"])
                .status()
                .context("running cargo install cargo-fuzz")?;
            if !status.success() {
                bail!("cargo install cargo-fuzz --locked failed ({status})");
            }
            "installed cargo-fuzz".to_string()
        }
    };
    eprintln!(
        "setup: {:<32} {done} ({:.1} s)",
        "cargo-fuzz",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one target with the committed seeds (`fuzz/corpus/TARGET`, read
/// only), a working corpus (`fuzz/target/corpus/TARGET`, where libFuzzer
/// adds what it finds, kept between runs) and `fuzz/TARGET.dict` if there
/// is one; its output is logged to `fuzz/target/logs/TARGET.log`.
fn run_target(root: &Path, target: &'static str, seconds: u64) -> anyhow::Result<Outcome> {
    let fuzz = root.join("fuzz");
    let seeds = fuzz.join("corpus").join(target);
    let corpus = fuzz.join("target").join("corpus").join(target);
    let logs = fuzz.join("target").join("logs");
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    let mut args = vec!["+nightly".to_string(), "fuzz".into(), "run".into()];
    args.extend(BUILD.iter().map(|s| s.to_string()));
    args.extend([
        target.to_string(),
        path_arg(&corpus),
        path_arg(&seeds),
        "--".into(),
        format!("-max_total_time={seconds}"),
        "-timeout=10".into(),
        "-print_final_stats=1".into(),
    ]);
    // A dictionary of the format's tokens, for the targets that have one.
    let dict = fuzz.join(format!("{target}.dict"));
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    let start = Instant::now();
    let status = Command::new("cargo")
        .args(&args)
        .current_dir(root)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running cargo +nightly fuzz run")?;
    let elapsed = start.elapsed();
    let text = fs::read_to_string(&log_path)?;
    let stats = Stats::parse(&text);
    if !status.success() && stats.findings.is_empty() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "cargo fuzz run {target} failed ({status}) without a finding; log {}:\n{}",
            log_path.display(),
            tail.join("\n")
        );
    }
    Ok(Outcome {
        target,
        executions: stats.executions,
        exec_per_sec: stats.exec_per_sec,
        corpus: stats.corpus,
        elapsed,
        findings: stats.findings,
    })
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// What libFuzzer's output says.
#[derive(Debug, Default, PartialEq)]
struct Stats {
    executions: u64,
    exec_per_sec: u64,
    /// `corp: UNITS/BYTES` of the last status line.
    corpus: String,
    findings: Vec<String>,
}

impl Stats {
    /// From the final stats (`stat::number_of_executed_units`,
    /// `stat::average_exec_per_sec`), else the last `#N ... exec/s: M`
    /// status line (`#N DONE` at the end of a run without findings).
    fn parse(text: &str) -> Self {
        let mut stats = Stats::default();
        let field = |line: &str, name: &str| -> Option<String> {
            let rest = &line[line.find(name)? + name.len()..];
            rest.split_whitespace().next().map(str::to_string)
        };
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                stats.executions = n.trim().parse().unwrap_or(stats.executions);
            } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
                stats.exec_per_sec = n.trim().parse().unwrap_or(stats.exec_per_sec);
            } else if let Some(status) = line.strip_prefix('#') {
                let count = status.split_whitespace().next().unwrap_or_default();
                if let Ok(n) = count.parse::<u64>() {
                    stats.executions = stats.executions.max(n);
                    if let Some(rate) = field(line, "exec/s:").and_then(|r| r.parse().ok()) {
                        stats.exec_per_sec = rate;
                    }
                    if let Some(corpus) = field(line, "corp:") {
                        stats.corpus = corpus;
                    }
                }
            } else if let Some(path) = line
                .split("Test unit written to ")
                .nth(1)
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                stats.findings.push(path.to_string());
            }
        }
        stats
    }
}

fn print_table(outcomes: &[Outcome], seconds: u64) {
    println!();
    println!("cargo xtask fuzz {seconds}: libFuzzer, {seconds} s a target");
    println!(
        "{:<16} {:>12} {:>9} {:>16} {:>9} {:>8}",
        "target", "executions", "exec/s", "corpus units/b", "crashes", "time s"
    );
    for o in outcomes {
        println!(
            "{:<16} {:>12} {:>9} {:>16} {:>9} {:>8.1}",
            o.target,
            o.executions,
            o.exec_per_sec,
            o.corpus,
            o.findings.len(),
            o.elapsed.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libfuzzer_output() {
        let done = "INFO: Seed: 1\n\
            #2\tINITED cov: 10 ft: 11 corp: 3/120b exec/s: 0 rss: 40Mb\n\
            #4096\tpulse  cov: 50 ft: 60 corp: 20/1Kb lim: 4 exec/s: 2048 rss: 41Mb\n\
            #123456\tDONE   cov: 80 ft: 90 corp: 57/2345b lim: 4096 exec/s: 2057 rss: 50Mb\n\
            Done 123456 runs in 60 second(s)\n\
            stat::number_of_executed_units: 123457\n\
            stat::average_exec_per_sec:     2057\n";
        let stats = Stats::parse(done);
        assert_eq!(stats.executions, 123457);
        assert_eq!(stats.exec_per_sec, 2057);
        assert_eq!(stats.corpus, "57/2345b");
        assert!(stats.findings.is_empty());

        let crash = "#900\tNEW    cov: 70 ft: 80 corp: 30/1Kb lim: 40 exec/s: 450 rss: 45Mb\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            artifact_prefix='/w/fuzz/artifacts/peer_frame/'; \
            Test unit written to /w/fuzz/artifacts/peer_frame/crash-abc\n";
        let stats = Stats::parse(crash);
        assert_eq!((stats.executions, stats.exec_per_sec), (900, 450));
        assert_eq!(stats.findings, ["/w/fuzz/artifacts/peer_frame/crash-abc"]);
    }
}
