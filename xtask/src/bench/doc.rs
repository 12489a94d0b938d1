//! `docs/benchmarks.md`, written from the figures of one bench run (the
//! JSON the bench saves), and the goals those figures are held against.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{
    accuracy,
    measure::Spread,
    overhead::{CONNECTIONS, ENDPOINT},
    tools::{Kind, Tool},
};

/// A figure's median with its range, from the JSON.
fn spread(value: &Value) -> Option<Spread> {
    Spread::from_json(value)
}

/// The summary of one configuration of the overhead matrix.
fn config<'a>(figures: &'a Value, key: &str) -> Option<&'a Value> {
    figures["overhead"]["configs"]
        .as_array()?
        .iter()
        .find(|c| c["key"] == key)
}

fn tool_entry<'a>(section: &'a Value, key: &str) -> Option<&'a Value> {
    section["tools"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
}

fn key(kind: Kind, frequency_hz: u32) -> String {
    Tool::new(kind, frequency_hz).key()
}

/// `0.991 (0.982–1.004)`.
fn ratio_cell(value: &Value) -> String {
    spread(value).map_or("–".to_owned(), |s| {
        if s.count > 1 {
            format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max)
        } else {
            format!("{:.3}", s.median)
        }
    })
}

/// A median with its range, `digits` after the point, and a unit.
fn cell(value: &Value, digits: usize, unit: &str) -> String {
    spread(value).map_or("–".to_owned(), |s| {
        if s.count > 1 {
            format!(
                "{:.d$}{unit} ({:.d$}–{:.d$})",
                s.median,
                s.min,
                s.max,
                d = digits
            )
        } else {
            format!("{:.d$}{unit}", s.median, d = digits)
        }
    })
}

/// A fraction in the JSON as a percentage.
fn percent(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN) * 100.0
}

fn median(value: &Value) -> Option<f64> {
    spread(value).map(|s| s.median)
}

/// One goal, its figure and whether it was met.
struct Goal {
    goal: &'static str,
    figure: String,
    verdict: &'static str,
    why: String,
}

