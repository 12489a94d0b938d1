//! How right each profiler is: the share it gives a function whose true
//! share is known (the native split fixture), the shares it gives the top
//! JS functions next to V8's own CPU profile of the same process, and how
//! many of its stacks reach their thread's entry.
//!
//! The profilers sample the same process at the same time, so that they
//! see the same execution; their own cost does not matter here.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    child::Owned,
    measure::{round, spread_json},
    stacks::Stacks,
    tools::{Available, Kind, Outcome, Recording, Tool},
};
use crate::{root, step};

/// A frequency high enough that sampling noise (about 1 point on a 75%
/// share at 2500 samples) stays well under the 2-point goal.
pub const FREQUENCY_HZ: u32 = 499;
/// `hot_three` does three times the work of `cold_one`.
pub const SPLIT_TRUTH_PERCENT: f64 = 75.0;
const SPLIT_WINDOW: Duration = Duration::from_secs(5);
const NODE_WARMUP: Duration = Duration::from_millis(1500);
const NODE_WINDOW: Duration = Duration::from_secs(8);
/// The JS functions compared: the busiest in V8's profile.
const TOP_FUNCTIONS: usize = 3;

/// Lets a node fixture exit normally, and so write its `--cpu-prof`
/// profile, on SIGTERM or SIGINT; and exit by itself after a while.
const EXIT_ON_SIGNAL_JS: &str = "'use strict';
const exit = () => process.exit(0);
process.on('SIGTERM', exit);
process.on('SIGINT', exit);
setTimeout(exit, Number(process.env.BENCH_EXIT_AFTER_S || 60) * 1000).unref();
";

fn split_tools() -> Vec<Tool> {
    [Kind::Ours, Kind::PerfFp, Kind::PerfDwarf, Kind::Bpftrace]
        .into_iter()
        .map(|kind| Tool::new(kind, FREQUENCY_HZ))
        .collect()
}

fn node_tools() -> Vec<Tool> {
    [
        Kind::Ours,
        Kind::OursFramePointers,
        Kind::PerfFp,
        Kind::PerfDwarf,
        Kind::Bpftrace,
    ]
    .into_iter()
    .map(|kind| Tool::new(kind, FREQUENCY_HZ))
    .collect()
}

/// Starts every tool against `pid`, lets them sample for `window`, and
/// stops them one after the other. A tool that fails is reported with its
/// error and the others go on.
fn record_together(
    tools: &[Tool],
    pid: u32,
    window: Duration,
    dir: &Path,
) -> Vec<Result<Outcome, String>> {
    let mut recordings: Vec<Result<Recording, String>> = tools
        .iter()
        .map(|tool| {
            Recording::start(*tool, pid, &dir.join(tool.key())).map_err(|err| format!("{err:#}"))
        })
        .collect();
    for recording in &mut recordings {
        if let Ok(started) = recording
            && let Err(err) = started.wait_ready()
        {
            *recording = Err(format!("{err:#}"));
        }
    }
    thread::sleep(window);
    recordings
        .into_iter()
        .map(|recording| recording.and_then(|r| r.stop().map_err(|err| format!("{err:#}"))))
        .collect()
}

