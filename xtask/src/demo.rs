//! `cargo xtask demo`: the worked investigation of the example dashboard
//! API, end to end. It profiles the baseline under load, then the fixed
//! variant under the same load, and writes both flame graphs, a
//! differential flame graph, both load-test results and a before/after
//! report to `target/demo/`.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::RecvTimeoutError,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{root, step};

/// How long the API may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The load every variant gets: loopback only, bounded in time.
const CONNECTIONS: u32 = 200;
const WARMUP_S: u32 = 5;
const DURATION_S: u32 = 15;

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let root = root();
    let example = root.join("examples/dashboard-api");
    crate::setup::npm_packages(&example)?;
    let out = root.join("target/demo");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;

    let mut runs = Vec::new();
    for variant in ["baseline", "fixed"] {
        runs.push(profile_variant(&root, &example, &out, variant)?);
    }

    step("differential flame graph, baseline to fixed");
    crate::run(
        Command::new(root.join("target/release/profiler"))
            .arg("diff")
            .arg(out.join("baseline"))
            .arg(out.join("fixed"))
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null()),
    )?;

    let report = report(&runs[0], &runs[1])?;
    let report_path = out.join("report.md");
    fs::write(&report_path, report)?;

    println!(
        "\ndemo finished in {:.0} s; everything is in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for path in [
        "baseline/flamegraph.svg",
        "baseline/blocking.svg",
        "fixed/flamegraph.svg",
        "diff.svg",
        "diff.md",
        "baseline/loadtest.json",
        "fixed/loadtest.json",
        "report.md",
    ] {
        if out.join(path).exists() {
            println!("  {}", out.join(path).display());
        }
    }
    println!();
    print!(
        "{}",
        fs::read_to_string(&report_path)?
            .lines()
            .take(24)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!();
    Ok(())
}

/// What one variant's run left.
struct Run {
    variant: String,
    dir: PathBuf,
    summary: Value,
    load: Value,
}

fn profile_variant(root: &Path, example: &Path, out: &Path, variant: &str) -> anyhow::Result<Run> {
    step(&format!("starting the {variant} API"));
    let port = free_port()?;
    let mut api = Api::start(example, variant, port, &[])?;
    let dir = out.join(variant);

    step(&format!(
        "profiling the {variant} API while a load test runs \
         ({CONNECTIONS} connections, {WARMUP_S} s warm-up + {DURATION_S} s)"
    ));
    let load_json = dir.join("loadtest.json");
    let status = Command::new(root.join("target/release/profiler"))
        .args(["attach", "--pid", &api.pid.to_string(), "-o"])
        .arg(&dir)
        .arg("--")
        .arg("node")
        .arg(example.join("loadtest.js"))
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--connections", &CONNECTIONS.to_string()])
        .args(["--warmup", &WARMUP_S.to_string()])
        .args(["--duration", &DURATION_S.to_string()])
        .args(["--pid", &api.pid.to_string()])
        .arg("--out")
        .arg(&load_json)
        .status()
        .context("cannot run the profiler")?;
    if !status.success() {
        bail!("profiling the {variant} API failed ({status})");
    }
    api.stop();

    let read = |path: &Path| -> anyhow::Result<Value> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    Ok(Run {
        variant: variant.to_owned(),
        summary: read(&dir.join("summary.json"))?,
        load: read(&load_json)?,
        dir,
    })
}

/// The example API, stopped on drop.
pub struct Api {
    child: Child,
    pub pid: u32,
    pub port: u16,
}

impl Api {
    /// Starts the API and waits until it listens; `node_args` go to node
    /// before the script.
    pub fn start(
        example: &Path,
        variant: &str,
        port: u16,
        node_args: &[&OsStr],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new("node")
            .args([
                "--perf-basic-prof-only-functions",
                "--interpreted-frames-native-stack",
            ])
            .args(node_args)
            .arg("server.js")
            .current_dir(example)
            .env("PORT", port.to_string())
            .env("VARIANT", variant)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start node")?;
        let pid = child.id();
        crate::bench::cleanup::track(pid);
        let stdout = child.stdout.take().context("no stdout")?;
        // Owned from here, so that a failed start stops it too.
        let api = Self { child, pid, port };
        // Its output is read on a thread, so that a server that hangs
        // before it listens cannot hang the caller; the thread then keeps
        // draining it, so that it never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                let listening = line.starts_with("listening on");
                if tx.send(line).is_err() || listening {
                    break;
                }
            }
            lines.for_each(drop);
        });
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("listening on") => {
                    println!("  {line}");
                    return Ok(api);
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "the {variant} API did not start within {} s",
                    START_LIMIT.as_secs()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the {variant} API exited before listening")
                }
            }
        }
    }

    /// SIGTERM, which the API answers by closing and exiting; killed if
    /// it has not exited after 5 s.
    pub fn stop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // unreaped child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                crate::bench::cleanup::untrack(self.pid);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::bench::cleanup::untrack(self.pid);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

