//! What `profiler daemon` costs when it runs continuously at its default
//! 19 Hz: its own CPU and memory, its BPF programs' run time, and how long
//! cutting an interval (symbolizing and writing every process's profile)
//! takes.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    child::Owned,
    measure::{BpfRuns, cpu_time_s, holds_perf_event, round, spread_json},
};
use crate::{demo::free_port, root, step};

const INTERVAL_S: u64 = 10;
/// Sampling measured after the first interval, which pays for the first
/// parse of node's symbols.
const SETTLE_S: u64 = 12;
const MEASURE_S: u64 = 30;

pub fn run(out: &std::path::Path) -> anyhow::Result<Value> {
    let root = root();
    step(&format!(
        "profiler daemon at 19 Hz on two busy node processes for {} s",
        SETTLE_S + MEASURE_S
    ));
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out)?;
    let hot = root.join("tests/fixtures/hot.js");
    let node = || {
        Owned::spawn(
            "node",
            Command::new("node")
                .args(["--perf-basic-prof-only-functions", "--no-turbo-inlining"])
                .arg(&hot)
                .stdout(Stdio::null()),
        )
    };
    let (a, b) = (node()?, node()?);
    let log = out.join("daemon.log");
    let mut daemon = Owned::spawn(
        "profiler daemon",
        Command::new(root.join("target/release/profiler"))
            .args(["-v", "daemon", "--interval", &INTERVAL_S.to_string()])
            .args(["-p", &a.pid().to_string(), "-p", &b.pid().to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
            .arg("-o")
            .arg(out.join("profiles"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?),
    )?;

    let deadline = Instant::now() + Duration::from_secs(20);
    while !holds_perf_event(daemon.pid()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_secs(SETTLE_S));
    let (cpu_a, bpf_a) = (cpu_time_s(daemon.pid())?, BpfRuns::read(daemon.pid()));
    let mut rss_mib = Vec::new();
    for _ in 0..MEASURE_S {
        thread::sleep(Duration::from_secs(1));
        if let Some(mib) = rss_mib_of(daemon.pid()) {
            rss_mib.push(mib);
        }
    }
    let (cpu_b, bpf_b) = (cpu_time_s(daemon.pid())?, BpfRuns::read(daemon.pid()));
    daemon.stop(libc::SIGTERM, Duration::from_secs(30))?;
    drop((a, b));

    // "interval A to B: N profiles in X ms", one line per cut.
    let cuts_ms: Vec<f64> = fs::read_to_string(&log)?
        .lines()
        .filter_map(|line| line.split(" profiles in ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(" ms").parse().ok())
        .collect();
    let window_s = MEASURE_S as f64;
    let bpf_ns = bpf_b.since(&bpf_a).total_ns() as f64;
    let figures = json!({
        "frequency_hz": 19,
        "interval_s": INTERVAL_S,
        "targets": 2,
        "window_s": MEASURE_S,
        "daemon_cpu_percent_of_one_core": round(100.0 * (cpu_b - cpu_a) / window_s, 3),
        "bpf_cpu_percent_of_one_core": round(100.0 * bpf_ns / 1e9 / window_s, 3),
        "rss_mib": spread_json(&rss_mib),
        "first_cut_ms": cuts_ms.first(),
        "cut_ms": spread_json(cuts_ms.get(1..).unwrap_or(&[])),
    });
    println!(
        "  daemon CPU {}% of one core, BPF {}%, RSS {} MiB",
        figures["daemon_cpu_percent_of_one_core"],
        figures["bpf_cpu_percent_of_one_core"],
        figures["rss_mib"]["max"]
    );
    Ok(figures)
}

fn rss_mib_of(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
