//! The profilers compared: this project's, `perf record` with frame
//! pointers and with DWARF, and bpftrace. How each is installed and
//! checked, started against a process, stopped, and taken to a flame
//! graph, with what that cost.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    child::Owned,
    cleanup,
    measure::{self, BpfRuns, round},
    stacks::{self, Stacks},
};
use crate::{root, setup, step};

/// How long a profiler may take to start sampling, and to stop.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound on one run of this profiler, should the bench die.
const OURS_MAX_S: u32 = 600;

/// bpftrace resolves user symbols afresh for every frame unless told to
/// cache them (it does not by default when ASLR is on); without the cache
/// it printed the dashboard API's map for over ten minutes here. Its map
/// holds 4096 stacks by default, fewer than a node process gives at the
/// frequencies used here.
const BPFTRACE_ENV: &[(&str, &str)] = &[
    ("BPFTRACE_CACHE_USER_SYMBOLS", "1"),
    ("BPFTRACE_MAP_KEYS_MAX", "65536"),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// This profiler: mixed unwinding, event-loop tracking.
    Ours,
    /// This profiler without event-loop tracking.
    OursNoLoop,
    /// This profiler walking by frame pointers only.
    OursFramePointers,
    /// `perf record -g`: frame pointers, in the kernel.
    PerfFp,
    /// `perf record --call-graph dwarf`: 8 KiB of stack copied per sample
    /// and unwound by `perf script`.
    PerfDwarf,
    Bpftrace,
}

#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub kind: Kind,
    pub frequency_hz: u32,
}

impl Tool {
    pub const fn new(kind: Kind, frequency_hz: u32) -> Self {
        Self { kind, frequency_hz }
    }

    /// A short identifier for JSON and file names.
    pub fn key(&self) -> String {
        let name = match self.kind {
            Kind::Ours => "ours",
            Kind::OursNoLoop => "ours-no-loop",
            Kind::OursFramePointers => "ours-fp",
            Kind::PerfFp => "perf-fp",
            Kind::PerfDwarf => "perf-dwarf",
            Kind::Bpftrace => "bpftrace",
        };
        format!("{name}-{}", self.frequency_hz)
    }

    pub fn label(&self) -> String {
        let hz = self.frequency_hz;
        match self.kind {
            Kind::Ours => format!("this profiler, {hz} Hz"),
            Kind::OursNoLoop => format!("this profiler, {hz} Hz, `--no-event-loop`"),
            Kind::OursFramePointers => format!("this profiler, {hz} Hz, `--unwind-rows 0`"),
            Kind::PerfFp => format!("`perf record -g`, {hz} Hz"),
            Kind::PerfDwarf => format!("`perf record --call-graph dwarf`, {hz} Hz"),
            Kind::Bpftrace => format!("bpftrace `profile:hz:{hz}`"),
        }
    }

    pub fn is_perf(&self) -> bool {
        matches!(self.kind, Kind::PerfFp | Kind::PerfDwarf)
    }

    /// The program bpftrace runs against `pid`.
    pub fn bpftrace_program(&self, pid: u32) -> String {
        format!(
            "profile:hz:{} /pid == {pid}/ {{ @[ustack, kstack] = count(); }}",
            self.frequency_hz
        )
    }
}

/// Whether perf and bpftrace run here, with their versions or the error
/// that stopped them; and the trace file systems mounted for them, put
/// back on drop.
pub struct Available {
    pub perf: Result<String, String>,
    pub bpftrace: Result<String, String>,
    pub mounted: Vec<String>,
    _mounts: Mounts,
}

impl Available {
    pub fn has(&self, tool: Tool) -> bool {
        match tool.kind {
            Kind::PerfFp | Kind::PerfDwarf => self.perf.is_ok(),
            Kind::Bpftrace => self.bpftrace.is_ok(),
            _ => true,
        }
    }

