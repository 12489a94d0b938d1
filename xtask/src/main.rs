//! Build, test and demo orchestration: `cargo xtask build|test`.
//!
//! Every command installs what it needs and is missing, each step only when
//! it is missing, so that a fresh machine needs nothing done by hand.

mod bench;
mod demo;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain if missing and build `target/release/profiler`.
    Build,
    /// Build, then run the unit tests and the integration tests (as root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build, then run the worked investigation of the example API:
    /// profile the baseline and the fixed variant under load and write the
    /// flame graphs, a differential flame graph and a report to target/demo.
    Demo,
    /// Build, then compare the profiler with perf, bpftrace and
    /// `node --cpu-prof` (cost to a service under load, accuracy, stack
    /// completeness) and write docs/benchmarks.md from the figures.
    Bench {
        /// One round and fewer requests, for a quick look; the doc goes to
        /// target/bench/benchmarks.md instead of docs/.
        #[arg(long)]
        quick: bool,
        /// Write the doc again from a saved matrix.json, measuring nothing.
        #[arg(long, value_name = "MATRIX_JSON")]
        from_json: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Build => build(),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Demo => {
            build()?;
            demo::run()
        }
        Task::Bench { quick, from_json } => {
            let options = bench::Options { quick, from_json };
            if options.from_json.is_none() {
                build()?;
                setup::test_tools()?;
            }
            bench::run(&options)
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build() -> anyhow::Result<()> {
    setup::ebpf_toolchain()?;
    step("building target/release/profiler");
    run(cargo().args(["build", "--release", "--package", "profiler"]))?;
    println!("built {}", root().join("target/release/profiler").display());
    Ok(())
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    build()?;
    setup::test_tools()?;

    step("unit tests");
    let mut unit = cargo();
    unit.args([
        "test",
        "--release",
        "--package",
        "profiler",
        "--package",
        "profiler-common",
    ]);
    unit.args(["--package", "xtask"]);
    if let Some(filter) = filter {
        unit.arg(filter);
    }
    run(&mut unit)?;

    let example = root().join("examples/dashboard-api");
    setup::npm_packages(&example)?;
    step("example API tests (node --test)");
    run(Command::new("npm").args(["test"]).current_dir(&example))?;

    step("integration tests against real processes");
    let mut integration = cargo();
    // Every test binary runs even when one fails, so one failure does not
    // hide the others.
    integration.args(["test", "--release", "--no-fail-fast"]);
    integration.args(["--package", "integration-tests", "--"]);
    // One at a time: the tests measure shares of CPU time on a small machine.
    integration.arg("--test-threads=1");
    if let Some(filter) = filter {
        integration.arg(filter);
    }
    integration.env("PROFILER_BIN", root().join("target/release/profiler"));
    run(&mut integration)?;

    println!("all tests passed");
    Ok(())
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(root());
    cmd
}

pub fn step(what: &str) {
    println!("==> {what}");
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