/// Holds the figures against the goals.
pub fn goals(figures: &Value) -> Value {
    let mut goals = Vec::new();
    let noise = &figures["overhead"]["no_profiler_spread"]["throughput"];
    let typical = noise["typical"].as_f64().unwrap_or(f64::NAN) * 100.0;
    let worst = noise["max"].as_f64().unwrap_or(f64::NAN) * 100.0;

    for (frequency_hz, limit, goal) in [
        (99, 1.0, "throughput loss under 1% at 99 Hz"),
        (999, 3.0, "throughput loss under 3% at 999 Hz"),
    ] {
        let ours = config(figures, &key(Kind::Ours, frequency_hz));
        let ratio = ours.and_then(|c| spread(&c["throughput_ratio"]));
        let bpf_share =
            ours.and_then(|c| median(&c["profiler"]["bpf_share_of_server_cpu_percent"]));
        goals.push(match ratio {
            None => not_measured(goal, "this profiler's runs failed"),
            Some(ratio) => {
                let loss = (1.0 - ratio.median) * 100.0;
                let measured = format!(
                    "median throughput ratio {:.3} ({:.3}–{:.3} over the rounds), a {} of \
                     {:.1}%; a run without a profiler strays from its neighbours by \
                     {typical:.1}% typically, {worst:.1}% at most",
                    ratio.median,
                    ratio.min,
                    ratio.max,
                    if loss >= 0.0 { "loss" } else { "gain" },
                    loss.abs()
                );
                let estimate = bpf_share
                    .map(|share| {
                        format!(
                            ". Measured directly instead, this profiler's BPF programs took \
                             {share:.2}% of the server's CPU time"
                        )
                    })
                    .unwrap_or_default();
                let (verdict, why) = if loss >= limit && loss > worst {
                    (
                        "not met",
                        format!("{measured}: the loss is beyond the noise{estimate}"),
                    )
                } else if typical >= limit {
                    (
                        "not resolved",
                        format!(
                            "{measured}, more than the goal, so throughput on this machine \
                             can neither confirm nor rule out a {limit:.0}% loss{estimate}"
                        ),
                    )
                } else if loss < limit {
                    ("met", format!("{measured}{estimate}"))
                } else {
                    ("not met", format!("{measured}{estimate}"))
                };
                Goal {
                    goal,
                    figure: format!(
                        "throughput ratio {:.3}{}",
                        ratio.median,
                        bpf_share
                            .map(|s| format!("; BPF programs {s:.2}% of the server's CPU"))
                            .unwrap_or_default()
                    ),
                    verdict,
                    why,
                }
            }
        });
    }

    let profiler =
        |k: String, figure: &str| config(figures, &k).and_then(|c| median(&c["profiler"][figure]));
    let goal = "profiler CPU below perf's at the same frequency";
    let while_sampling = "cpu_percent_of_one_core_while_sampling";
    let to_flame_graph = "cpu_to_flame_graph_s";
    goals.push(
        match (
            profiler(key(Kind::Ours, 99), while_sampling),
            profiler(key(Kind::PerfFp, 99), while_sampling),
            profiler(key(Kind::Ours, 99), to_flame_graph),
            profiler(key(Kind::PerfFp, 99), to_flame_graph),
        ) {
            (Some(ours_rate), Some(perf_rate), Some(ours_total), Some(perf_total)) => {
                let dwarf_total = profiler(key(Kind::PerfDwarf, 99), to_flame_graph);
                let total_met =
                    ours_total < perf_total && dwarf_total.is_none_or(|d| ours_total < d);
                let rate_met = ours_rate < perf_rate;
                Goal {
                    goal,
                    figure: format!(
                        "to a flame graph {ours_total:.2} s vs {perf_total:.2} s (-g){}; \
                         while sampling {ours_rate:.2}% vs {perf_rate:.2}% of one core",
                        dwarf_total
                            .map(|d| format!(", {d:.2} s (dwarf)"))
                            .unwrap_or_default()
                    ),
                    verdict: match (total_met, rate_met) {
                        (true, true) => "met",
                        (true, false) => "partly met",
                        _ => "not met",
                    },
                    why: format!(
                        "at 99 Hz on the same runs. To a flame graph: the profiler's process \
                         over its life and its BPF programs, against `perf record` plus \
                         `perf script`, collapsing and drawing. While sampling: this \
                         profiler's process and BPF programs against the `perf record` \
                         process alone, since perf's own sampling work runs in the kernel \
                         and cannot be told apart from the target's time{}",
                        if rate_met {
                            String::new()
                        } else {
                            let later = match crossover_s(figures) {
                                Some(s) if total_met && s > 0.0 => format!(
                                    "; over a run longer than the ones here, that rate \
                                     outweighs perf's post-processing past about {s:.0} s \
                                     of sampling at the earliest"
                                ),
                                _ => "; over these runs that rate is not made up by the \
                                      faster path to a flame graph"
                                    .to_owned(),
                            };
                            format!(
                                ". While sampling, this profiler costs more: its BPF programs \
                                 walk unwind tables for every sample and track every \
                                 syscall of the host, and its process re-reads the target's \
                                 mappings every second, where `perf record` only copies \
                                 buffers{later}"
                            )
                        }
                    ),
                }
            }
            _ => not_measured(goal, "perf or this profiler did not run"),
        },
    );

    let stop = |k: String| config(figures, &k).and_then(|c| median(&c["stop_to_flame_graph_ms"]));
    let goal = "stop to flame graph at least 5× faster than perf script + collapse";
    goals.push(
        match (stop(key(Kind::Ours, 99)), stop(key(Kind::PerfFp, 99))) {
            (Some(ours), Some(perf)) => {
                let speedup = perf / ours;
                let dwarf = stop(key(Kind::PerfDwarf, 99))
                    .map(|d| format!(" ({:.1}× against `--call-graph dwarf`)", d / ours))
                    .unwrap_or_default();
                Goal {
                    goal,
                    figure: format!("{speedup:.1}×{dwarf}"),
                    verdict: if speedup >= 5.0 { "met" } else { "not met" },
                    why: format!(
                        "{ours:.0} ms against {perf:.0} ms for `perf record -g` at 99 Hz: from \
                     the stop signal to perf's exit, `perf script`, inferno's collapse-perf \
                     and flame graph"
                    ),
                }
            }
            _ => not_measured(goal, "perf or this profiler did not run"),
        },
    );

    let goal = "accuracy within 2 points of the truth";
    let ours_key = key(Kind::Ours, accuracy::FREQUENCY_HZ);
    let split = tool_entry(&figures["accuracy"]["split"], &ours_key)
        .and_then(|t| median(&t["deviation_points"]));
    let node = tool_entry(&figures["accuracy"]["node"], &ours_key)
        .and_then(|t| median(&t["worst_deviation_points"]));
    goals.push(match (split, node) {
        (Some(split), Some(node)) => Goal {
            goal,
            figure: format!("{split:.1} points (native), {node:.1} points (JS)"),
            verdict: if split <= 2.0 && node <= 2.0 {
                "met"
            } else {
                "not met"
            },
            why: format!(
                "native: `hot_three` against its true 75%; JS: the worst of the top \
                 functions against `node --cpu-prof` in the same process{}",
                if node > 2.0 {
                    ", which is itself a sampled estimate with its own view of time \
                     outside JS (see below)"
                } else {
                    ""
                }
            ),
        },
        _ => not_measured(goal, "this profiler's accuracy runs failed"),
    });

    let goal = "stack completeness at least perf's";
    let complete = |kind: Kind| {
        tool_entry(
            &figures["accuracy"]["node"],
            &key(kind, accuracy::FREQUENCY_HZ),
        )
        .and_then(|t| median(&t["complete_percent"]))
    };
    goals.push(
        match (
            complete(Kind::Ours),
            complete(Kind::PerfFp),
            complete(Kind::PerfDwarf),
        ) {
            (Some(ours), Some(fp), dwarf) => {
                let best = dwarf.map_or(fp, |d| d.max(fp));
                Goal {
                    goal,
                    figure: format!(
                        "{ours:.1}% vs {fp:.1}% (-g){}",
                        dwarf
                            .map(|d| format!(", {d:.1}% (dwarf)"))
                            .unwrap_or_default()
                    ),
                    verdict: if ours >= best { "met" } else { "not met" },
                    why: "user stacks whose outermost frame is the thread's entry, on node \
                          running pbkdf2Sync, JSON and recursion"
                        .to_owned(),
                }
            }
            _ => not_measured(goal, "perf or this profiler did not run"),
        },
    );

    Value::Array(
        goals
            .into_iter()
            .map(|g| json!({ "goal": g.goal, "figure": g.figure, "verdict": g.verdict, "why": g.why }))
            .collect(),
    )
}

