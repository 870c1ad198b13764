//! Builds the kernel programs (dataplane-ebpf) with the nightly toolchain and
//! bpf-linker into OUT_DIR, where the loader includes them, and CRIU's RPC
//! messages from proto/rpc.proto with prost-build (and `protoc`).
//!
//! With `DATAPLANE_SKIP_EBPF` set, it builds none and leaves an empty object:
//! the user crate then checks, lints and unit-tests on the stable toolchain
//! alone, and `dataplane load` says the programs are missing.
//!
//! This is aya-build's recipe with one change that aya-build 0.2 cannot
//! express: `-C target-cpu=v3`. The sequence numbers need BPF's atomic
//! fetch-and-add, which the default `generic` CPU lacks.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

const EBPF_PACKAGE: &str = "dataplane-ebpf";
const EBPF_BIN: &str = "dataplane-ebpf";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/rpc.proto");
    prost_build::compile_protos(&["proto/rpc.proto"], &["proto"])
        .context("generating CRIU's RPC messages (needs protoc: `cargo xtask setup`)")?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ebpf_dir = root.join(EBPF_PACKAGE);
    let common_dir = root.join("dataplane-common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=DATAPLANE_SKIP_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var_os("DATAPLANE_SKIP_EBPF").is_some() {
        println!("cargo:warning=DATAPLANE_SKIP_EBPF is set: built without the kernel programs");
        std::fs::write(out_dir.join("dataplane.bpf.o"), [])?;
        return Ok(());
    }
    let target_dir = out_dir.join("ebpf-target");
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
    ]
    .join("\x1f");
    let output = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--package", EBPF_PACKAGE])
        .args(["--bin", EBPF_BIN, "--release", "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .output()
        .context("running `rustup run nightly cargo build` for the eBPF programs (run `cargo xtask setup`)")?;
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the eBPF programs failed ({}); `cargo xtask setup` installs nightly rust-src and bpf-linker",
            output.status
        );
    }
    let object = target_dir.join(TARGET).join("release").join(EBPF_BIN);
    std::fs::copy(&object, out_dir.join("dataplane.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
