//! Builds the eBPF program and leaves it in `OUT_DIR` for `include_bytes!`.
//!
//! The program is compiled for `bpfel-unknown-none` with `-Z build-std=core`
//! on the same stable toolchain as the rest of the workspace, which needs
//! `RUSTC_BOOTSTRAP=1`, the `rust-src` component and `bpf-linker` on PATH.
//! `cargo xtask build` installs the last two when they are missing.

use std::{env, path::Path, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../profiler-common/src");
    println!("cargo:rerun-if-env-changed=PATH");

    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker was not found on PATH; `cargo xtask build` installs it \
             (with the LLVM that matches rustc)"
        );
    }

    // The toolchain cargo was started with, so that the eBPF crate is built
    // by the same compiler and never asks rustup for a nightly.
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());

    // SAFETY: build scripts are single-threaded at this point; the variable
    // is read by aya-build and inherited by the nested cargo it spawns.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiler-ebpf");
    let root = root.to_str().context("non-UTF-8 path to profiler-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