/// The run length past which this profiler's CPU to a flame graph would
/// exceed `perf record -g`'s at 99 Hz: each costs a fixed part (start-up,
/// symbols, post-processing) and a part per second of sampling; perf's
/// post-processing is taken as fixed, which favours perf.
fn crossover_s(figures: &Value) -> Option<f64> {
    let get = |kind: Kind, figure: &str| {
        config(figures, &key(kind, 99)).and_then(|c| median(&c["profiler"][figure]))
    };
    let sampling_s = |kind: Kind| get(kind, "sampling_s");
    let rate = |kind: Kind| Some(get(kind, "cpu_percent_of_one_core_while_sampling")? / 100.0);
    let fixed =
        |kind: Kind| Some(get(kind, "cpu_to_flame_graph_s")? - rate(kind)? * sampling_s(kind)?);
    let (ours_rate, perf_rate) = (rate(Kind::Ours)?, rate(Kind::PerfFp)?);
    let (ours_fixed, perf_fixed) = (fixed(Kind::Ours)?, fixed(Kind::PerfFp)?);
    (ours_rate > perf_rate).then(|| (perf_fixed - ours_fixed) / (ours_rate - perf_rate))
}

fn not_measured(goal: &'static str, why: &str) -> Goal {
    Goal {
        goal,
        figure: "–".to_owned(),
        verdict: "not measured",
        why: why.to_owned(),
    }
}

