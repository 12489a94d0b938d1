//! What the bench reads about processes while they run (CPU time, the
//! run time of the BPF programs they hold, whether they sample yet), the
//! kernel's BPF statistics switch, and medians with their spread.

use std::{collections::HashMap, fs};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::cleanup;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// CPU time of a process, all its threads, to the nanosecond: the run time
/// the scheduler counts for each thread (`/proc/PID/task/TID/schedstat`),
/// which, unlike `/proc/PID/stat`, is not rounded to 10 ms ticks.
pub fn cpu_time_s(pid: u32) -> anyhow::Result<f64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the threads of pid {pid}"))?;
    let mut run_ns: u64 = 0;
    for task in tasks.flatten() {
        // A thread may exit between the listing and the read.
        let Ok(stat) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        run_ns += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(run_ns as f64 / 1e9)
}

/// CLOCK_MONOTONIC in microseconds, the clock V8's CPU profile uses for
/// its sample times.
pub fn monotonic_us() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `now`, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 * 1e6 + now.tv_nsec as f64 / 1e3
}

/// CPU time of the calling thread, for work the bench does itself
/// (collapsing stacks, drawing flame graphs).
pub fn thread_cpu_s() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `now`, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// BPF program types as fdinfo shows them.
pub const PERF_EVENT_PROG: &str = "7";

/// Run time and run count of the BPF programs a process holds, by program
/// type, from fdinfo (counted while kernel.bpf_stats_enabled is 1).
#[derive(Clone, Default)]
pub struct BpfRuns(HashMap<String, (u64, u64)>);

impl BpfRuns {
    pub fn read(pid: u32) -> Self {
        let mut runs = HashMap::<String, (u64, u64)>::new();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return Self(runs);
        };
        for fd in fds.flatten() {
            let is_prog = fs::read_link(fd.path())
                .is_ok_and(|link| link.to_string_lossy() == "anon_inode:bpf-prog");
            if !is_prog {
                continue;
            }
            let Ok(info) = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            )) else {
                continue;
            };
            let field = |name: &str| fdinfo_field(&info, name).unwrap_or_default();
            let number = |name: &str| field(name).parse::<u64>().unwrap_or(0);
            let entry = runs.entry(field("prog_type")).or_default();
            entry.0 += number("run_time_ns");
            entry.1 += number("run_cnt");
        }
        Self(runs)
    }

    /// Run time of every program, in ns.
    pub fn total_ns(&self) -> u64 {
        self.0.values().map(|(ns, _)| ns).sum()
    }

    /// (run time in ns, runs) of one program type.
    pub fn of(&self, prog_type: &str) -> (u64, u64) {
        self.0.get(prog_type).copied().unwrap_or((0, 0))
    }

    /// What ran between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut runs = self.0.clone();
        for (kind, (ns, count)) in &mut runs {
            let (ns_before, count_before) = earlier.of(kind);
            *ns = ns.saturating_sub(ns_before);
            *count = count.saturating_sub(count_before);
        }
        Self(runs)
    }
}

fn fdinfo_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// Whether a process has perf events open: a perf_event file, or a BPF
/// link to one. This is the moment a profiler starts sampling.
pub fn holds_perf_event(pid: u32) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let Ok(link) = fs::read_link(fd.path()) else {
            return false;
        };
        match link.to_string_lossy().as_ref() {
            "anon_inode:[perf_event]" => true,
            "anon_inode:bpf_link" => fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()
            .and_then(|info| fdinfo_field(&info, "link_type"))
            .is_some_and(|kind| kind == "perf"),
            _ => false,
        }
    })
}

/// Turns the kernel's BPF run-time statistics on, and back off on drop if
/// they were off.
pub struct BpfStats {
    was: Option<String>,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let was = fs::read_to_string(BPF_STATS).ok();
        if was.as_deref().map(str::trim) != Some("1") {
            cleanup::restore_bpf_stats_to(Some(false));
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
        cleanup::restore_bpf_stats_to(None);
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The median of repeated measurements with their minimum and maximum.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Spread {
    /// `None` when there are no measurements.
    pub fn of(values: &[f64]) -> Option<Self> {
        let values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        Some(Self {
            median: median(&values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            count: values.len(),
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "median": round(self.median, 4),
            "min": round(self.min, 4),
            "max": round(self.max, 4),
            "n": self.count,
        })
    }

    /// Reads back what `to_json` wrote.
    pub fn from_json(value: &Value) -> Option<Self> {
        Some(Self {
            median: value["median"].as_f64()?,
            min: value["min"].as_f64()?,
            max: value["max"].as_f64()?,
            count: value["n"].as_u64()? as usize,
        })
    }
}

pub fn spread_json(values: &[f64]) -> Value {
    Spread::of(values).map_or(Value::Null, Spread::to_json)
}

pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}
