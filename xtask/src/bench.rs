//! `cargo xtask bench`: the profiler's own cost while attached to a busy
//! target, printed as figures and saved as JSON.
//!
//! The machine is made busy on every core: a node process running a hot JS
//! function (the target) and one spinning native process per other core.
//! The profiler samples the target for a fixed time; meanwhile its CPU time
//! is read from /proc, and the eBPF program's own run time from the kernel's
//! BPF statistics, which are switched on for the run and put back after.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{root, step};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub fn run(duration_s: u64, frequency_hz: u64) -> anyhow::Result<()> {
    attach_cost(duration_s, frequency_hz)?;
    syscall_cost(frequency_hz)?;
    event_loop_overhead(frequency_hz)
}

/// Calls per syscall measurement, and rounds.
const SPIN_CALLS: u64 = 1_000_000;
const SPIN_ROUNDS: usize = 5;

/// What event-loop tracking adds to one syscall: an epoll wait (once per
/// loop iteration, in the target) and any other syscall (on the whole
/// host, since the syscall tracepoints are global). Bare and tracked runs
/// alternate; medians are reported.
fn syscall_cost(frequency_hz: u64) -> anyhow::Result<()> {
    let root = root();
    let profiler = root.join("target/release/profiler");
    let spin = root.join("target/fixtures/syscall_spin");
    crate::run(
        Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&spin)
            .arg(root.join("tests/fixtures/syscall_spin.c")),
    )?;
    step("measuring what event-loop tracking adds to a syscall");
    let calls = SPIN_CALLS.to_string();
    let mut figures = serde_json::Map::new();
    for mode in ["epoll", "getppid"] {
        let (mut bare, mut tracked) = (Vec::new(), Vec::new());
        for _ in 0..SPIN_ROUNDS {
            let out = Command::new(&spin).args([mode, &calls]).output()?;
            bare.push(String::from_utf8(out.stdout)?.trim().parse::<f64>()?);
            // The spinner waits a second so that the probes are in place.
            let out = Command::new(&profiler)
                .args(["attach", "--quiet", "-F", &frequency_hz.to_string(), "-o"])
                .arg(root.join("target/bench/spin-profile"))
                .arg("--")
                .arg(&spin)
                .args([mode, &calls, "1000"])
                .stderr(Stdio::null())
                .output()?;
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
            serde_json::json!({
                "bare_ns": spread(&bare),
                "tracked_ns": spread(&tracked),
                "added_ns": round2(tracked_ns - bare_ns),
            }),
        );
    }
    let path = root.join("target/bench/syscall-cost.json");
    fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;
    println!("figures saved to {}", path.display());
    Ok(())
}

fn attach_cost(duration_s: u64, frequency_hz: u64) -> anyhow::Result<()> {
    if duration_s < 10 {
        bail!("the benchmark needs at least 10 s of sampling");
    }
    let root = root();
    let profiler = root.join("target/release/profiler");
    let out_dir = root.join("target/bench");
    fs::create_dir_all(&out_dir)?;

    step("starting a busy workload on every core");
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    let mut workload = Workload::default();
    let target = workload.spawn(
        Command::new("node")
            .arg("--perf-basic-prof-only-functions")
            .arg("--interpreted-frames-native-stack")
            .arg(root.join("tests/fixtures/crypto-loop.js"))
            .stdout(Stdio::null()),
    )?;
    let spinner = root.join("target/fixtures/bench-spin");
    compile_spinner(&spinner)?;
    for _ in 1..cores {
        workload.spawn(Command::new(&spinner).stdout(Stdio::null()))?;
    }
    thread::sleep(Duration::from_secs(2));

    let stats_restore = BpfStats::enable()?;
    let mut runs = Vec::new();
    for (name, flags) in [
        ("mixed unwinding (default)", &[][..]),
        ("frame pointers only", &["--unwind-rows", "0"][..]),
    ] {
        step(&format!(
            "profiling the node target for {duration_s} s at {frequency_hz} Hz, {name}"
        ));
        runs.push((
            name,
            attach_once(&profiler, &out_dir, target, duration_s, frequency_hz, flags)?,
        ));
    }
    drop(stats_restore);
    drop(workload);

    let figures = serde_json::json!({
        "cores": cores,
        "frequency_hz": frequency_hz,
        "duration_s": duration_s,
        "target": "node running tests/fixtures/crypto-loop.js (PBKDF2, JSON, recursion)",
        "runs": runs.iter().map(|(name, run)| {
            let mut run = run.clone();
            run["config"] = serde_json::json!(name);
            run
        }).collect::<Vec<_>>(),
    });
    let path = out_dir.join("attach.json");
    fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;

    println!("\nprofiler attached to a busy node target, {cores} busy cores, {frequency_hz} Hz:");
    for (name, run) in &runs {
        println!("  {name}:");
        println!("    samples                        {}", run["samples"]);
        println!(
            "    complete user stacks           {}%",
            run["complete_percent"]
        );
        println!(
            "    profiler CPU while sampling    {}% of one core",
            run["profiler_cpu_percent_of_one_core_while_sampling"]
        );
        println!(
            "    sampling program CPU           {}% of one core ({} ns per sample)",
            run["sampling_program_cpu_percent_of_one_core"], run["sampling_program_ns_per_run"]
        );
        println!(
            "    loop-tracking programs CPU     {}% of one core (host-wide syscalls)",
            run["loop_programs_cpu_percent_of_one_core"]
        );
        println!(
            "    profiler peak RSS              {} MiB",
            run["profiler_peak_rss_mib"]
        );
        println!(
            "    load (incl. unwind tables)     {} ms",
            run["timings_ms"]["load"]
        );
        println!(
            "    stop to flame graph            {} ms",
            run["stop_to_flame_graph_ms"]
        );
    }
    println!("figures saved to {}", path.display());
    Ok(())
}