/// The whole document.
pub fn render(figures: &Value) -> anyhow::Result<String> {
    let mut md = String::new();
    let machine = &figures["machine"];
    let overhead = &figures["overhead"];
    let workload = &overhead["workload"];
    let rounds = workload["rounds"].as_u64().unwrap_or(0);

    writeln!(
        md,
        "# Benchmarks: this profiler next to perf, bpftrace and `node --cpu-prof`\n"
    )?;
    writeln!(
        md,
        "Written by `cargo xtask bench` from one run on {} (the run took {:.1} minutes; \
         raw figures in [`benchmarks.json`](benchmarks.json), a copy of \
         `target/bench/matrix.json`). Rerun it as root to refresh this page.{}\n",
        machine["date"].as_str().unwrap_or("?"),
        figures["bench_duration_s"].as_f64().unwrap_or(f64::NAN) / 60.0,
        if figures["quick"] == true {
            " **This is a `--quick` run: one round, fewer requests; do not quote it.**"
        } else {
            ""
        }
    )?;
    writeln!(
        md,
        "**Machine.** {} cores ({}), {} GiB, Linux {}, node {}, {}, {}. No hardware PMU: \
         every profiler samples on the `cpu-clock` software event. It is a shared VM: \
         other builds and test runs used its CPUs during this run (load average {} when \
         the bench started, {} when it ended), so single figures swing by several \
         percent. The configurations therefore run interleaved with runs without a \
         profiler, round by round, and every ratio is taken against the runs without a \
         profiler next to it; tables give the median over the rounds with the minimum and \
         maximum in brackets.\n",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["node"].as_str().unwrap_or("?"),
        figures["tools"]["perf"]["version"]
            .as_str()
            .unwrap_or("perf unavailable"),
        figures["tools"]["bpftrace"]["version"]
            .as_str()
            .unwrap_or("bpftrace unavailable"),
        machine["load_average_at_start"].as_str().unwrap_or("?"),
        machine["load_average_at_end"].as_str().unwrap_or("?"),
    )?;
    for (name, state) in [
        ("perf", &figures["tools"]["perf"]),
        ("bpftrace", &figures["tools"]["bpftrace"]),
    ] {
        if let Some(error) = state["error"].as_str() {
            writeln!(
                md,
                "**{name} could not run here** and is left out: `{error}`\n"
            )?;
        }
    }
    if let Some(mounted) = figures["tools"]["mounted_for_the_run"].as_array()
        && !mounted.is_empty()
    {
        writeln!(
            md,
            "bpftrace needed {} mounted; the bench mounted them for the run and unmounted \
             them after.\n",
            mounted
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" and ")
        )?;
    } else {
        writeln!(
            md,
            "Neither tool needed tracefs or debugfs: both sample through perf events.\n"
        )?;
    }

    writeln!(md, "## Goals\n")?;
    writeln!(md, "| goal | figure | verdict | why |")?;
    writeln!(md, "| --- | --- | --- | --- |")?;
    for goal in figures["goals"].as_array().into_iter().flatten() {
        writeln!(
            md,
            "| {} | {} | **{}** | {} |",
            goal["goal"].as_str().unwrap_or("?"),
            goal["figure"].as_str().unwrap_or("?"),
            goal["verdict"].as_str().unwrap_or("?"),
            goal["why"].as_str().unwrap_or("")
        )?;
    }

    render_overhead(&mut md, overhead, rounds)?;
    render_accuracy(&mut md, &figures["accuracy"])?;
    render_loop_tracking(&mut md, figures)?;
    render_daemon(&mut md, &figures["daemon"])?;
    render_method(&mut md, figures)?;
    Ok(md)
}

