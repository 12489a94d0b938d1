//! What each profiler costs the service it profiles: the example dashboard
//! API under a fixed load, with no profiler and with each configuration in
//! turn, round by round, and what each profiler itself used.

use std::{
    ffi::OsStr,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    child::Owned,
    measure::{self, round, spread_json},
    stacks::{self, Stacks},
    tools::{Available, Kind, Outcome, Recording, Tool},
};
use crate::{
    demo::{Api, free_port},
    root, step,
};

/// The load: one endpoint of the baseline API that does a fixed amount of
/// synchronous work per request (a user's profile: fresh statements and
/// table scans in SQLite, then JSON), from a few connections on loopback.
pub const ENDPOINT: &str = "/api/users/42";
pub const CONNECTIONS: u32 = 8;
/// A load run stops after this long even if not all requests were sent.
const LOAD_MAX: Duration = Duration::from_secs(60);

pub struct Settings {
    pub rounds: usize,
    /// Requests per measured load run.
    pub requests: u64,
    /// Requests sent to a fresh server before any measurement, so that V8
    /// has compiled the hot code.
    pub warmup_requests: u64,
}

/// One column of the matrix.
#[derive(Clone, Copy)]
pub enum Config {
    NoProfiler,
    Tool(Tool),
    /// The server started with `node --cpu-prof`.
    CpuProf,
}

