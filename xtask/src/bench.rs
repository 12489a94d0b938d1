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
            .arg(root.join("tests/fixtures/hot.js")),
    )?;
    let spinner = root.join("target/fixtures/bench-spin");
    compile_spinner(&spinner)?;
    for _ in 1..cores {
        workload.spawn(&mut Command::new(&spinner))?;
    }
    thread::sleep(Duration::from_secs(2));

    let stats_restore = BpfStats::enable()?;

    step(&format!(
        "profiling the node target for {duration_s} s at {frequency_hz} Hz"
    ));
    let started = Instant::now();
    let mut child = Command::new(&profiler)
        .args(["attach", "--quiet", "-p", &target.to_string()])
        .args([
            "-d",
            &duration_s.to_string(),
            "-F",
            &frequency_hz.to_string(),
        ])
        .arg("-o")
        .arg(out_dir.join("attach-profile"))
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
    let wall_s = started.elapsed().as_secs_f64();
    drop(stats_restore);
    drop(workload);

    let summary: serde_json::Value = serde_json::from_str(&fs::read_to_string(
        out_dir.join("attach-profile/summary.json"),
    )?)?;
    let sampling_cpu_percent = 100.0 * (cpu_b - cpu_a) / window.as_secs_f64();
    let (bpf_ns, bpf_runs) = match (bpf_a, bpf_b) {
        (Some(a), Some(b)) => (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)),
        _ => (0, 0),
    };
    let bpf_cpu_percent = 100.0 * bpf_ns as f64 / 1e9 / window.as_secs_f64();
    let bpf_ns_per_run = bpf_ns.checked_div(bpf_runs).unwrap_or(0);

    let figures = serde_json::json!({
        "cores": cores,
        "frequency_hz": frequency_hz,
        "duration_s": duration_s,
        "samples": summary["samples"],
        "profiler_cpu_percent_of_one_core_while_sampling": round2(sampling_cpu_percent),
        "ebpf_program_cpu_percent_of_one_core": round2(bpf_cpu_percent),
        "ebpf_program_ns_per_run": bpf_ns_per_run,
        "profiler_total_cpu_s": round2(usage.cpu_s),
        "profiler_peak_rss_mib": round2(usage.max_rss_kib as f64 / 1024.0),
        "stop_to_flame_graph_ms": summary["timings_ms"]["stop_to_output"],
        "timings_ms": summary["timings_ms"],
        "wall_s": round2(wall_s),
    });
    let path = out_dir.join("attach.json");
    fs::write(&path, serde_json::to_string_pretty(&figures)? + "\n")?;

    println!("\nprofiler attached to a busy node target, {cores} busy cores:");
    println!("  samples                          {}", summary["samples"]);
    println!("  profiler CPU while sampling      {sampling_cpu_percent:.2}% of one core");
    println!(
        "  eBPF program CPU                 {bpf_cpu_percent:.3}% of one core ({bpf_ns_per_run} ns per run)"
    );
    println!(
        "  profiler peak RSS                {:.1} MiB",
        usage.max_rss_kib as f64 / 1024.0
    );
    println!(
        "  stop to flame graph              {} ms",
        summary["timings_ms"]["stop_to_output"]
    );
    println!("  profiler total CPU               {:.2} s", usage.cpu_s);
    println!("figures saved to {}", path.display());
    Ok(())
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
            .stdout(Stdio::null())
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

/// (run_time_ns, run_cnt) summed over the BPF programs the process holds.
fn bpf_prog_stats(pid: u32) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    let mut found = false;
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
        for line in info.lines() {
            let mut parts = line.split(':');
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let value: u64 = value.trim().parse().unwrap_or(0);
            match key.trim() {
                "run_time_ns" => total.0 += value,
                "run_cnt" => total.1 += value,
                _ => {}
            }
        }
        found = true;
    }
    found.then_some(total)
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