fn render_overhead(md: &mut String, overhead: &Value, rounds: u64) -> anyhow::Result<()> {
    let workload = &overhead["workload"];
    let none = overhead["configs"]
        .as_array()
        .and_then(|c| c.first())
        .cloned()
        .unwrap_or_default();
    writeln!(md, "\n## Overhead on a Node.js service\n")?;
    writeln!(
        md,
        "The example API (`examples/dashboard-api`, baseline variant) serves `GET {ENDPOINT}` \
         to autocannon on loopback: {} requests per run from {CONNECTIONS} connections \
         (each run also bounded to {} s), after {} warm-up requests on a fresh server. That \
         endpoint does the same synchronous work for every request (fresh SQLite \
         statements, table scans, then JSON), so the server keeps one core busy and its \
         throughput is set by CPU. {rounds} rounds; in each, one server takes every \
         configuration in turn (in a different order each round), with a run without a \
         profiler before the first, between any two and after the last. Each run is \
         compared with the mean of the two runs without a profiler around it, so that the \
         machine's drift cancels; `--cpu-prof` runs on a server of its own, started with \
         the flag, and is compared with the same neighbours. Without a profiler the server \
         did {} requests/s, p99 latency {} and {} of CPU per request.\n\n\
         The first row holds each run without a profiler against its own two neighbours: \
         what a ratio looks like when nothing changed. Its throughput ratio strays from 1 \
         by {:.1}% typically and {:.1}% at most, its p99 latency ratio by {:.1}% and \
         {:.1}%; ratios closer to 1 than that cannot be told from noise.\n",
        workload["requests_per_run"],
        workload["load_time_bound_s"],
        workload["warmup_requests"],
        cell(&none["requests_per_s"], 1, ""),
        cell(&none["p99_latency_ms"], 0, " ms"),
        cell(&none["server_cpu_us_per_request"], 0, " µs"),
        percent(&overhead["no_profiler_spread"]["throughput"]["typical"]),
        percent(&overhead["no_profiler_spread"]["throughput"]["max"]),
        percent(&overhead["no_profiler_spread"]["p99_latency"]["typical"]),
        percent(&overhead["no_profiler_spread"]["p99_latency"]["max"]),
    )?;
    writeln!(
        md,
        "| configuration | throughput (ratio) | p99 latency (ratio) | server CPU per request \
         (ratio) | profiler CPU while sampling (% of one core) | profiler CPU to a flame \
         graph (s) | profiler peak RSS (MiB) | stop to flame graph (ms) |"
    )?;
    writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for config in overhead["configs"].as_array().into_iter().flatten() {
        let profiler = &config["profiler"];
        let errors = config["errors"].as_array().map_or(0, Vec::len);
        let label = format!(
            "{}{}",
            config["label"].as_str().unwrap_or("?"),
            if errors > 0 {
                format!(" ({errors} run(s) failed)")
            } else {
                String::new()
            }
        );
        let rss = if profiler.is_null() {
            "–".to_owned()
        } else {
            let post = &profiler["post_processing_peak_rss_mib"];
            let post = if post.is_null() {
                String::new()
            } else {
                format!("; perf script {}", cell(post, 0, ""))
            };
            format!("{}{post}", cell(&profiler["peak_rss_mib"], 1, ""))
        };
        writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {rss} | {} |",
            ratio_cell(&config["throughput_ratio"]),
            ratio_cell(&config["p99_latency_ratio"]),
            ratio_cell(&config["server_cpu_per_request_ratio"]),
            cell(&profiler["cpu_percent_of_one_core_while_sampling"], 2, ""),
            cell(&profiler["cpu_to_flame_graph_s"], 2, ""),
            cell(&config["stop_to_flame_graph_ms"], 0, ""),
        )?;
    }
    let errors: Vec<String> = overhead["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|e| format!("- {}: `{e}`", c["label"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
        })
        .collect();
    if !errors.is_empty() {
        writeln!(md, "\nFailed runs:\n\n{}", errors.join("\n"))?;
    }

    let bpf = |key: &str, figure: &str| {
        overhead["configs"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["key"] == key))
            .map(|c| cell(&c["profiler"][figure], 2, "%"))
            .unwrap_or_else(|| "–".to_owned())
    };
    let per_run_us = |key: &str| {
        overhead["configs"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["key"] == key))
            .and_then(|c| median(&c["profiler"]["bpf_ns_per_sample"]))
            .map_or("–".to_owned(), |ns| format!("{:.1} µs", ns / 1e3))
    };
    let (ours_99, ours_999) = (key(Kind::Ours, 99), key(Kind::Ours, 999));
    let bpftrace_99 = key(Kind::Bpftrace, 99);
    writeln!(
        md,
        "\nThroughput cannot show costs this small here, so the BPF programs were timed \
         directly (kernel BPF statistics). They run in the context of what they interrupt \
         or trace, mostly the server, and took this share of the server's CPU time: this \
         profiler {} at 99 Hz and {} at 999 Hz (its event-loop tracking programs \
         included; {} without them), bpftrace {}. One run of the sampling program took \
         {} for this profiler at 99 Hz (a walk by unwind tables; the runs on the other \
         CPU, where the server is not running, return at once and count in the mean) and \
         {} for bpftrace's.",
        bpf(&ours_99, "bpf_share_of_server_cpu_percent"),
        bpf(&ours_999, "bpf_share_of_server_cpu_percent"),
        bpf(
            &key(Kind::OursNoLoop, 99),
            "bpf_share_of_server_cpu_percent"
        ),
        bpf(&bpftrace_99, "bpf_share_of_server_cpu_percent"),
        per_run_us(&ours_99),
        per_run_us(&bpftrace_99),
    )?;

    writeln!(md, "\nColumns:\n")?;
    writeln!(
        md,
        "- **throughput, p99 latency, server CPU per request**: against the mean of the two \
         runs without a profiler around it. A throughput ratio of 0.99 is a 1% loss; latency and CPU ratios \
         above 1 are costs. The server's CPU per request includes what the kernel does on \
         its behalf, which is where perf's in-kernel stack walks land: the server CPU column \
         is the fairest view of what each tool costs the target."
    )?;
    writeln!(
        md,
        "- **profiler CPU while sampling**: the profiler's own process from its first sample \
         to the stop, plus, for this profiler and bpftrace, the run time of their BPF \
         programs (kernel BPF statistics, switched on for the run). perf's kernel-side work \
         has no such counter and is not included."
    )?;
    writeln!(
        md,
        "- **profiler CPU to a flame graph**: the profiler's process over its whole life \
         (start-up, sampling, and for this profiler symbolizing and rendering), its BPF \
         programs, and the post-processing after it exits: `perf script`, collapsing and \
         drawing for perf; parsing and drawing bpftrace's printed map."
    )?;
    writeln!(
        md,
        "- **stop to flame graph**: this profiler's own `timings_ms.stop_to_output` \
         (symbolize and write every output); for perf, from SIGINT to `perf record` until \
         the SVG is written by `perf script`, inferno's collapse-perf and inferno's flame \
         graph run one after the other; for bpftrace, from SIGINT until it has printed its \
         map and the map is drawn; for `--cpu-prof`, from SIGTERM until node has written \
         the profile and it is drawn."
    )?;
    Ok(())
}