/// The native fixture: each tool's share for `hot_three` against 75%.
pub fn split(rounds: usize, available: &Available, out: &Path) -> anyhow::Result<Value> {
    let tools: Vec<Tool> = split_tools()
        .into_iter()
        .filter(|t| available.has(*t))
        .collect();
    let bin = root().join("target/fixtures/bench-split");
    fs::create_dir_all(bin.parent().unwrap_or(Path::new(".")))?;
    // As the integration tests build it: frame pointers everywhere, no
    // inlining, debug info.
    crate::run(
        Command::new("gcc")
            .args(["-g", "-O0", "-fno-omit-frame-pointer", "-fno-inline"])
            .args(["-fno-optimize-sibling-calls", "-pthread", "-o"])
            .arg(&bin)
            .arg(root().join("tests/fixtures/split.c")),
    )?;
    let target = Owned::spawn(
        "the split fixture",
        Command::new(&bin).arg("300").stdout(Stdio::null()),
    )?;
    thread::sleep(Duration::from_millis(300));

    let mut shares: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round_index in 0..rounds {
        step(&format!(
            "accuracy on the split fixture, round {} of {rounds}: {} profilers at {FREQUENCY_HZ} Hz \
             for {} s",
            round_index + 1,
            tools.len(),
            SPLIT_WINDOW.as_secs()
        ));
        let dir = out.join(format!("round{}", round_index + 1));
        let outcomes = record_together(&tools, target.pid(), SPLIT_WINDOW, &dir);
        for (tool, outcome) in tools.iter().zip(outcomes) {
            match outcome {
                Ok(outcome) => {
                    let share = outcome.stacks.percent_with("hot_three");
                    println!(
                        "  {:<44} hot_three {share:5.1}% of {} samples",
                        tool.label(),
                        outcome.samples
                    );
                    shares.entry(tool.key()).or_default().push(share);
                    samples
                        .entry(tool.key())
                        .or_default()
                        .push(outcome.samples as f64);
                }
                Err(err) => {
                    println!("  {:<44} failed: {err}", tool.label());
                    errors.entry(tool.key()).or_default().push(err);
                }
            }
        }
    }
    drop(target);

    let results: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let shares = shares.remove(&tool.key()).unwrap_or_default();
            let deviations: Vec<f64> = shares
                .iter()
                .map(|share| (share - SPLIT_TRUTH_PERCENT).abs())
                .collect();
            json!({
                "key": tool.key(),
                "label": tool.label(),
                "hot_three_percent": spread_json(&shares),
                "hot_three_percent_by_round": shares.iter().map(|s| round(*s, 2)).collect::<Vec<_>>(),
                "deviation_points": spread_json(&deviations),
                "samples": spread_json(&samples.remove(&tool.key()).unwrap_or_default()),
                "errors": errors.remove(&tool.key()).unwrap_or_default(),
            })
        })
        .collect();
    Ok(json!({
        "fixture": "tests/fixtures/split.c built with -O0 -fno-omit-frame-pointer -fno-inline",
        "function": "hot_three",
        "truth_percent": SPLIT_TRUTH_PERCENT,
        "frequency_hz": FREQUENCY_HZ,
        "window_s": SPLIT_WINDOW.as_secs(),
        "rounds": rounds,
        "tools": results,
    }))
}