/// `report.md`: the before/after table, hot JS functions and loop stalls.
fn report(before: &Run, after: &Run) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "# Dashboard API: baseline vs fixed\n")?;
    writeln!(
        md,
        "Load: {CONNECTIONS} connections on loopback, {WARMUP_S} s warm-up then {DURATION_S} s \
         measured, the same request mix for both. Figures from one run of `cargo xtask demo`; \
         they are noisy, so compare the ratios.\n"
    )?;
    writeln!(md, "| figure | baseline | fixed | fixed / baseline |")?;
    writeln!(md, "| --- | ---: | ---: | ---: |")?;
    let rows: [(&str, &[&str]); 10] = [
        ("requests/s", &["totals", "requestsPerSecond"]),
        ("p50 latency (ms)", &["totals", "latencyMs", "p50"]),
        ("p95 latency (ms)", &["totals", "latencyMs", "p95"]),
        ("p99 latency (ms)", &["totals", "latencyMs", "p99"]),
        ("errors", &["totals", "errors"]),
        ("timeouts", &["totals", "timeouts"]),
        ("non-2xx responses", &["totals", "non2xx"]),
        (
            "API CPU, mean % of one core",
            &["process", "cpuPercent", "avg"],
        ),
        ("API RSS, mean MiB", &["process", "rssMiB", "avg"]),
        ("API RSS, max MiB", &["process", "rssMiB", "max"]),
    ];
    for (label, path) in rows {
        let get = |run: &Run| path.iter().fold(&run.load, |v, key| &v[*key]).clone();
        let (b, a) = (num(&get(before)), num(&get(after)));
        let ratio = if b.abs() > f64::EPSILON {
            format!("{:.2}×", a / b)
        } else {
            "–".to_owned()
        };
        writeln!(md, "| {label} | {} | {} | {ratio} |", fmt(b), fmt(a))?;
    }
    let loop_row = |label: &str, key: &str, md: &mut String| -> anyhow::Result<()> {
        let b = num(&before.summary["event_loop"]["main_thread"][key]);
        let a = num(&after.summary["event_loop"]["main_thread"][key]);
        let ratio = if b.abs() > f64::EPSILON {
            format!("{:.2}×", a / b)
        } else {
            "–".to_owned()
        };
        writeln!(md, "| {label} | {} | {} | {ratio} |", fmt(b), fmt(a))?;
        Ok(())
    };
    let (b, a) = (
        num(&before.summary["main_thread_percent"]),
        num(&after.summary["main_thread_percent"]),
    );
    writeln!(
        md,
        "| CPU samples on the main thread | {b:.0}% | {a:.0}% | {:.2}× |",
        a / b
    )?;
    loop_row("main event loop: iteration p50 (ms)", "p50_ms", &mut md)?;
    loop_row("main event loop: iteration p99 (ms)", "p99_ms", &mut md)?;
    loop_row("main event loop: longest iteration (ms)", "max_ms", &mut md)?;
    loop_row(
        "main event loop: stalls of 50 ms or more",
        "episode_count",
        &mut md,
    )?;

    for run in [before, after] {
        writeln!(
            md,
            "\n## {}: where the main thread's CPU went\n",
            run.variant
        )?;
        writeln!(
            md,
            "Hottest JavaScript functions (the innermost JS frame of each sample):\n"
        )?;
        writeln!(md, "| JS function | samples | share of all samples |")?;
        writeln!(md, "| --- | ---: | ---: |")?;
        for row in run.summary["top_js"]
            .as_array()
            .into_iter()
            .flatten()
            .take(8)
        {
            writeln!(
                md,
                "| `{}` | {} | {:.1}% |",
                row["frame"].as_str().unwrap_or("?").replace('|', "\\|"),
                row["samples"],
                num(&row["percent"])
            )?;
        }
        let episodes: Vec<Value> = fs::read_to_string(run.dir.join("episodes.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        let episodes: Vec<&Value> = episodes
            .iter()
            .filter(|e| e["main_thread"] == true)
            .collect();
        if !episodes.is_empty() {
            writeln!(md, "\nLongest stalls of the main event loop:\n")?;
            writeln!(md, "| duration (ms) | at (s) | running JS function |")?;
            writeln!(md, "| ---: | ---: | --- |")?;
            for episode in episodes.iter().take(5) {
                let culprit = episode["top_js"][0]["frame"]
                    .as_str()
                    .or(episode["top_self"][0]["frame"].as_str())
                    .unwrap_or("no samples");
                writeln!(
                    md,
                    "| {:.1} | {:.2} | `{}` |",
                    num(&episode["duration_ms"]),
                    num(&episode["start_s"]),
                    culprit.replace('|', "\\|")
                )?;
            }
        }
    }
    writeln!(
        md,
        "\nFlame graphs: `baseline/flamegraph.svg`, `baseline/blocking.svg` (only the \
         stalls), `fixed/flamegraph.svg`, and `diff.svg` (baseline to fixed)."
    )?;
    Ok(md)
}

fn fmt(value: f64) -> String {
    if value.is_nan() {
        "–".to_owned()
    } else if value.abs() >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}