fn render_accuracy(md: &mut String, accuracy: &Value) -> anyhow::Result<()> {
    let split = &accuracy["split"];
    writeln!(md, "\n## Accuracy\n")?;
    writeln!(md, "### A native program with a known split\n")?;
    writeln!(
        md,
        "`tests/fixtures/split.c`, built as the integration tests build it (`-O0 \
         -fno-omit-frame-pointer -fno-inline`), calls `hot_three` and `cold_one` in a loop; \
         `hot_three` does exactly three times the work, so it holds 75% of the CPU time. \
         All profilers sample the same process at the same time, at {} Hz for {} s, {} \
         rounds. The figure is the share of all samples with `hot_three` on the stack.\n",
        split["frequency_hz"], split["window_s"], split["rounds"]
    )?;
    writeln!(
        md,
        "| profiler | `hot_three` share | off the truth (points) | samples |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: |")?;
    for tool in split["tools"].as_array().into_iter().flatten() {
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            tool["label"].as_str().unwrap_or("?"),
            cell(&tool["hot_three_percent"], 1, "%"),
            cell(&tool["deviation_points"], 1, ""),
            cell(&tool["samples"], 0, ""),
        )?;
    }

    writeln!(
        md,
        "\nThe profilers in one round sample the same seconds and move together from round \
         to round, so part of the range is the fixture's own split over those seconds, not \
         error of the profilers: other processes competing for the CPU, or a fixed sampling \
         period falling into step with the fixture's loop for a while. The goal is held \
         against the median. (They stop one after the other, so the last ones sample a \
         little longer.)"
    )?;

    let node = &accuracy["node"];
    let reference = node["cpu_prof_reference"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tools = node["tools"].as_array().cloned().unwrap_or_default();
    writeln!(md, "\n### JS functions against V8's own profile\n")?;
    writeln!(
        md,
        "node runs `tests/fixtures/crypto-loop.js` (synchronous `pbkdf2Sync`, JSON round \
         trips, a recursive `fib`) under `--cpu-prof`, V8's sampling profiler, while every \
         profiler samples the same process at {} Hz for {} s ({} rounds). For each, the \
         share of each function is the share of samples whose innermost JS frame is that \
         function, among the samples that have a JS frame at all; V8's profile is cut to \
         the same window (its sample times are on the same monotonic clock). The cells are \
         the median share and, in brackets, the median distance from V8's share in points.\n",
        node["frequency_hz"], node["window_s"], node["rounds"]
    )?;
    write!(md, "| function | `--cpu-prof` |")?;
    for tool in &tools {
        write!(md, " {} |", tool["label"].as_str().unwrap_or("?"))?;
    }
    writeln!(md)?;
    writeln!(md, "| --- | ---: |{}", " ---: |".repeat(tools.len()))?;
    for entry in &reference {
        let name = entry["function"].as_str().unwrap_or("?");
        write!(md, "| `{name}` | {} |", cell(&entry["percent"], 1, "%"))?;
        for tool in &tools {
            let function = tool["functions"]
                .as_array()
                .and_then(|f| f.iter().find(|f| f["function"] == name));
            match function {
                Some(f) => write!(
                    md,
                    " {} ({}) |",
                    median(&f["percent"]).map_or("–".to_owned(), |m| format!("{m:.1}%")),
                    median(&f["deviation_points"]).map_or("–".to_owned(), |m| format!("{m:.1}"))
                )?,
                None => write!(md, " – |")?,
            }
        }
        writeln!(md)?;
    }
    write!(md, "| worst distance (points) | |")?;
    for tool in &tools {
        write!(md, " {} |", cell(&tool["worst_deviation_points"], 1, ""))?;
    }
    writeln!(md)?;
    write!(md, "| samples with a JS frame | |")?;
    for tool in &tools {
        write!(
            md,
            " {} |",
            cell(&tool["samples_with_a_js_frame_percent"], 1, "%")
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "\nV8's profile is not ground truth: it samples on a timer of its own, interrupts \
         only the main thread, and files time in the garbage collector under `(garbage \
         collector)` where the other profilers see the JS function that allocated. A \
         profiler that loses the JS frames of some samples (a frame-pointer walk stopping \
         in OpenSSL's assembly, a DWARF copy of 8 KiB that ends before the JS frames) \
         misattributes them or drops them from the JS samples, which shows as distance \
         from V8's shares.\n"
    )?;

    writeln!(md, "## Stack completeness\n")?;
    writeln!(
        md,
        "From the same runs: the share of samples with a user stack whose outermost frame is \
         the thread's entry (`_start`, `__libc_start_main`, libc's `__libc_start_call_main` \
         where a frame-pointer walk ends, `start_thread`, `clone3`). A stack that stops \
         earlier cannot be placed under its callers in a flame graph.\n"
    )?;
    writeln!(
        md,
        "| profiler | stacks reaching the thread entry | samples |"
    )?;
    writeln!(md, "| --- | ---: | ---: |")?;
    for tool in &tools {
        writeln!(
            md,
            "| {} | {} | {} |",
            tool["label"].as_str().unwrap_or("?"),
            cell(&tool["complete_percent"], 1, "%"),
            cell(&tool["samples"], 0, ""),
        )?;
    }
    let failures: Vec<String> = split["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(&tools)
        .flat_map(|t| {
            t["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|e| format!("- {}: `{e}`", t["label"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
        })
        .collect();
    if !failures.is_empty() {
        writeln!(md, "\nFailed runs:\n\n{}", failures.join("\n"))?;
    }
    Ok(())
}

fn render_loop_tracking(md: &mut String, figures: &Value) -> anyhow::Result<()> {
    writeln!(md, "\n## Event-loop tracking\n")?;
    let probe = figures["syscalls"]["probe"].as_str().unwrap_or("");
    let how = if probe.starts_with("fentry") {
        "fentry and fexit programs on the kernel's `do_epoll_wait`, so only epoll waits \
         pay"
    } else {
        "the global `sys_enter`/`sys_exit` raw tracepoints, which every syscall of the \
         host pays for (the kernel here refused fentry on `do_epoll_wait`, which would \
         leave other syscalls alone)"
    };
    writeln!(
        md,
        "This profiler also times every event-loop iteration of the target, through \
         {how}. What that adds to one syscall (medians of {} alternating runs of {} \
         calls):\n",
        figures["syscalls"]["rounds"], figures["syscalls"]["calls_per_run"]
    )?;
    writeln!(md, "| syscall | bare | tracked | added |")?;
    writeln!(md, "| --- | ---: | ---: | ---: |")?;
    for (name, label) in [
        ("epoll", "epoll wait (one per loop iteration)"),
        ("getppid", "any other syscall on the host"),
    ] {
        let entry = &figures["syscalls"]["syscalls"][name];
        writeln!(
            md,
            "| {label} | {} | {} | {:+.0} ns |",
            cell(&entry["bare_ns"], 0, " ns"),
            cell(&entry["tracked_ns"], 0, " ns"),
            entry["added_ns"].as_f64().unwrap_or(f64::NAN)
        )?;
    }
    let on = config(figures, &key(Kind::Ours, 99));
    let off = config(figures, &key(Kind::OursNoLoop, 99));
    if let (Some(on), Some(off)) = (on, off) {
        writeln!(
            md,
            "\nOn the service above, at 99 Hz, with tracking and without: throughput \
             ratio {} and {}, server CPU per request ratio {} and {}, profiler CPU while \
             sampling {}% and {}% of one core.",
            ratio_cell(&on["throughput_ratio"]),
            ratio_cell(&off["throughput_ratio"]),
            ratio_cell(&on["server_cpu_per_request_ratio"]),
            ratio_cell(&off["server_cpu_per_request_ratio"]),
            cell(
                &on["profiler"]["cpu_percent_of_one_core_while_sampling"],
                2,
                ""
            ),
            cell(
                &off["profiler"]["cpu_percent_of_one_core_while_sampling"],
                2,
                ""
            ),
        )?;
    }
    Ok(())
}

fn render_daemon(md: &mut String, daemon: &Value) -> anyhow::Result<()> {
    if daemon.is_null() {
        return Ok(());
    }
    writeln!(md, "\n## Continuous profiling: `profiler daemon`\n")?;
    writeln!(
        md,
        "`profiler daemon -p A -p B --interval {}` at its default {} Hz on two node \
         processes each keeping a core busy (`tests/fixtures/hot.js`), measured for {} s \
         after its first interval. RSS was read once a second; a cut reads and clears the \
         interval's counts, symbolizes and writes both processes' profiles and prunes the \
         kernel maps.\n",
        daemon["interval_s"], daemon["frequency_hz"], daemon["window_s"]
    )?;
    writeln!(md, "| figure | value |")?;
    writeln!(md, "| --- | ---: |")?;
    writeln!(
        md,
        "| daemon CPU (its process) | {}% of one core |",
        daemon["daemon_cpu_percent_of_one_core"]
    )?;
    writeln!(
        md,
        "| its BPF programs (sampling and event-loop tracking) | {}% of one core |",
        daemon["bpf_cpu_percent_of_one_core"]
    )?;
    writeln!(md, "| RSS | {} |", cell(&daemon["rss_mib"], 1, " MiB"))?;
    writeln!(
        md,
        "| cutting an interval | {} |",
        cell(&daemon["cut_ms"], 0, " ms")
    )?;
    writeln!(
        md,
        "| the first cut (node's symbols parsed) | {} ms |",
        daemon["first_cut_ms"].as_f64().map_or(f64::NAN, f64::round)
    )?;
    Ok(())
}

fn render_method(md: &mut String, figures: &Value) -> anyhow::Result<()> {
    writeln!(md, "\n## How each profiler ran\n")?;
    writeln!(
        md,
        "- This profiler: `profiler attach --quiet -p PID -F HZ -o DIR`, stopped with \
         SIGINT; `--no-event-loop` and `--unwind-rows 0` where the table says so."
    )?;
    writeln!(
        md,
        "- perf: `perf record -e cpu-clock -F HZ -g -p PID` or `--call-graph dwarf` \
         (8 KiB of stack per sample), stopped with SIGINT; then `perf script --no-inline`, \
         inferno's collapse-perf (JIT and kernel frames annotated) and inferno's flame \
         graph, called from the bench as the inferno library (one thread, the same code \
         as the `inferno-collapse-perf` and `inferno-flamegraph` commands). \
         `--no-inline` is perf script's fastest path: by default it starts `addr2line` \
         for inlined functions, which took 20 to 30 s for a 5-second DWARF profile of the \
         API on this machine. perf \
         names JIT frames from V8's `/tmp/perf-PID.map`."
    )?;
    writeln!(
        md,
        "- bpftrace: `bpftrace -e '{}'`, stopped with SIGINT, with \
         `BPFTRACE_CACHE_USER_SYMBOLS=1` (without it, with ASLR on, bpftrace resolves every \
         user frame afresh, and printing the API's map had not finished after ten minutes) \
         and `BPFTRACE_MAP_KEYS_MAX=65536` (4096 distinct stacks by default). Its printed \
         map is parsed into folded stacks and drawn by the bench.",
        Tool::new(Kind::Bpftrace, 99)
            .bpftrace_program(0)
            .replace("== 0", "== PID")
    )?;
    writeln!(
        md,
        "- `node --cpu-prof`: the server started with it (plus `--cpu-prof-dir`); V8 writes \
         the profile when node exits, which the bench converts to folded stacks and draws."
    )?;
    writeln!(
        md,
        "- Every target runs with `--perf-basic-prof-only-functions \
         --interpreted-frames-native-stack`, the no-profiler runs included, so that the \
         external profilers can name JS frames."
    )?;
    writeln!(
        md,
        "- A profiler counts as sampling once it holds a perf event (a `perf_event` file or \
         a BPF link to one); its CPU while sampling runs from then to the stop signal."
    )?;
    writeln!(md, "\n## Known gaps\n")?;
    writeln!(
        md,
        "- perf's sampling work in the kernel (the frame-pointer walk for `-g`, the 8 KiB \
         stack copy for `dwarf`) is charged to the target and shows in its CPU per request, \
         not in perf's own CPU column."
    )?;
    writeln!(
        md,
        "- Kernel BPF statistics, switched on to measure BPF programs, add a clock read to \
         each program run, for this profiler and bpftrace alike."
    )?;
    writeln!(
        md,
        "- The accuracy runs sample one process with every profiler at once; each adds its \
         own interruptions, which does not change the shares but does slow the target."
    )?;
    writeln!(
        md,
        "- {} rounds on a noisy machine cannot resolve a throughput difference smaller than \
         the distance between runs without a profiler (given above).",
        figures["overhead"]["workload"]["rounds"]
    )?;
    Ok(())
}
