//! `cargo xtask <command>`: the one entry point for setup, tests and the demo.
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set up, build and test the dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages, nightly rust-src,
    /// bpf-linker 0.13.0 (on nightly's LLVM), CRIU 4.2.1 built from source.
    Setup,
    /// Set up, then build everything (the kernel programs included).
    Build,
    /// Set up, lint (clippy, warnings denied), then run the unit tests and the
    /// integration tests (as root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Set up, then migrate a running control service between built-in test
    /// hosts while a CPS sends to it every millisecond, and show what happened.
    Demo {
        /// `standby` (default) or `leave-running`; `cell`: a controller of
        /// four field devices moved round three hosts; `container`: the
        /// controller and its standby as runc containers.
        mode: Option<String>,
    },
    /// Set up, then run a benchmark on the test hosts.
    Bench {
        #[arg(value_enum)]
        which: Bench,
        /// Passed on to the benchmark (cutover: MIGRATIONS BASELINES;
        /// checkpoint: SIZE_MIB...; migrate: MIGRATIONS BASELINES SIZES;
        /// load: [--flows N] [--others controllers|none] RATE... per flow;
        /// replay: INPUTS; link: ROUNDS SIZE_MIB...; replica: SECONDS;
        /// failover: RUNS).
        args: Vec<String>,
    },
    /// Set up, install cargo-fuzz if missing, and run each fuzz target of
    /// `fuzz/` for SECONDS (default 60); fails if any finds a crash.
    Fuzz {
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// The CPU cost of a mirror copy: TC clone_redirect against XDP devmap broadcast.
    Mirror,
    /// Requests per second and latency of `status` over the control socket.
    Control,
    /// Live migrations against stop-and-copy: missed outputs, output gaps, flip time.
    Cutover,
    /// Checkpoint, transfer and restore by service size, against stop-and-copy.
    Checkpoint,
    /// Stop-and-copy, pre-copy and both live modes at 1, 16 and 64 MiB, with
    /// the PAM model's predictions: a table, a CSV and an SVG chart.
    Migrate,
    /// The input rate 16 flows sustain during a migration, and the daemons' CPU and memory.
    Load,
    /// Replayed inputs per second through a gate: batches against one per call.
    Replay,
    /// The sealed peer link against the same link in clear: image MB/s and T_M.
    Link,
    /// A hot replica's steady cost: both daemons' CPU and memory with and
    /// without one, at 1 and 10 kHz, and its lag.
    Replica,
    /// Failovers to a hot replica when the source host stops: missed
    /// cycles, detection time, duplicates.
    Failover,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    setup::run()?;
    match cli.command {
        Task::Setup => Ok(()),
        Task::Build => cargo(&["build", "--release"]),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Demo { mode } => run_bin("demo", &Vec::from_iter(mode)),
        Task::Bench { which, args } => match which {
            Bench::Mirror => run_bin("bench-mirror", &args),
            Bench::Control => run_bin("bench-control", &args),
            Bench::Cutover => run_bin("bench-cutover", &args),
            Bench::Checkpoint => run_bin("bench-checkpoint", &args),
            Bench::Migrate => run_bin("bench-migrate", &args),
            Bench::Load => run_bin("bench-load", &args),
            Bench::Replay => run_bin("bench-replay", &args),
            Bench::Link => run_bin("bench-link", &args),
            Bench::Replica => run_bin("bench-replica", &args),
            Bench::Failover => run_bin("bench-failover", &args),
        },
        Task::Fuzz { seconds } => fuzz::run(seconds),
    }
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the integration tests build network namespaces and load BPF programs: run as root");
    }
    // The default members: everything but the eBPF crate, which needs the
    // nightly toolchain and the BPF target.
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    clippy_ebpf()?;
    // The integration tests drive the `dataplane` binary, so build it first.
    cargo(&["build", "--release"])?;
    let mut args = vec!["test", "--release"];
    if let Some(f) = filter {
        args.push(f);
    }
    // The integration tests share kernel state (bpffs, namespaces): one at a time.
    args.extend(["--", "--test-threads=1"]);
    cargo(&args)
}

/// Lints the kernel programs as build.rs builds them: nightly, the BPF
/// target, BPF's v3 CPU; warnings denied.
fn clippy_ebpf() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rustflags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Ctarget-cpu=v3"].join("\x1f");
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "dataplane-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .current_dir(root.join("dataplane-ebpf"))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .status()
        .context("running nightly clippy on the eBPF crate")?;
    if !status.success() {
        bail!("clippy on dataplane-ebpf failed ({status})");
    }
    Ok(())
}

/// Runs one of the test crate's programs (the demo, the benchmarks) on the test hosts.
fn run_bin(name: &str, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{name} builds network namespaces and loads BPF programs: run as root");
    }
    // The programs drive the `dataplane` binary, so build everything first.
    cargo(&["build", "--release"])?;
    let mut run = vec![
        "run",
        "--release",
        "--package",
        "dataplane-tests",
        "--bin",
        name,
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cargo(&run)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