/// One profiler run against the target; its cost while sampling.
fn attach_once(
    profiler: &Path,
    out_dir: &Path,
    target: u32,
    duration_s: u64,
    frequency_hz: u64,
    flags: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let profile_dir = out_dir.join("attach-profile");
    let mut child = Command::new(profiler)
        .args(["attach", "--quiet", "-p", &target.to_string()])
        .args([
            "-d",
            &duration_s.to_string(),
            "-F",
            &frequency_hz.to_string(),
        ])
        .args(flags)
        .arg("-o")
        .arg(&profile_dir)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the profiler; run `cargo xtask build` first")?;
    let pid = child.id();

    // CPU used while sampling only: from 3 s in to 3 s before the end,
    // leaving out loading and symbolizing.
    thread::sleep(Duration::from_secs(3));
    let cpu_a = cpu_time_s(pid)?;
    let bpf_a = bpf_prog_stats(pid);
    let window = Duration::from_secs(duration_s - 6);
    thread::sleep(window);
    let cpu_b = cpu_time_s(pid)?;
    let bpf_b = bpf_prog_stats(pid);
    let usage = wait_with_rusage(&mut child)?;

    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(profile_dir.join("summary.json"))?)?;
    let window_s = window.as_secs_f64();
    let delta = |kind: &str| -> (u64, u64) {
        let get = |stats: &Option<BpfProgStats>| {
            stats
                .as_ref()
                .and_then(|s| s.get(kind).copied())
                .unwrap_or((0, 0))
        };
        let (a, b) = (get(&bpf_a), get(&bpf_b));
        (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))
    };
    let (sample_ns, sample_runs) = delta(PERF_EVENT_PROG);
    let (loop_ns, _) = delta(RAW_TRACEPOINT_PROG);
    Ok(serde_json::json!({
        "samples": summary["samples"],
        "complete_percent": summary["stacks"]["complete_percent"],
        "profiler_cpu_percent_of_one_core_while_sampling":
            round2(100.0 * (cpu_b - cpu_a) / window_s),
        "sampling_program_cpu_percent_of_one_core": round2(100.0 * sample_ns as f64 / 1e9 / window_s),
        "sampling_program_ns_per_run": sample_ns.checked_div(sample_runs).unwrap_or(0),
        "loop_programs_cpu_percent_of_one_core": round2(100.0 * loop_ns as f64 / 1e9 / window_s),
        "profiler_total_cpu_s": round2(usage.cpu_s),
        "profiler_peak_rss_mib": round2(usage.max_rss_kib as f64 / 1024.0),
        "stop_to_flame_graph_ms": summary["timings_ms"]["stop_to_output"],
        "timings_ms": summary["timings_ms"],
    }))
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Processes of the synthetic workload, killed on drop.
#[derive(Default)]
struct Workload(Vec<Child>);

