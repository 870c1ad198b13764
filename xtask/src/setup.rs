//! `cargo xtask setup`: install what a fresh machine lacks, skip what is there.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context, bail};

/// Debian (bookworm) packages: iproute2 for the test hosts, CRIU's build
/// dependencies (protobuf-compiler's `protoc` also generates dataplane-user's
/// CRIU messages), a C toolchain, and systemd for `systemd-analyze`, which
/// checks the unit file (the package only installs systemd; systemd-sysv is
/// what would make it the init), and the container runtimes services run
/// in (runc, podman).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "systemd",
    "gcc",
    "make",
    "libc6-dev",
    "pkgconf",
    "libprotobuf-c-dev",
    "protobuf-c-compiler",
    "protobuf-compiler",
    "libprotobuf-dev",
    "libnl-3-dev",
    "libnet1-dev",
    "uuid-dev",
    "libcap-dev",
    "xz-utils",
    "libnftables-dev",
    "libbsd-dev",
    "libgnutls28-dev",
    "dpkg-dev",
    "ethtool",
    "runc",
    "podman",
];

/// bpf-linker from 0.11 gives union types C names in the BTF it emits
/// (0.10 kept `MaybeUninit<u8>`, and the kernel refused the object's BTF).
/// Built against the nightly toolchain's own libLLVM: no LLVM package of
/// bookworm matches nightly's, and 0.11 dropped the feature that loaded
/// rustc's LLVM at run time.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM versions bpf-linker `BPF_LINKER_VERSION` has a feature for.
const BPF_LINKER_LLVM: &[&str] = &["21", "22", "23"];
const CRIU_BIN: &str = "/usr/local/sbin/criu";
const CRIU_VERSION: &str = "4.2.1";

/// Runs every setup step, printing what it did and how long it took.
pub fn run() -> anyhow::Result<()> {
    step("Debian packages", apt_packages)?;
    step("nightly toolchain with rust-src", nightly_rust_src)?;
    step("clippy", clippy)?;
    step("bpf-linker", bpf_linker)?;
    step("CRIU", criu)?;
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<()> {
    let start = Instant::now();
    let done = f().with_context(|| format!("setup step `{name}` failed"))?;
    eprintln!(
        "setup: {name:<32} {done} ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn apt_packages() -> anyhow::Result<String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok("all present".into());
    }
    run_ok(Command::new("apt-get").arg("update"), "apt-get update")?;
    run_ok(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install (are you root?)",
    )?;
    Ok(format!("installed {}", missing.join(" ")))
}

fn nightly_rust_src() -> anyhow::Result<String> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("present".into());
    }
    run_ok(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )?;
    Ok("installed rust-src".into())
}