/// Node with synchronous crypto, JSON and recursion, under `--cpu-prof`:
/// each tool's share for the top JS functions against V8's profile of the
/// same process over the same window, and each tool's complete stacks.
pub fn node(rounds: usize, available: &Available, out: &Path) -> anyhow::Result<Value> {
    let tools: Vec<Tool> = node_tools()
        .into_iter()
        .filter(|t| available.has(*t))
        .collect();
    let preload = out.join("exit-on-signal.js");
    fs::create_dir_all(out)?;
    fs::write(&preload, EXIT_ON_SIGNAL_JS)?;

    let mut per_tool: BTreeMap<String, NodeFigures> = BTreeMap::new();
    let mut reference_rounds: Vec<BTreeMap<String, f64>> = Vec::new();
    let mut top: Vec<String> = Vec::new();
    for round_index in 0..rounds {
        step(&format!(
            "accuracy and stack completeness on node with synchronous crypto, round {} of \
             {rounds}: {} profilers at {FREQUENCY_HZ} Hz for {} s, and --cpu-prof",
            round_index + 1,
            tools.len(),
            NODE_WINDOW.as_secs()
        ));
        let dir = out.join(format!("round{}", round_index + 1));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut target = Owned::spawn(
            "node crypto-loop.js",
            Command::new("node")
                .arg("--cpu-prof")
                .arg("--cpu-prof-dir")
                .arg(&dir)
                .args([
                    "--perf-basic-prof-only-functions",
                    "--interpreted-frames-native-stack",
                ])
                .arg("-r")
                .arg(&preload)
                .arg(root().join("tests/fixtures/crypto-loop.js"))
                .env("BENCH_EXIT_AFTER_S", "120")
                .stdout(Stdio::null()),
        )?;
        thread::sleep(NODE_WARMUP);
        let outcomes = record_together(&tools, target.pid(), NODE_WINDOW, &dir);
        target.stop(libc::SIGTERM, Duration::from_secs(20))?;
        let profile_path = fs::read_dir(&dir)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "cpuprofile"))
            .context("node wrote no .cpuprofile")?;
        let profile: Value = serde_json::from_str(&fs::read_to_string(&profile_path)?)?;

        // The functions compared are the busiest in V8's profile over the
        // window every tool sampled, taken from the first round.
        let windows: Vec<(f64, f64)> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().map(|o| o.window_mono_us))
            .collect();
        let common = (
            windows
                .iter()
                .map(|w| w.0)
                .fold(f64::NEG_INFINITY, f64::max),
            windows.iter().map(|w| w.1).fold(f64::INFINITY, f64::min),
        );
        let reference = js_percents(&Stacks::from_cpu_profile(&profile, common.0, common.1)?);
        if top.is_empty() {
            let mut ranked: Vec<(&String, &f64)> = reference.iter().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(a.1));
            top = ranked
                .iter()
                .take(TOP_FUNCTIONS)
                .map(|(name, _)| (*name).clone())
                .collect();
        }
        reference_rounds.push(reference);

        for (tool, outcome) in tools.iter().zip(outcomes) {
            let figures = per_tool.entry(tool.key()).or_default();
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(err) => {
                    println!("  {:<44} failed: {err}", tool.label());
                    figures.errors.push(err);
                    continue;
                }
            };
            let (from, to) = outcome.window_mono_us;
            let reference = js_percents(&Stacks::from_cpu_profile(&profile, from, to)?);
            let measured = js_percents(&outcome.stacks);
            let mut worst: f64 = 0.0;
            for name in &top {
                let (ours, theirs) = (
                    measured.get(name).copied().unwrap_or(0.0),
                    reference.get(name).copied().unwrap_or(0.0),
                );
                figures.shares.entry(name.clone()).or_default().push(ours);
                figures
                    .reference
                    .entry(name.clone())
                    .or_default()
                    .push(theirs);
                worst = worst.max((ours - theirs).abs());
            }
            figures.worst_deviation.push(worst);
            let (user, complete) = outcome.stacks.completeness();
            let complete_percent = 100.0 * complete as f64 / user.max(1) as f64;
            figures.complete_percent.push(complete_percent);
            figures.samples.push(outcome.samples as f64);
            figures.with_js_percent.push(
                100.0 * outcome.stacks.innermost_js().1 as f64
                    / outcome.stacks.samples().max(1) as f64,
            );
            if let Some(percent) = outcome
                .summary
                .as_ref()
                .and_then(|s| s["stacks"]["complete_percent"].as_f64())
            {
                figures.reported_complete_percent.push(percent);
            }
            println!(
                "  {:<44} complete stacks {complete_percent:5.1}%, {}",
                tool.label(),
                top.iter()
                    .map(|name| format!(
                        "{name} {:.1}% (V8 {:.1}%)",
                        measured.get(name).copied().unwrap_or(0.0),
                        reference.get(name).copied().unwrap_or(0.0)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    let results: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let figures = per_tool.remove(&tool.key()).unwrap_or_default();
            let functions: Vec<Value> = top
                .iter()
                .map(|name| {
                    let shares = figures.shares.get(name).cloned().unwrap_or_default();
                    let reference = figures.reference.get(name).cloned().unwrap_or_default();
                    let deviations: Vec<f64> = shares
                        .iter()
                        .zip(&reference)
                        .map(|(a, b)| (a - b).abs())
                        .collect();
                    json!({
                        "function": name,
                        "percent": spread_json(&shares),
                        "cpu_prof_percent": spread_json(&reference),
                        "deviation_points": spread_json(&deviations),
                    })
                })
                .collect();
            json!({
                "key": tool.key(),
                "label": tool.label(),
                "functions": functions,
                "worst_deviation_points": spread_json(&figures.worst_deviation),
                "complete_percent": spread_json(&figures.complete_percent),
                "reported_complete_percent": spread_json(&figures.reported_complete_percent),
                "samples_with_a_js_frame_percent": spread_json(&figures.with_js_percent),
                "samples": spread_json(&figures.samples),
                "errors": figures.errors,
            })
        })
        .collect();
    let reference: Vec<Value> = top
        .iter()
        .map(|name| {
            let values: Vec<f64> = reference_rounds
                .iter()
                .map(|r| r.get(name).copied().unwrap_or(0.0))
                .collect();
            json!({ "function": name, "percent": spread_json(&values) })
        })
        .collect();
    Ok(json!({
        "fixture": "tests/fixtures/crypto-loop.js under node --cpu-prof \
                    --perf-basic-prof-only-functions --interpreted-frames-native-stack",
        "frequency_hz": FREQUENCY_HZ,
        "window_s": NODE_WINDOW.as_secs(),
        "rounds": rounds,
        "share_definition": "percent of the samples that have a JS function on the stack, \
                             by the innermost JS function",
        "cpu_prof_reference": reference,
        "tools": results,
    }))
}

#[derive(Default)]
struct NodeFigures {
    shares: BTreeMap<String, Vec<f64>>,
    reference: BTreeMap<String, Vec<f64>>,
    worst_deviation: Vec<f64>,
    complete_percent: Vec<f64>,
    reported_complete_percent: Vec<f64>,
    with_js_percent: Vec<f64>,
    samples: Vec<f64>,
    errors: Vec<String>,
}

/// Percent of the samples with a JS function on the stack, by the
/// innermost one.
fn js_percents(stacks: &Stacks) -> BTreeMap<String, f64> {
    let (by_function, with_js) = stacks.innermost_js();
    by_function
        .into_iter()
        .map(|(name, count)| (name, round(100.0 * count as f64 / with_js.max(1) as f64, 3)))
        .collect()
}