impl Workload {
    fn spawn(&mut self, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let pid = child.id();
        self.0.push(child);
        Ok(pid)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn compile_spinner(bin: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(bin.parent().unwrap_or(Path::new(".")))?;
    let src = bin.with_extension("c");
    fs::write(
        &src,
        "int main(void) { for (volatile unsigned long i = 0;; i++) ; }\n",
    )?;
    crate::run(Command::new("gcc").arg("-O1").arg("-o").arg(bin).arg(&src))
}

/// Turns the kernel's BPF run-time statistics on, and back off on drop if
/// they were off.
struct BpfStats {
    was: Option<String>,
}

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let was = fs::read_to_string(BPF_STATS).ok();
        if was.as_deref().map(str::trim) != Some("1") {
            fs::write(BPF_STATS, "1").context("cannot enable kernel.bpf_stats_enabled")?;
        }
        Ok(Self { was })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(was) = &self.was {
            let _ = fs::write(BPF_STATS, was.trim());
        }
    }
}

fn cpu_time_s(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("bad stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// BPF program types as fdinfo shows them.
const PERF_EVENT_PROG: &str = "7";
const RAW_TRACEPOINT_PROG: &str = "17";

/// (run_time_ns, run_cnt) per program type, over the programs a process
/// holds.
type BpfProgStats = std::collections::HashMap<String, (u64, u64)>;

fn bpf_prog_stats(pid: u32) -> Option<BpfProgStats> {
    let mut stats = BpfProgStats::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(link) = fs::read_link(fd.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .ok()?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        let kind = field("prog_type").unwrap_or_default();
        let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let entry = stats.entry(kind).or_default();
        entry.0 += number("run_time_ns");
        entry.1 += number("run_cnt");
    }
    Some(stats)
}

struct Usage {
    cpu_s: f64,
    max_rss_kib: i64,
}

fn wait_with_rusage(child: &mut Child) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes only into the two out-pointers, which are valid
    // for the duration of the call; the pid is our unreaped child.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("wait4 on the profiler");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("the profiler failed (wait status {status})");
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Ok(Usage {
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
    })
}

/// Rounds of the event-loop overhead measurement, and requests per run.
const LOOP_ROUNDS: usize = 5;
const LOOP_REQUESTS: u64 = 60_000;
/// Upper bound on one load run.
const LOOP_LOAD_MAX_S: u64 = 30;

/// The cost of a node HTTP server under load, with no profiler, with the
/// profiler without event-loop tracking, and with it: the server's CPU time
/// per request, and its throughput. The uprobes' cost is charged to the
/// server's CPU time, which varies far less than throughput on a shared
/// machine. The configurations are interleaved round by round so that drift
/// hits them alike; the median of the rounds is reported.
fn event_loop_overhead(frequency_hz: u64) -> anyhow::Result<()> {
    let root = root();
    let example = root.join("examples/dashboard-api");
    crate::setup::npm_packages(&example)?;
    let autocannon = example.join("node_modules/autocannon/autocannon.js");
    let profiler = root.join("target/release/profiler");

    step("measuring event-loop tracking overhead on an HTTP server under load");
    let mut workload = Workload::default();
    let log = root.join("target/bench/loop-server.log");
    let server = workload.spawn(
        Command::new("node")
            .arg(root.join("tests/fixtures/blocking-server.js"))
            .args(["0", "0"])
            .stdout(fs::File::create(&log)?),
    )?;
    let port = wait_for_port(&log)?;

    let configs: [(&str, Option<&[&str]>); 3] = [
        ("no profiler", None),
        ("profiler, event loop off", Some(&["--no-event-loop"])),
        ("profiler, event loop on", Some(&[])),
    ];
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configs.len()];
    // A warm-up so that V8 has optimized the server.
    load(&autocannon, port, LOOP_REQUESTS / 4)?;
    for round in 0..LOOP_ROUNDS {
        for (i, (name, flags)) in configs.iter().enumerate() {
            let mut attached = match flags {
                Some(flags) => Some(
                    Command::new(&profiler)
                        .args(["attach", "--quiet", "-p", &server.to_string()])
                        .args(["-F", &frequency_hz.to_string()])
                        .args(["-d", &(LOOP_LOAD_MAX_S + 5).to_string()])
                        .arg("-o")
                        .arg(root.join("target/bench/loop-profile"))
                        .args(*flags)
                        .stdout(Stdio::null())
                        .spawn()?,
                ),
                None => None,
            };
            thread::sleep(Duration::from_millis(700));
            let cpu_before = cpu_time_s(server)?;
            let rps = load(&autocannon, port, LOOP_REQUESTS)?;
            let cpu_us = (cpu_time_s(server)? - cpu_before) * 1e6 / LOOP_REQUESTS as f64;
            if let Some(child) = attached.as_mut() {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // is our unreaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let status = child.wait()?;
                if !status.success() {
                    bail!("the profiler failed during the load ({status})");
                }
            }
            println!(
                "  round {}: {name:<26} {cpu_us:>6.1} µs CPU/request {rps:>9.0} req/s",
                round + 1
            );
            results[i].push((cpu_us, rps));
        }
    }
    drop(workload);

    let summary: Vec<serde_json::Value> = configs
        .iter()
        .zip(&results)
        .map(|((name, _), runs)| {
            let cpu: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let rps: Vec<f64> = runs.iter().map(|r| r.1).collect();
            serde_json::json!({
                "config": name,
                "cpu_us_per_request": spread(&cpu),
                "requests_per_s": spread(&rps),
            })
        })
        .collect();
    let cpu = |i: usize| median(&results[i].iter().map(|r| r.0).collect::<Vec<_>>());
    let rps = |i: usize| median(&results[i].iter().map(|r| r.1).collect::<Vec<_>>());
    let (none, off, on) = (cpu(0), cpu(1), cpu(2));
    let tracking_cost_percent = 100.0 * (on - off) / off;
    let throughput_loss_percent = 100.0 * (rps(1) - rps(2)) / rps(1);
    let figures = serde_json::json!({
        "rounds": LOOP_ROUNDS,
        "requests_per_run": LOOP_REQUESTS,
        "frequency_hz": frequency_hz,
        "configs": summary,
        "event_loop_tracking_cpu_cost_percent": round2(tracking_cost_percent),
        "event_loop_tracking_throughput_loss_percent": round2(throughput_loss_percent),
        "profiler_with_tracking_vs_none_cpu_percent": round2(100.0 * (on - none) / none),
    });
    let path = root.join("target/bench/event-loop.json");
    fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;
    println!("\nevent-loop tracking, HTTP server under load (medians of {LOOP_ROUNDS} rounds):");
    println!(
        "  no profiler          {none:>6.1} µs CPU/request {:>9.0} req/s",
        rps(0)
    );
    println!(
        "  profiler, loop off   {off:>6.1} µs CPU/request {:>9.0} req/s",
        rps(1)
    );
    println!(
        "  profiler, loop on    {on:>6.1} µs CPU/request {:>9.0} req/s",
        rps(2)
    );
    println!("  server CPU added by loop tracking: {tracking_cost_percent:.2}%");
    println!("  throughput lost to loop tracking:  {throughput_loss_percent:.2}% (noisy)");
    println!("figures saved to {}", path.display());
    Ok(())
}