impl Config {
    pub fn key(&self) -> String {
        match self {
            Self::NoProfiler => "none".to_owned(),
            Self::Tool(tool) => tool.key(),
            Self::CpuProf => "cpu-prof".to_owned(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::NoProfiler => "no profiler".to_owned(),
            Self::Tool(tool) => tool.label(),
            Self::CpuProf => "`node --cpu-prof`".to_owned(),
        }
    }
}

/// The profiler configurations compared, in the order of the first round.
pub fn profiled_configs() -> Vec<Config> {
    vec![
        Config::Tool(Tool::new(Kind::Ours, 99)),
        Config::Tool(Tool::new(Kind::Ours, 999)),
        Config::Tool(Tool::new(Kind::OursNoLoop, 99)),
        Config::Tool(Tool::new(Kind::PerfFp, 99)),
        Config::Tool(Tool::new(Kind::PerfDwarf, 99)),
        Config::Tool(Tool::new(Kind::Bpftrace, 99)),
        Config::CpuProf,
    ]
}

/// What the load test measured.
struct Load {
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
    server_cpu_us_per_request: f64,
}

/// One configuration in one round.
struct Run {
    load: Load,
    outcome: Option<Outcome>,
    /// `--cpu-prof`: from SIGTERM to the profile written and drawn.
    cpu_prof_stop_ms: Option<f64>,
}

/// A run, or why it failed.
type Measured = Result<Run, String>;

/// One round: the configurations in turn, each between two runs without a
/// profiler (`runs[i]` came after `nones[i]` and before `nones[i + 1]`).
/// Each is compared with the mean of its two neighbours, so that the
/// machine's drift over the round, which is large here, cancels.
struct Round {
    nones: Vec<Measured>,
    runs: Vec<(usize, Measured)>,
}

pub fn run(settings: &Settings, available: &Available, out: &Path) -> anyhow::Result<Value> {
    let example = root().join("examples/dashboard-api");
    crate::setup::npm_packages(&example)?;
    let autocannon = example.join("node_modules/autocannon");
    let configs: Vec<Config> = profiled_configs()
        .into_iter()
        .filter(|config| match config {
            Config::Tool(tool) => available.has(*tool),
            _ => true,
        })
        .collect();

    let mut rounds = Vec::new();
    for round_index in 0..settings.rounds {
        step(&format!(
            "overhead round {} of {}: {} requests per run, a run without a profiler between \
             any two configurations",
            round_index + 1,
            settings.rounds,
            settings.requests
        ));
        let port = free_port()?;
        let mut api = Api::start(&example, "baseline", port, &[])?;
        load(
            &autocannon,
            port,
            settings.warmup_requests,
            api.pid,
            &out.join("warmup.json"),
        )?;
        let round_dir = out.join(format!("round{}", round_index + 1));
        let no_profiler = |position: usize| -> Measured {
            let result = load(
                &autocannon,
                port,
                settings.requests,
                api.pid,
                &round_dir.join(format!("none-{position}.json")),
            )
            .map(|load| Run {
                load,
                outcome: None,
                cpu_prof_stop_ms: None,
            });
            report(&Config::NoProfiler, &result);
            result.map_err(|err| format!("{err:#}"))
        };

        // Each round starts one configuration later, so that none always
        // runs first on a fresh server.
        let mut order: Vec<usize> = (0..configs.len()).collect();
        order.rotate_left(round_index % configs.len());
        let mut round = Round {
            nones: vec![no_profiler(0)],
            runs: Vec::new(),
        };
        for (position, index) in order.into_iter().enumerate() {
            let config = configs[index];
            let dir = round_dir.join(config.key());
            let result = match config {
                Config::NoProfiler => unreachable!("the runs without a profiler are apart"),
                Config::Tool(tool) => {
                    with_tool(tool, &autocannon, port, api.pid, settings.requests, &dir)
                }
                Config::CpuProf => with_cpu_prof(&example, &autocannon, settings, &dir),
            };
            report(&config, &result);
            round
                .runs
                .push((index, result.map_err(|err| format!("{err:#}"))));
            round.nones.push(no_profiler(position + 1));
        }
        api.stop();
        rounds.push(round);
    }

    Ok(summarize(settings, &configs, &rounds))
}

fn report(config: &Config, result: &anyhow::Result<Run>) {
    match result {
        Ok(run) => println!(
            "  {:<48} {:>6.1} req/s  p99 {:>6.1} ms  server {:>5.0} µs CPU/request{}",
            config.label(),
            run.load.requests_per_s,
            run.load.p99_ms,
            run.load.server_cpu_us_per_request,
            run.outcome
                .as_ref()
                .map(|o| format!(
                    "  profiler {:.2}% CPU, stop to flame graph {:.0} ms",
                    o.cpu_percent_while_sampling(),
                    o.stop_to_flame_graph_ms
                ))
                .unwrap_or_default()
        ),
        Err(err) => println!("  {:<48} failed: {err:#}", config.label()),
    }
}

fn with_tool(
    tool: Tool,
    autocannon: &Path,
    port: u16,
    server: u32,
    requests: u64,
    dir: &Path,
) -> anyhow::Result<Run> {
    let mut recording = Recording::start(tool, server, dir)?;
    recording.wait_ready()?;
    let load = load(autocannon, port, requests, server, &dir.join("load.json"))?;
    let outcome = recording.stop()?;
    Ok(Run {
        load,
        outcome: Some(outcome),
        cpu_prof_stop_ms: None,
    })
}

/// A fresh server started with `--cpu-prof`, warmed up, loaded, and
/// stopped; V8 writes the profile as node exits.
fn with_cpu_prof(
    example: &Path,
    autocannon: &Path,
    settings: &Settings,
    dir: &Path,
) -> anyhow::Result<Run> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let port = free_port()?;
    let args = [
        OsStr::new("--cpu-prof"),
        OsStr::new("--cpu-prof-dir"),
        dir.as_os_str(),
    ];
    // node with `--cpu-prof` and a perf map has been seen to hang before
    // it listens, once in several dozen starts: such a start is tried again.
    let mut api = match Api::start(example, "baseline", port, &args) {
        Ok(api) => api,
        Err(err) => {
            println!("  {err:#}; starting it again");
            let _ = fs::remove_dir_all(dir);
            fs::create_dir_all(dir)?;
            Api::start(example, "baseline", free_port()?, &args)?
        }
    };
    let port = api.port;
    load(
        autocannon,
        port,
        settings.warmup_requests,
        api.pid,
        &dir.join("warmup.json"),
    )?;
    let load = load(
        autocannon,
        port,
        settings.requests,
        api.pid,
        &dir.join("load.json"),
    )?;