/// `cargo xtask test` lints with clippy before it tests: the user space on
/// the default toolchain, the kernel programs on nightly.
fn clippy() -> anyhow::Result<String> {
    let mut added = Vec::new();
    for toolchain in ["stable", "nightly"] {
        let present = Command::new("cargo")
            .args([&format!("+{toolchain}"), "clippy", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            run_ok(
                Command::new("rustup").args([
                    "component",
                    "add",
                    "clippy",
                    "--toolchain",
                    toolchain,
                ]),
                "rustup component add clippy",
            )?;
            added.push(toolchain);
        }
    }
    Ok(match added.is_empty() {
        true => "present".into(),
        false => format!("installed for {}", added.join(" and ")),
    })
}

fn bpf_linker() -> anyhow::Result<String> {
    // A bpf-linker whose LLVM went away with a nightly update fails to start,
    // and is installed again.
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(format!("{} present", version.trim()));
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let rust_lib = Path::new(sysroot.trim()).join("lib");
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` names no LLVM version")?
        .to_string();
    if !BPF_LINKER_LLVM.contains(&llvm_major.as_str()) {
        bail!(
            "nightly rustc uses LLVM {llvm_major}; bpf-linker {BPF_LINKER_VERSION} supports LLVM {}",
            BPF_LINKER_LLVM.join(", ")
        );
    }
    // bpf-linker links the libLLVM found as LLVM_PREFIX/lib/libLLVM.so; the
    // nightly toolchain's own is named after its version only.
    let llvm = fs::read_dir(&rust_lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", rust_lib.display()))?;
    let prefix = std::env::temp_dir().join("dataplane-bpf-linker-llvm");
    let _ = fs::remove_dir_all(&prefix);
    fs::create_dir_all(prefix.join("lib"))?;
    std::os::unix::fs::symlink(&llvm, prefix.join("lib/libLLVM.so"))?;
    run_ok(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            // At run time the library is found where the toolchain keeps it.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", rust_lib.display()),
            ),
        "cargo +nightly install bpf-linker",
    )?;
    let _ = fs::remove_dir_all(&prefix);
    Ok(format!(
        "installed bpf-linker {BPF_LINKER_VERSION} (nightly's LLVM {llvm_major})"
    ))
}

fn criu() -> anyhow::Result<String> {
    let version = output(Command::new(CRIU_BIN).arg("--version")).unwrap_or_default();
    let built = if version.contains(&format!("Version: {CRIU_VERSION}")) {
        "present".to_string()
    } else {
        build_criu()?
    };
    let check = Command::new(CRIU_BIN).arg("check").output()?;
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    if !check.status.success() || !said.contains("Looks good") {
        bail!("`{CRIU_BIN} check` failed on this kernel:\n{said}");
    }
    Ok(format!("{built}; `criu check`: Looks good"))
}

/// Builds CRIU from the upstream tarball of Debian sid's source package:
/// bookworm's 3.17 fails `criu check` on current kernels and trixie's 4.1.1
/// cannot dump INET sockets on kernels from 6.16.
fn build_criu() -> anyhow::Result<String> {
    let work = std::env::temp_dir().join("dataplane-criu-build");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let tarball = fetch_criu_source(&work)?;
    run_ok(
        Command::new("tar")
            .arg("xf")
            .arg(&tarball)
            .current_dir(&work),
        "unpacking the CRIU tarball",
    )?;
    let src = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_dir())
        .context("the CRIU tarball holds no directory")?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_ok(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            .arg("criu")
            .current_dir(&src),
        "make criu",
    )?;
    fs::copy(src.join("criu/criu"), CRIU_BIN).with_context(|| format!("installing {CRIU_BIN}"))?;
    let _ = fs::remove_dir_all(&work);
    Ok(format!("built from {}", tarball.display()))
}

/// Downloads CRIU's .orig tarball through a deb-src entry for sid made from
/// the machine's own Debian mirror. The entry and the package lists it brings
/// live in `work`, so the machine's apt configuration and lists stay as they were.
fn fetch_criu_source(work: &Path) -> anyhow::Result<PathBuf> {
    let mirror = debian_mirror()?;
    let sources = work.join("sid-src.list");
    let lists = work.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::write(
        &sources,
        format!(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} sid main\n"
        ),
    )?;
    let apt_options = [
        format!("-o=Dir::Etc::sourcelist={}", sources.display()),
        "-o=Dir::Etc::sourceparts=-".to_string(),
        format!("-o=Dir::State::Lists={}", lists.display()),
    ];
    run_ok(
        Command::new("apt-get").arg("update").args(&apt_options),
        "apt-get update for sid's source packages",
    )?;
    // The .dsc or .debian.tar.xz may fail to download; the .orig tarball is all we need.
    let _ = Command::new("apt-get")
        .args(&apt_options)
        .args(["source", "--download-only", "criu"])
        .current_dir(work)
        .output();
    fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("criu_") && n.ends_with(".orig.tar.xz"))
        })
        .context(
            "could not download CRIU's source tarball from Debian sid; \
             install CRIU 4.2.1 to /usr/local/sbin/criu by hand and run setup again",
        )
}

/// The first Debian mirror URI of the machine's own apt sources.
fn debian_mirror() -> anyhow::Result<String> {
    let mut texts = vec![fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    for entry in fs::read_dir("/etc/apt/sources.list.d")?.flatten() {
        texts.push(fs::read_to_string(entry.path()).unwrap_or_default());
    }
    for text in texts {
        for line in text.lines() {
            let uri = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
                line.strip_prefix("deb ")
                    .and_then(|rest| rest.split_whitespace().find(|w| w.contains("://")))
            });
            if let Some(uri) = uri.filter(|u| u.contains("debian") && !u.contains("security")) {
                return Ok(uri.to_string());
            }
        }
    }
    bail!("no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