    pub fn to_json(&self) -> Value {
        let state = |r: &Result<String, String>| match r {
            Ok(version) => json!({ "version": version }),
            Err(error) => json!({ "error": error }),
        };
        json!({
            "perf": state(&self.perf),
            "bpftrace": state(&self.bpftrace),
            "mounted_for_the_run": self.mounted,
        })
    }
}

/// Installs perf (Debian's linux-perf) and bpftrace when missing, and
/// checks that each can sample on this kernel. A tool that cannot is left
/// out of the comparison with its error, rather than stopping the bench.
pub fn prepare(scratch: &Path) -> Available {
    fs::create_dir_all(scratch).ok();
    for (program, package) in [("perf", "linux-perf"), ("bpftrace", "bpftrace")] {
        if !setup::has_working(program, &["--version"])
            && let Err(err) = setup::debian_packages(&[package])
        {
            eprintln!("warning: cannot install {package}: {err:#}");
        }
    }

    step("checking that perf and bpftrace can sample here");
    let perf = probe_perf(scratch);
    let mut mounts = Mounts::default();
    let mut bpftrace = probe_bpftrace(scratch);
    if bpftrace.is_err() {
        // Some bpftrace builds look for tracefs even for perf-event probes.
        mounts.ensure("tracefs", "/sys/kernel/tracing");
        mounts.ensure("debugfs", "/sys/kernel/debug");
        if !mounts.0.is_empty() {
            bpftrace = probe_bpftrace(scratch);
        }
    }
    for (name, state) in [("perf", &perf), ("bpftrace", &bpftrace)] {
        match state {
            Ok(version) => println!("  {name}: {version}"),
            Err(error) => println!("  {name}: cannot run here, left out: {error}"),
        }
    }
    Available {
        perf,
        bpftrace,
        mounted: mounts.0.clone(),
        _mounts: mounts,
    }
}

fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn probe_perf(scratch: &Path) -> Result<String, String> {
    let data = scratch.join("probe-perf.data");
    let out = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "99", "-g", "-o"])
        .arg(&data)
        .args(["--", "sleep", "0.2"])
        .output()
        .map_err(|err| format!("cannot run perf: {err}"))?;
    let _ = fs::remove_file(&data);
    if !out.status.success() {
        return Err(last_lines(&String::from_utf8_lossy(&out.stderr)));
    }
    Ok(version("perf"))
}

fn probe_bpftrace(scratch: &Path) -> Result<String, String> {
    let log = scratch.join("probe-bpftrace.log");
    let stderr = fs::File::create(&log).map_err(|err| format!("{err}"))?;
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-e", "profile:hz:99 { exit(); }"])
        .envs(BPFTRACE_ENV.iter().copied())
        .stdout(Stdio::null())
        .stderr(stderr);
    let exit = Owned::spawn("bpftrace", &mut cmd)
        .and_then(|mut child| child.wait(Duration::from_secs(60)))
        .map_err(|err| format!("{err:#}"))?;
    if !exit.status.success() {
        return Err(last_lines(&fs::read_to_string(&log).unwrap_or_default()));
    }
    Ok(version("bpftrace"))
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// File systems mounted for the bench, unmounted on drop.
#[derive(Default)]
struct Mounts(Vec<String>);

impl Mounts {
    fn ensure(&mut self, fstype: &str, target: &str) {
        let mounted = fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(target));
        if mounted {
            return;
        }
        let (Ok(source), Ok(dir)) = (CString::new(fstype), CString::new(target)) else {
            return;
        };
        // SAFETY: all three strings are NUL-terminated and live across the
        // call; no mount data is passed.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                dir.as_ptr(),
                source.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            println!("  mounted {fstype} on {target} for the run");
            cleanup::set_mounted(&dir, true);
            self.0.push(target.to_owned());
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let Ok(dir) = CString::new(target.as_str()) else {
                continue;
            };
            // SAFETY: `dir` is NUL-terminated and lives across the call.
            unsafe { libc::umount(dir.as_ptr()) };
            cleanup::set_mounted(&dir, false);
        }
    }
}

