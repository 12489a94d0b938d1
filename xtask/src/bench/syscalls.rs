//! What event-loop tracking adds to one syscall: an epoll wait (once per
//! loop iteration, in the target) and any other syscall (on the whole
//! host, when the kernel refuses the epoll-wait probes and the global
//! syscall tracepoints stand in).

use std::process::{Command, Stdio};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::measure::{median, round, spread_json};
use crate::{root, step};

/// Calls per measurement, and rounds.
const CALLS: u64 = 1_000_000;
const ROUNDS: usize = 5;

/// Bare and tracked runs of a syscall spinner alternate; medians are
/// reported.
pub fn run() -> anyhow::Result<Value> {
    let root = root();
    let profiler = root.join("target/release/profiler");
    let spin = root.join("target/fixtures/syscall_spin");
    std::fs::create_dir_all(root.join("target/fixtures"))?;
    crate::run(
        Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&spin)
            .arg(root.join("tests/fixtures/syscall_spin.c")),
    )?;
    step("what event-loop tracking adds to a syscall");
    let calls = CALLS.to_string();
    let mut figures = serde_json::Map::new();
    let mut probe = String::new();
    for mode in ["epoll", "getppid"] {
        let (mut bare, mut tracked) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let out = Command::new(&spin).args([mode, &calls]).output()?;
            bare.push(String::from_utf8(out.stdout)?.trim().parse::<f64>()?);
            // The spinner waits a second so that the probes are in place.
            let out = Command::new(&profiler)
                .args(["attach", "--quiet", "-F", "99", "-o"])
                .arg(root.join("target/bench/spin-profile"))
                .arg("--")
                .arg(&spin)
                .args([mode, &calls, "1000"])
                .stderr(Stdio::null())
                .output()?;
            if mode == "epoll" {
                probe = loop_probe(&root.join("target/bench/spin-profile/summary.json"))
                    .unwrap_or(probe);
            }
            let first = String::from_utf8(out.stdout)?;
            let first = first.lines().next().unwrap_or_default().trim().to_owned();
            tracked.push(
                first
                    .parse::<f64>()
                    .with_context(|| format!("the spinner under the profiler printed {first:?}"))?,
            );
        }
        let (bare_ns, tracked_ns) = (median(&bare), median(&tracked));
        println!(
            "  {mode:<8} bare {bare_ns:>7.1} ns, tracked {tracked_ns:>7.1} ns: +{:.1} ns per call",
            tracked_ns - bare_ns
        );
        figures.insert(
            mode.to_owned(),
            json!({
                "bare_ns": spread_json(&bare),
                "tracked_ns": spread_json(&tracked),
                "added_ns": round(tracked_ns - bare_ns, 1),
            }),
        );
    }
    println!("  event-loop iterations cut by {probe}");
    Ok(json!({
        "calls_per_run": CALLS,
        "rounds": ROUNDS,
        "probe": probe,
        "syscalls": figures,
    }))
}

/// What the profiler says cut the event-loop iterations of a run.
fn loop_probe(summary: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(summary).ok()?;
    let summary: Value = serde_json::from_str(&text).ok()?;
    Some(summary["event_loop"]["probe"].as_str()?.to_owned())
}