    let stopped = Instant::now();
    api.stop();
    let profile_path = fs::read_dir(dir)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "cpuprofile"))
        .context("node wrote no .cpuprofile")?;
    let profile: Value = serde_json::from_str(&fs::read_to_string(&profile_path)?)?;
    let stacks = Stacks::from_cpu_profile(&profile, f64::NEG_INFINITY, f64::INFINITY)?;
    stacks::write_flame_graph(
        &stacks.to_folded("node"),
        "node --cpu-prof",
        &dir.join("flamegraph.svg"),
    )?;
    Ok(Run {
        load,
        outcome: None,
        cpu_prof_stop_ms: Some(stopped.elapsed().as_secs_f64() * 1e3),
    })
}

/// Sends `requests` requests to the API with autocannon (through
/// `load.js`, bounded in time too), and reads what it measured.
fn load(
    autocannon: &Path,
    port: u16,
    requests: u64,
    server: u32,
    report: &Path,
) -> anyhow::Result<Load> {
    if let Some(dir) = report.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut cmd = Command::new("node");
    cmd.arg(root().join("xtask/src/bench/load.js"))
        .arg(autocannon)
        .arg(format!("http://127.0.0.1:{port}{ENDPOINT}"))
        .arg(CONNECTIONS.to_string())
        .arg(requests.to_string())
        .arg(LOAD_MAX.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(fs::File::create(report)?)
        .stderr(Stdio::null());
    let cpu_before_s = measure::cpu_time_s(server)?;
    let mut driver = Owned::spawn("the load driver", &mut cmd)?;
    let exit = driver.wait(LOAD_MAX + Duration::from_secs(15))?;
    let cpu_s = measure::cpu_time_s(server)? - cpu_before_s;
    if !exit.status.success() {
        bail!("the load driver failed ({})", exit.status);
    }

    let report: Value = serde_json::from_str(&fs::read_to_string(report)?)
        .context("the load driver printed no JSON")?;
    let number = |value: &Value, what: &str| {
        value
            .as_f64()
            .with_context(|| format!("no {what} in the load report"))
    };
    if report["timed_out"] == true {
        bail!(
            "the load took longer than {} s; only {} responses came back",
            LOAD_MAX.as_secs(),
            report["responses"]
        );
    }
    let responses = number(&report["responses"], "responses")?;
    let failed = ["errors", "timeouts", "non2xx"]
        .iter()
        .map(|key| report[key].as_u64().unwrap_or(0))
        .sum();
    Ok(Load {
        requests: responses as u64,
        requests_per_s: number(&report["requests_per_s"], "requests_per_s")?,
        p50_ms: number(&report["latency_ms"]["p50"], "latency_ms.p50")?,
        p99_ms: number(&report["latency_ms"]["p99"], "latency_ms.p99")?,
        failed,
        server_cpu_us_per_request: cpu_s * 1e6 / responses.max(1.0),
    })
}

/// A load figure, such as requests per second.
type Figure = fn(&Load) -> f64;

/// Mean of a figure over the runs that succeeded.
fn mean_of(runs: &[&Measured], figure: Figure) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|run| run.as_ref().ok())
        .map(|run| figure(&run.load))
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Per configuration: each run's figures against its two neighbours
/// without a profiler, and the profiler's own figures, as medians with
/// their range over the rounds.
fn summarize(settings: &Settings, configs: &[Config], rounds: &[Round]) -> Value {
    // A configuration's runs with the ratio of a figure to its neighbours.
    let ratios = |index: usize, figure: Figure| -> Vec<f64> {
        rounds
            .iter()
            .flat_map(|round| {
                round
                    .runs
                    .iter()
                    .enumerate()
                    .filter(move |(_, (config, _))| *config == index)
                    .filter_map(move |(position, (_, run))| {
                        let run = run.as_ref().ok()?;
                        let around = [&round.nones[position], &round.nones[position + 1]];
                        Some(figure(&run.load) / mean_of(&around, figure)?)
                    })
            })
            .collect()
    };
    // The same for each run without a profiler between two others: how far
    // apart runs that should be alike are on this machine.
    let none_ratios = |figure: Figure| -> Vec<f64> {
        rounds
            .iter()
            .flat_map(|round| {
                (1..round.nones.len().saturating_sub(1)).filter_map(move |i| {
                    let run = round.nones[i].as_ref().ok()?;
                    let around = [&round.nones[i - 1], &round.nones[i + 1]];
                    Some(figure(&run.load) / mean_of(&around, figure)?)
                })
            })
            .collect()
    };
    let requests_per_s: Figure = |l| l.requests_per_s;
    let p99_ms: Figure = |l| l.p99_ms;
    let cpu_per_request: Figure = |l| l.server_cpu_us_per_request;

    let nones: Vec<&Run> = rounds
        .iter()
        .flat_map(|round| round.nones.iter().filter_map(|run| run.as_ref().ok()))
        .collect();
    let absolute = |runs: &[&Run], figure: Figure| -> Value {
        spread_json(&runs.iter().map(|run| figure(&run.load)).collect::<Vec<_>>())
    };
    let mut summary = vec![json!({
        "key": Config::NoProfiler.key(),
        "label": Config::NoProfiler.label(),
        "runs_measured": nones.len(),
        "errors": rounds.iter()
            .flat_map(|round| round.nones.iter().filter_map(|r| r.as_ref().err()))
            .collect::<Vec<_>>(),
        "throughput_ratio": spread_json(&none_ratios(requests_per_s)),
        "p99_latency_ratio": spread_json(&none_ratios(p99_ms)),
        "server_cpu_per_request_ratio": spread_json(&none_ratios(cpu_per_request)),
        "requests_per_s": absolute(&nones, requests_per_s),
        "p99_latency_ms": absolute(&nones, p99_ms),
        "server_cpu_us_per_request": absolute(&nones, cpu_per_request),
        "failed_requests": nones.iter().map(|run| run.load.failed).sum::<u64>(),
        "stop_to_flame_graph_ms": Value::Null,
        "profiler": Value::Null,
    })];

    for (index, config) in configs.iter().enumerate() {
        let runs: Vec<&Measured> = rounds
            .iter()
            .flat_map(|round| {
                round
                    .runs
                    .iter()
                    .filter(|(c, _)| *c == index)
                    .map(|(_, r)| r)
            })
            .collect();
        let ok: Vec<&Run> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
        let outcomes: Vec<&Outcome> = ok.iter().filter_map(|run| run.outcome.as_ref()).collect();
        let tool = |figure: fn(&Outcome) -> f64| -> Value {
            spread_json(&outcomes.iter().map(|o| figure(o)).collect::<Vec<_>>())
        };
        let stop_to_flame_graph: Vec<f64> = ok
            .iter()
            .filter_map(|run| {
                run.cpu_prof_stop_ms
                    .or(run.outcome.as_ref().map(|o| o.stop_to_flame_graph_ms))
            })
            .collect();
        // BPF programs run in the context of whatever they interrupt or
        // trace, mostly the server: their time against the server's CPU
        // time is the share of the server's CPU they took.
        let bpf_share_of_server: Vec<f64> = ok
            .iter()
            .filter_map(|run| {
                let outcome = run.outcome.as_ref()?;
                let bpf_cores = outcome.bpf_while_sampling_s? / outcome.sampling_s;
                let server_cores =
                    run.load.server_cpu_us_per_request * run.load.requests_per_s / 1e6;
                Some(100.0 * bpf_cores / server_cores)
            })
            .collect();
        summary.push(json!({
            "key": config.key(),
            "label": config.label(),
            "runs_measured": ok.len(),
            "errors": runs.iter().filter_map(|r| r.as_ref().err()).collect::<Vec<_>>(),
            "throughput_ratio": spread_json(&ratios(index, requests_per_s)),
            "p99_latency_ratio": spread_json(&ratios(index, p99_ms)),
            "server_cpu_per_request_ratio": spread_json(&ratios(index, cpu_per_request)),
            "requests_per_s": absolute(&ok, requests_per_s),
            "p99_latency_ms": absolute(&ok, p99_ms),
            "server_cpu_us_per_request": absolute(&ok, cpu_per_request),
            "failed_requests": ok.iter().map(|run| run.load.failed).sum::<u64>(),
            "stop_to_flame_graph_ms": spread_json(&stop_to_flame_graph),
            "profiler": if outcomes.is_empty() { Value::Null } else { json!({
                "cpu_percent_of_one_core_while_sampling":
                    tool(Outcome::cpu_percent_while_sampling),
                "process_cpu_percent_while_sampling":
                    tool(|o| 100.0 * o.cpu_while_sampling_s / o.sampling_s),
                "bpf_cpu_percent_while_sampling":
                    tool(|o| 100.0 * o.bpf_while_sampling_s.unwrap_or(f64::NAN) / o.sampling_s),
                "bpf_ns_per_sample": tool(|o| o.bpf_ns_per_sample.unwrap_or(f64::NAN)),
                "bpf_share_of_server_cpu_percent": spread_json(&bpf_share_of_server),
                "cpu_to_flame_graph_s": tool(|o| {
                    o.cpu_total_s + o.bpf_while_sampling_s.unwrap_or(0.0) + o.post_cpu_s
                }),
                "process_cpu_s": tool(|o| o.cpu_total_s),
                "post_processing_cpu_s": tool(|o| o.post_cpu_s),
                "peak_rss_mib": tool(|o| o.peak_rss_mib),
                "post_processing_peak_rss_mib":
                    tool(|o| o.post_peak_rss_mib.unwrap_or(f64::NAN)),
                "startup_ms": tool(|o| o.startup_ms),
                "sampling_s": tool(|o| o.sampling_s),
                "stop_to_exit_ms": tool(|o| o.stop_to_exit_ms),
                "samples": tool(|o| o.samples as f64),
            })},
        }));
    }

    let run_json = |key: String, round_index: usize, run: &Measured| -> Value {
        let mut value = match run {
            Ok(run) => json!({
                "requests": run.load.requests,
                "requests_per_s": round(run.load.requests_per_s, 2),
                "p50_latency_ms": round(run.load.p50_ms, 2),
                "p99_latency_ms": round(run.load.p99_ms, 2),
                "failed_requests": run.load.failed,
                "server_cpu_us_per_request": round(run.load.server_cpu_us_per_request, 1),
                "profiler": run.outcome.as_ref().map(Outcome::to_json),
                "cpu_prof_stop_to_flame_graph_ms": run.cpu_prof_stop_ms.map(|ms| round(ms, 1)),
            }),
            Err(err) => json!({ "error": err }),
        };
        value["config"] = json!(key);
        value["round"] = json!(round_index + 1);
        value
    };
    let mut runs = Vec::new();
    for (round_index, round) in rounds.iter().enumerate() {
        for (position, none) in round.nones.iter().enumerate() {
            runs.push(run_json(Config::NoProfiler.key(), round_index, none));
            if let Some((index, run)) = round.runs.get(position) {
                runs.push(run_json(configs[*index].key(), round_index, run));
            }
        }
    }

    // How far a run without a profiler strays from its neighbours, typically
    // and at most: ratios closer to 1 than this are below the noise.
    let noise = |figure: Figure| -> Value {
        let strays: Vec<f64> = none_ratios(figure)
            .iter()
            .map(|r| (r - 1.0).abs())
            .collect();
        json!({
            "typical": round(measure::median(&strays), 4),
            "max": round(strays.iter().copied().fold(0.0, f64::max), 4),
        })
    };
    json!({
        "workload": {
            "server": "examples/dashboard-api, VARIANT=baseline, node --perf-basic-prof-only-functions \
                       --interpreted-frames-native-stack",
            "endpoint": ENDPOINT,
            "connections": CONNECTIONS,
            "requests_per_run": settings.requests,
            "warmup_requests": settings.warmup_requests,
            "load_time_bound_s": LOAD_MAX.as_secs(),
            "rounds": settings.rounds,
        },
        "no_profiler_spread": {
            "throughput": noise(requests_per_s),
            "p99_latency": noise(p99_ms),
            "server_cpu_per_request": noise(cpu_per_request),
        },
        "configs": summary,
        "runs": runs,
    })
}