/// Median with min and max.
fn spread(values: &[f64]) -> serde_json::Value {
    serde_json::json!({
        "median": round2(median(values)),
        "min": round2(values.iter().copied().fold(f64::INFINITY, f64::min)),
        "max": round2(values.iter().copied().fold(0.0, f64::max)),
    })
}

/// Sends `requests` requests with autocannon to the loopback port, bounded
/// in time too, and returns requests/s.
fn load(autocannon: &Path, port: u16, requests: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = Command::new("node")
        .arg(autocannon)
        .args(["-c", "32", "-a", &requests.to_string()])
        .args(["-d", &LOOP_LOAD_MAX_S.to_string(), "-j"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stderr(Stdio::null())
        .output()
        .context("cannot run autocannon")?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("autocannon printed no JSON")?;
    let total = report["requests"]["total"]
        .as_f64()
        .context("no requests.total in autocannon's report")?;
    // autocannon's own duration is rounded to seconds; the wall clock,
    // start-up included, is the same for every configuration.
    Ok(total / started.elapsed().as_secs_f64())
}

fn wait_for_port(log: &Path) -> anyhow::Result<u16> {
    for _ in 0..100 {
        if let Some(port) = fs::read_to_string(log)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
        {
            return Ok(port);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("the benchmark server did not start")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
