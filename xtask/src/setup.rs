//! Installs missing tools: rust-src and bpf-linker for the eBPF build,
//! Debian packages and npm packages for tests and the demo.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{root, run, step};

/// The bpf-linker release line that links with the toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "^0.13";

/// rust-src (for `-Z build-std=core`) and bpf-linker.
pub fn ebpf_toolchain() -> anyhow::Result<()> {
    let sysroot = sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        step("installing the rust-src component");
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if !has_working("bpf-linker", &["--version"]) {
        install_bpf_linker(&sysroot)?;
    }
    Ok(())
}

fn sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc")?;
    if !out.status.success() {
        bail!("rustc --print sysroot failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Builds bpf-linker against the toolchain's own libLLVM, so its LLVM is
/// the one rustc emits bitcode for. LLVM_PREFIX must hold `lib/libLLVM.so`;
/// the sysroot only has the versioned name, so a folder of symlinks stands
/// in for an LLVM install.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let versioned = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let major = versioned
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();

    let prefix = root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(lib.join(&versioned), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }

    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} with LLVM {major} (takes a few minutes)"
    ));
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

/// What the integration tests run: a C compiler for the native fixtures,
/// node for the JavaScript ones, and Prometheus for the daemon's metrics.
pub fn test_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !has_working("gcc", &["--version"]) {
        missing.push("gcc");
    }
    if !has_working("node", &["--version"]) {
        missing.push("nodejs");
    }
    if !has_working("setpriv", &["--version"]) {
        missing.push("util-linux");
    }
    // The daemon's metrics are scraped by a real Prometheus server.
    if !has_working("prometheus", &["--version"]) {
        missing.push("prometheus");
    }
    debian_packages(&missing)?;
    python_packages(&[
        ("google.protobuf", "protobuf"),
        ("grpc_tools", "grpcio-tools"),
    ])
}

/// Installs Python packages whose module cannot be imported. The tests
/// read the profiler's pprof output with the protobuf library.
pub fn python_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    if !has_working("python3", &["--version"]) {
        debian_packages(&["python3", "python3-pip"])?;
    }
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(module, _)| !has_working("python3", &["-c", &format!("import {module}")]))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Python packages: {}",
        missing.join(" ")
    ));
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
        ])
        .args(&missing))
}

/// Installs Debian packages that are missing.
pub fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        packages.join(" ")
    ));
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    // The package lists may be stale or absent on a fresh machine.
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(packages);
    apt(&args)
}

pub fn has_working(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Installs the npm packages of a folder when `node_modules` is missing or
/// older than the lock file.
pub fn npm_packages(dir: &Path) -> anyhow::Result<()> {
    let modules = dir.join("node_modules");
    let lock = dir.join("package-lock.json");
    let fresh = match (fs::metadata(&modules), fs::metadata(&lock)) {
        (Ok(modules), Ok(lock)) => modules.modified()? >= lock.modified()?,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    // npm itself, and what better-sqlite3 needs when it builds from source.
    let mut missing = Vec::new();
    for (program, package) in [
        ("npm", "npm"),
        ("make", "make"),
        ("g++", "g++"),
        ("python3", "python3"),
    ] {
        if !has_working(program, &["--version"]) {
            missing.push(package);
        }
    }
    debian_packages(&missing)?;
    step(&format!("installing npm packages in {}", dir.display()));
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir))
}