/// A profiler started against a process.
pub struct Recording {
    tool: Tool,
    child: Owned,
    dir: PathBuf,
    spawned: Instant,
    ready: Option<Ready>,
}

/// The profiler's state when it started sampling.
struct Ready {
    at: Instant,
    mono_us: f64,
    cpu_s: f64,
    bpf: BpfRuns,
}

/// What one recording gave and cost.
pub struct Outcome {
    pub tool: Tool,
    /// Weighted by sample count, or for perf by each sample's period in
    /// ns, as inferno's collapse-perf weighs them.
    pub stacks: Stacks,
    pub samples: u64,
    /// From start to the first sample.
    pub startup_ms: f64,
    pub sampling_s: f64,
    /// When sampling ran, on CLOCK_MONOTONIC.
    pub window_mono_us: (f64, f64),
    /// The profiler process while sampling.
    pub cpu_while_sampling_s: f64,
    /// Its BPF programs while sampling, where it has any.
    pub bpf_while_sampling_s: Option<f64>,
    /// The run time per sample of its sampling BPF program.
    pub bpf_ns_per_sample: Option<f64>,
    /// The profiler process over its life.
    pub cpu_total_s: f64,
    pub peak_rss_mib: f64,
    /// Work after the profiler exited (`perf script`, collapsing,
    /// drawing), which this profiler does before it exits.
    pub post_cpu_s: f64,
    pub post_peak_rss_mib: Option<f64>,
    /// From the stop signal to the profiler's exit.
    pub stop_to_exit_ms: f64,
    /// From the stop signal to a finished flame graph. For this profiler,
    /// its own `timings_ms.stop_to_output`.
    pub stop_to_flame_graph_ms: f64,
    /// This profiler's summary.json.
    pub summary: Option<Value>,
}

impl Outcome {
    /// The profiler's CPU while sampling, process and BPF programs, in
    /// percent of one core.
    pub fn cpu_percent_while_sampling(&self) -> f64 {
        let cpu_s = self.cpu_while_sampling_s + self.bpf_while_sampling_s.unwrap_or(0.0);
        100.0 * cpu_s / self.sampling_s.max(1e-9)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tool": self.tool.key(),
            "samples": self.samples,
            "startup_ms": round(self.startup_ms, 1),
            "sampling_s": round(self.sampling_s, 3),
            "cpu_while_sampling_s": round(self.cpu_while_sampling_s, 3),
            "bpf_while_sampling_s": self.bpf_while_sampling_s.map(|s| round(s, 4)),
            "bpf_ns_per_sample": self.bpf_ns_per_sample.map(|ns| round(ns, 0)),
            "cpu_percent_of_one_core_while_sampling":
                round(self.cpu_percent_while_sampling(), 3),
            "cpu_total_s": round(self.cpu_total_s, 3),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "post_cpu_s": round(self.post_cpu_s, 3),
            "post_peak_rss_mib": self.post_peak_rss_mib.map(|m| round(m, 1)),
            "stop_to_exit_ms": round(self.stop_to_exit_ms, 1),
            "stop_to_flame_graph_ms": round(self.stop_to_flame_graph_ms, 1),
        })
    }
}

