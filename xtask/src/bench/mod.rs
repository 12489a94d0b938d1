//! `cargo xtask bench`: this profiler side by side with `perf record`
//! (frame pointers and DWARF), bpftrace and `node --cpu-prof`, on what
//! they cost a Node.js service under load, how right they are against a
//! known split and against V8's own profile, and how complete their stacks
//! are; plus what event-loop tracking adds to a syscall, and what the
//! continuous daemon costs.
//!
//! Everything goes to `target/bench/matrix.json`; the bench then writes
//! `docs/benchmarks.md` from those figures and copies them to
//! `docs/benchmarks.json`.

mod accuracy;
mod child;
pub mod cleanup;
mod daemon;
mod doc;
mod measure;
mod overhead;
mod stacks;
mod syscalls;
mod tools;

use std::{fs, process::Command, thread, time::Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{root, step};

pub struct Options {
    /// One round and fewer requests, the doc written under target/.
    pub quick: bool,
    /// Only write the doc again from a saved matrix.json.
    pub from_json: Option<std::path::PathBuf>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if let Some(path) = &options.from_json {
        let mut figures: Value = serde_json::from_str(
            &fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?;
        figures["goals"] = doc::goals(&figures);
        return write_doc(&figures);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads BPF programs and runs perf on other processes: run it as root");
    }

    cleanup::install();
    let started = Instant::now();
    let load_at_start = load_average();
    let out = root().join("target/bench");
    let _ = fs::remove_dir_all(out.join("runs"));
    fs::create_dir_all(out.join("runs"))?;
    let available = tools::prepare(&out.join("runs"));
    let stats = measure::BpfStats::enable()?;

    let settings = if options.quick {
        overhead::Settings {
            rounds: 1,
            requests: 300,
            warmup_requests: 150,
        }
    } else {
        overhead::Settings {
            rounds: 5,
            requests: 500,
            warmup_requests: 300,
        }
    };
    let accuracy_rounds = if options.quick { 1 } else { 3 };
    let overhead = overhead::run(&settings, &available, &out.join("runs/overhead"))?;
    let split = accuracy::split(accuracy_rounds, &available, &out.join("runs/split"))?;
    let node = accuracy::node(accuracy_rounds, &available, &out.join("runs/node"))?;
    let daemon = daemon::run(&out.join("runs/daemon"))?;
    drop(stats);
    let syscalls = syscalls::run()?;

    let mut figures = json!({
        "quick": options.quick,
        "bench_duration_s": started.elapsed().as_secs(),
        "machine": machine(&load_at_start),
        "tools": available.to_json(),
        "overhead": overhead,
        "accuracy": { "split": split, "node": node },
        "syscalls": syscalls,
        "daemon": daemon,
    });
    drop(available);
    figures["goals"] = doc::goals(&figures);
    let path = out.join("matrix.json");
    fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;
    println!("\nfigures saved to {}", path.display());
    write_doc(&figures)?;
    println!(
        "bench finished in {:.1} minutes",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// `docs/benchmarks.md` and `docs/benchmarks.json`, or for a quick run
/// `target/bench/benchmarks.md`, and the goals on the terminal.
fn write_doc(figures: &Value) -> anyhow::Result<()> {
    let markdown = doc::render(figures)?;
    let doc_path = if figures["quick"] == true {
        root().join("target/bench/benchmarks.md")
    } else {
        let docs = root().join("docs");
        fs::write(
            docs.join("benchmarks.json"),
            serde_json::to_string_pretty(figures)? + "\n",
        )?;
        docs.join("benchmarks.md")
    };
    fs::write(&doc_path, markdown)?;
    step(&format!("goals (written to {})", doc_path.display()));
    for goal in figures["goals"].as_array().into_iter().flatten() {
        println!(
            "  {:<13} {}: {}",
            goal["verdict"].as_str().unwrap_or("?"),
            goal["goal"].as_str().unwrap_or("?"),
            goal["figure"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine(load_at_start: &str) -> Value {
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_default();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| (kib / 1024.0 / 1024.0).round());
    json!({
        "date": output("date", &["-u", "+%Y-%m-%d"]),
        "cores": thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory_gib": memory_gib,
        "kernel": output("uname", &["-r"]),
        "node": output("node", &["--version"]),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
    })
}