impl Recording {
    /// Starts `tool` against `pid`, its files in `dir` (emptied first).
    pub fn start(tool: Tool, pid: u32, dir: &Path) -> anyhow::Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let log = |name: &str| -> anyhow::Result<fs::File> {
            let path = dir.join(name);
            fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
        };
        let hz = tool.frequency_hz.to_string();
        let mut cmd = match tool.kind {
            Kind::Ours | Kind::OursNoLoop | Kind::OursFramePointers => {
                let mut cmd = Command::new(root().join("target/release/profiler"));
                cmd.args(["attach", "--quiet", "-p", &pid.to_string(), "-F", &hz])
                    .args(["-d", &OURS_MAX_S.to_string(), "-o"])
                    .arg(dir.join("profile"));
                if tool.kind == Kind::OursNoLoop {
                    cmd.arg("--no-event-loop");
                }
                if tool.kind == Kind::OursFramePointers {
                    cmd.args(["--unwind-rows", "0"]);
                }
                cmd
            }
            Kind::PerfFp | Kind::PerfDwarf => {
                let mut cmd = Command::new("perf");
                cmd.args(["record", "-e", "cpu-clock", "-F", &hz]);
                if tool.kind == Kind::PerfFp {
                    cmd.arg("-g");
                } else {
                    cmd.args(["--call-graph", "dwarf"]);
                }
                cmd.args(["-p", &pid.to_string(), "-o"])
                    .arg(dir.join("perf.data"));
                cmd
            }
            Kind::Bpftrace => {
                let mut cmd = Command::new("bpftrace");
                cmd.args(["-e", &tool.bpftrace_program(pid)])
                    .envs(BPFTRACE_ENV.iter().copied());
                cmd
            }
        };
        let stdout = if tool.kind == Kind::Bpftrace {
            log("bpftrace.out")?
        } else {
            log("stdout.log")?
        };
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log("stderr.log")?);
        let child = Owned::spawn(&tool.label(), &mut cmd)?;
        Ok(Self {
            tool,
            child,
            dir: dir.to_owned(),
            spawned: Instant::now(),
            ready: None,
        })
    }

    /// Waits until the profiler samples: it holds a perf event.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let pid = self.child.pid();
        let deadline = Instant::now() + READY_TIMEOUT;
        while !measure::holds_perf_event(pid) {
            if let Some(exit) = self.child.wait_until(Instant::now())? {
                bail!(
                    "{} exited before it sampled ({}): {}",
                    self.tool.label(),
                    exit.status,
                    self.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start sampling within {} s",
                    self.tool.label(),
                    READY_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Events are opened just before they are enabled.
        thread::sleep(Duration::from_millis(50));
        self.ready = Some(Ready {
            at: Instant::now(),
            mono_us: measure::monotonic_us(),
            cpu_s: measure::cpu_time_s(pid)?,
            bpf: BpfRuns::read(pid),
        });
        Ok(())
    }

    fn stderr_tail(&self) -> String {
        last_lines(&fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default())
    }

    /// Stops the profiler (SIGINT, as Ctrl-C would) and takes its output
    /// to a flame graph.
    pub fn stop(mut self) -> anyhow::Result<Outcome> {
        let pid = self.child.pid();
        let ready = self
            .ready
            .take()
            .context("the profiler was stopped before it sampled")?;
        let cpu_s = measure::cpu_time_s(pid)?;
        let bpf = BpfRuns::read(pid).since(&ready.bpf);
        let stop_mono_us = measure::monotonic_us();
        let stopped = Instant::now();
        self.child.signal(libc::SIGINT);
        let exit = self.child.wait(STOP_TIMEOUT)?;
        let stop_to_exit_ms = ms(exit.at - stopped);

        let mut outcome = Outcome {
            tool: self.tool,
            stacks: Stacks::default(),
            samples: 0,
            startup_ms: ms(ready.at - self.spawned),
            sampling_s: (stopped - ready.at).as_secs_f64(),
            window_mono_us: (ready.mono_us, stop_mono_us),
            cpu_while_sampling_s: cpu_s - ready.cpu_s,
            bpf_while_sampling_s: None,
            bpf_ns_per_sample: None,
            cpu_total_s: exit.cpu_s,
            peak_rss_mib: exit.peak_rss_mib,
            post_cpu_s: 0.0,
            post_peak_rss_mib: None,
            stop_to_exit_ms,
            stop_to_flame_graph_ms: f64::NAN,
            summary: None,
        };
        if !self.tool.is_perf() {
            outcome.bpf_while_sampling_s = Some(bpf.total_ns() as f64 / 1e9);
            let (ns, runs) = bpf.of(measure::PERF_EVENT_PROG);
            outcome.bpf_ns_per_sample = (runs > 0).then(|| ns as f64 / runs as f64);
        }

        match self.tool.kind {
            Kind::Ours | Kind::OursNoLoop | Kind::OursFramePointers => {
                if !exit.status.success() {
                    bail!(
                        "the profiler failed ({}): {}",
                        exit.status,
                        self.stderr_tail()
                    );
                }
                let profile = self.dir.join("profile");
                let summary: Value = serde_json::from_str(
                    &fs::read_to_string(profile.join("summary.json"))
                        .context("the profiler wrote no summary.json")?,
                )?;
                outcome.stop_to_flame_graph_ms =
                    summary["timings_ms"]["stop_to_output"]
                        .as_f64()
                        .context("no timings_ms.stop_to_output in summary.json")?;
                outcome.stacks =
                    Stacks::from_folded(&fs::read_to_string(profile.join("stacks.folded"))?)?;
                outcome.samples = outcome.stacks.samples();
                outcome.summary = Some(summary);
            }
            Kind::PerfFp | Kind::PerfDwarf => {
                let post = self.perf_to_flame_graph()?;
                outcome.stacks = post.stacks;
                outcome.samples = post.samples;
                outcome.post_cpu_s = post.cpu_s;
                outcome.post_peak_rss_mib = Some(post.peak_rss_mib);
                outcome.stop_to_flame_graph_ms = ms(stopped.elapsed());
            }
            Kind::Bpftrace => {
                let post_cpu = measure::thread_cpu_s();
                let text = fs::read_to_string(self.dir.join("bpftrace.out"))?;
                let stacks = Stacks::from_bpftrace(&text);
                if stacks.0.is_empty() {
                    bail!("bpftrace printed no stacks: {}", self.stderr_tail());
                }
                stacks::write_flame_graph(
                    &stacks.to_folded("bpftrace"),
                    &self.tool.label(),
                    &self.dir.join("flamegraph.svg"),
                )?;
                outcome.stop_to_flame_graph_ms = ms(stopped.elapsed());
                outcome.post_cpu_s = measure::thread_cpu_s() - post_cpu;
                outcome.samples = stacks.samples();
                outcome.stacks = stacks;
            }
        }
        Ok(outcome)
    }

    /// `perf script`, then inferno's collapse-perf, then inferno's flame
    /// graph. `--no-inline` keeps perf script from starting addr2line for
    /// inlined functions, which took 20 to 30 s for a DWARF profile of the
    /// API here.
    fn perf_to_flame_graph(&self) -> anyhow::Result<PostProcess> {
        let script_path = self.dir.join("perf-script.txt");
        let mut cmd = Command::new("perf");
        cmd.args(["script", "--no-inline", "-i"])
            .arg(self.dir.join("perf.data"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(&script_path)?)
            .stderr(fs::File::create(self.dir.join("perf-script.log"))?);
        let mut script = Owned::spawn("perf script", &mut cmd)?;
        let exit = script.wait(STOP_TIMEOUT)?;
        if !exit.status.success() {
            bail!("perf script failed ({})", exit.status);
        }

        let cpu_before = measure::thread_cpu_s();
        let folded = stacks::collapse_perf(fs::File::open(&script_path)?)?;
        fs::write(self.dir.join("stacks.folded"), &folded)?;
        stacks::write_flame_graph(
            &folded,
            &self.tool.label(),
            &self.dir.join("flamegraph.svg"),
        )?;
        let own_cpu_s = measure::thread_cpu_s() - cpu_before;
        // One header line per sample, its frames indented below it.
        let samples =
            std::io::BufRead::lines(std::io::BufReader::new(fs::File::open(&script_path)?))
                .map_while(Result::ok)
                .filter(|line| line.starts_with(|c: char| !c.is_whitespace()))
                .count() as u64;
        Ok(PostProcess {
            stacks: Stacks::from_folded(&folded)?,
            samples,
            cpu_s: exit.cpu_s + own_cpu_s,
            peak_rss_mib: exit.peak_rss_mib,
        })
    }
}

struct PostProcess {
    stacks: Stacks,
    samples: u64,
    cpu_s: f64,
    peak_rss_mib: f64,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
