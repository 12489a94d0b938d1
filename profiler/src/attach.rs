//! `profiler attach`: samples one process until a stop condition, then
//! symbolizes what was gathered and writes the profile.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use log::{debug, warn};
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep_until},
};

use crate::{
    cli::AttachArgs,
    event_loop::{self, Clock, LoopData, LoopReport},
    mappings::AddressSpace,
    output::{
        self,
        summary::{StackQuality, Summary, ThreadShare, Timings},
    },
    perf_map::{self, PerfMap, PerfMapFile},
    procfs::{self, ProcessInfo},
    profile::{Profile, TopEntry},
    sampler::{LoopProbe, Sampler, SamplerConfig, UnwindLoad},
    symbolize::{ProcessSymbols, ResolvedStacks, Symbolizer},
};

/// How many rows the hottest-frame lists hold.
const TOP_ROWS: usize = 10;

/// Why sampling ended.
#[derive(Debug)]
enum StopReason {
    Duration,
    Interrupted,
    Terminated,
    TargetExited,
    CommandExited(ExitStatus),
}

impl StopReason {
    fn describe(&self) -> String {
        match self {
            Self::Duration => "duration reached".to_owned(),
            Self::Interrupted => "interrupted (Ctrl-C)".to_owned(),
            Self::Terminated => "terminated (SIGTERM)".to_owned(),
            Self::TargetExited => "target exited".to_owned(),
            Self::CommandExited(status) => format!("command exited ({status})"),
        }
    }
}

/// Checks that profiling can work here before anything is started.
pub fn preflight(frequency_hz: u64) -> anyhow::Result<()> {
    let privileged = procfs::has_capability(procfs::cap::SYS_ADMIN)
        || (procfs::has_capability(procfs::cap::BPF)
            && procfs::has_capability(procfs::cap::PERFMON));
    if !privileged {
        bail!(
            "profiling needs root, or the CAP_BPF and CAP_PERFMON capabilities: \
             run it with sudo, or grant them with `sudo setcap cap_bpf,cap_perfmon+ep {}`",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "profiler".to_owned())
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); \
             a kernel built with CONFIG_DEBUG_INFO_BTF=y is needed"
        );
    }
    if !Path::new("/proc/sys/kernel/perf_event_max_sample_rate").exists() {
        bail!("this kernel has no perf events (CONFIG_PERF_EVENTS)");
    }
    check_frequency(frequency_hz, procfs::max_sample_rate_hz())
}

fn check_frequency(frequency_hz: u64, max_hz: Option<u64>) -> anyhow::Result<()> {
    if frequency_hz == 0 {
        bail!("--frequency must be at least 1 Hz");
    }
    if let Some(max_hz) = max_hz
        && frequency_hz > max_hz
    {
        bail!(
            "--frequency {frequency_hz} Hz is above the kernel's limit of {max_hz} Hz \
             (kernel.perf_event_max_sample_rate)"
        );
    }
    Ok(())
}

pub fn run(args: AttachArgs) -> anyhow::Result<i32> {
    if args.pid.is_none() && args.command.is_empty() {
        bail!("give a process to profile with --pid, or a command to run after `--`");
    }
    if let Some(duration) = args.duration
        && !(duration > 0.0 && duration.is_finite())
    {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.block_threshold > 0.0 && args.block_threshold.is_finite()) {
        bail!("--block-threshold must be a positive number of milliseconds");
    }
    preflight(args.frequency)?;
    if let Some(pid) = args.pid
        && !procfs::is_alive(pid)
    {
        bail!("no process with pid {pid}");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(session(args))
}

async fn session(args: AttachArgs) -> anyhow::Result<i32> {
    // With a pid, sampling starts before the command, so a load test runs
    // entirely under the profiler. Without one, the command is the target.
    let mut child = None;
    let pid = match args.pid {
        Some(pid) => pid,
        None => {
            let started = spawn(&args.command)?;
            let pid = started.id().context("the command exited at once")?;
            child = Some(started);
            wait_for_exec(pid);
            pid
        }
    };
    let process = procfs::read_info(pid).with_context(|| format!("no process with pid {pid}"))?;
    let dir = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("profile-{pid}")));
    output::prepare_dir(&dir)?;

    let load_started = Instant::now();
    let mut sampler = Sampler::load(&SamplerConfig {
        pids: vec![pid],
        sample_all: false,
        stack_entries: args.stack_entries,
        event_loop_threshold_ns: (!args.no_event_loop)
            .then(|| (args.block_threshold * 1e6).round() as u64),
        unwind_rows: args.unwind_rows,
    })?;
    let mut space = AddressSpace::new(pid);
    space
        .refresh()
        .with_context(|| format!("cannot read the mappings of pid {pid}"))?;
    let mut perf_map = open_perf_map(&process);
    let cpu_start = procfs::cpu_time_s(pid);
    let unwind_load = sampler.load_unwind_tables(&space).unwrap_or_else(|err| {
        warn!("cannot load unwind tables ({err:#}); walking by frame pointer");
        UnwindLoad::default()
    });

    sampler.attach(args.frequency)?;
    let load_ms = elapsed_ms(load_started);
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let start_mono_ns = monotonic_ns();
    let mut loop_events = Vec::new();
    if args.pid.is_some() && !args.command.is_empty() {
        child = Some(spawn(&args.command)?);
    }

    let live = !args.quiet && std::io::stderr().is_terminal();
    let mut cpu_last = cpu_start;
    let reason = watch(
        &args,
        pid,
        child.as_mut(),
        &mut sampler,
        &mut loop_events,
        &mut space,
        &mut perf_map,
        &process,
        &mut cpu_last,
        live,
    )
    .await?;
    sampler.detach();
    let stop_mono_ns = monotonic_ns();
    let stopped = Instant::now();
    let duration_s = started.elapsed().as_secs_f64();
    if live {
        eprint!("\r\x1b[K");
    }

    let command_status = match (&reason, child.as_mut()) {
        (StopReason::CommandExited(status), _) => Some(*status),
        (_, Some(child)) => Some(stop_child(child).await),
        (_, None) => None,
    };

    // Last look at the process before it may go away.
    if procfs::is_alive(pid) {
        if let Err(err) = space.refresh() {
            debug!("last refresh of the mappings failed: {err}");
        }
        cpu_last = procfs::cpu_time_s(pid).or(cpu_last);
    }
    if perf_map.is_none() {
        perf_map = open_perf_map(&process);
    }
    let thread_names = procfs::thread_names(pid);
    let stats = sampler.stats()?;
    let raw = sampler.collect()?;
    sampler.drain_loop_events(&mut loop_events);
    let loop_state = if sampler.tracks_event_loop() {
        Some((sampler.loop_histogram()?, sampler.loop_threads()?))
    } else {
        None
    };
    let loop_probe = sampler.loop_probe().map_or("", LoopProbe::describe);
    drop(sampler);
    let stack_errors = stats.user_stack_errors + stats.kernel_stack_errors + raw.missing_stacks;
    if stack_errors > 0 {
        warn!(
            "{stack_errors} stacks could not be stored (stack map full, or the walk failed); \
             they show as [stack lost]. A larger --stack-entries (now {}) helps if it was full",
            args.stack_entries
        );
    }
    if stats.counts_map_full > 0 {
        warn!(
            "{} samples were dropped: the counts map was full",
            stats.counts_map_full
        );
    }

    let perf_map_path = perf_map::path_for(&process);
    let perf_map: Option<PerfMap> = perf_map.and_then(|mut file| match file.read() {
        Ok(map) => {
            debug!("perf map has {} entries", map.len());
            Some(map)
        }
        Err(err) => {
            warn!("{err}; JIT frames will be unnamed");
            None
        }
    });
    if perf_map.is_none() && process.is_node() {
        warn!(
            "no perf map at {}: JavaScript frames will be unnamed. Start node with \
             --perf-basic-prof-only-functions --interpreted-frames-native-stack",
            perf_map_path.display()
        );
    }

    let collect_ms = elapsed_ms(stopped);
    let symbolize_started = Instant::now();
    let symbolizer = Symbolizer::new();
    let resolved = ResolvedStacks::resolve(
        &symbolizer,
        &raw,
        &ProcessSymbols {
            space: &space,
            perf_map: perf_map.as_ref(),
        },
    );
    let profile = resolved.profile(&raw.counts, &raw.threads, &thread_names);
    let event_loop =
        loop_state
            .filter(|(_, threads)| !threads.is_empty())
            .map(|(histogram, threads)| {
                event_loop::analyze(
                    &LoopData {
                        events: &loop_events,
                        histogram: &histogram,
                        threads: &threads,
                        events_lost: stats.loop_events_lost,
                        max_ns: stats.loop_max_ns,
                        threshold_ns: (args.block_threshold * 1e6).round() as u64,
                        probe: loop_probe,
                    },
                    Clock {
                        start_mono_ns,
                        start_unix_s: started_wall
                            .duration_since(UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                        stop_mono_ns,
                    },
                    args.frequency,
                    &resolved,
                    &raw.threads,
                    &thread_names,
                )
            });
    if stats.loop_events_lost > 0 {
        warn!(
            "{} event-loop records were lost (ring buffer full); episodes may miss samples",
            stats.loop_events_lost
        );
    }

    let symbolize_ms = elapsed_ms(symbolize_started);

    let render_started = Instant::now();
    let look = output::flamegraph::Look {
        title: args.title.clone(),
        inverted: args.inverted,
        min_width_px: args.min_width,
    };
    let thread_roots = !args.no_thread_roots;
    let mut written = write_profile(
        &dir,
        &profile,
        &process,
        (args.frequency, duration_s, stats.samples),
        (&look, thread_roots),
    )?;
    if let Some((report, blocking)) = &event_loop {
        written.extend(write_event_loop(
            &dir,
            report,
            blocking,
            &process,
            (&look, thread_roots),
        )?);
    }
    let pprof_meta = output::pprof::Meta {
        frequency_hz: args.frequency,
        start_unix_ns: started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        duration_ns: (duration_s * 1e9) as i64,
        comment: &format!("profiler attach: {} (pid {pid})", process.command_line()),
    };
    written.push(output::write_atomic(&dir, "profile.pb.gz", |w| {
        output::pprof::write(&profile, &pprof_meta, w)
    })?);
    let render_ms = elapsed_ms(render_started);

    let target_cpu_s = match (cpu_start, cpu_last) {
        (Some(start), Some(end)) => Some(((end - start) * 100.0).round() / 100.0),
        _ => None,
    };
    let summary = Summary {
        pid,
        command: process.command_line(),
        started_unix_s: started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        duration_s: (duration_s * 1000.0).round() / 1000.0,
        frequency_hz: args.frequency,
        samples: stats.samples,
        lost_samples: stats.counts_map_full,
        stack_errors,
        expected_samples: target_cpu_s.map(|cpu| (cpu * args.frequency as f64).round() as u64),
        target_cpu_s,
        stop_reason: reason.describe(),
        command_exit_status: command_status.and_then(|s| s.code()),
        command_run: (!args.command.is_empty()).then(|| args.command.join(" ")),
        perf_map: perf_map
            .as_ref()
            .map(|_| perf_map_path.display().to_string()),
        kernel_counters: stats,
        stacks: {
            let (user_stacks, complete) = resolved.user_completeness(&raw.counts);
            StackQuality {
                unwinding: if unwind_load.mappings > 0 {
                    "unwind tables (.eh_frame) where the code has them, frame pointers elsewhere"
                } else {
                    "frame pointers"
                },
                table_mappings: unwind_load.mappings,
                unwind_rows: unwind_load.rows,
                table_walks: stats.table_walks,
                row_lookups: stats.row_lookups,
                row_cache_hit_percent: (stats.row_cache_hits as f64 * 10000.0
                    / stats.row_lookups.max(1) as f64)
                    .round()
                    / 100.0,
                user_stacks,
                complete,
                complete_percent: (complete as f64 * 10000.0 / user_stacks.max(1) as f64).round()
                    / 100.0,
            }
        },
        event_loop: event_loop.as_ref().map(|(report, _)| report),
        threads: thread_shares(&profile),
        main_thread_percent: {
            let main: u64 = profile
                .samples
                .iter()
                .filter(|s| s.tid == pid)
                .map(|s| s.count)
                .sum();
            (main as f64 * 10000.0 / profile.total().max(1) as f64).round() / 100.0
        },
        top_self: profile.top_self(TOP_ROWS),
        top_total: profile.top_total(TOP_ROWS),
        top_js: profile.top_js(TOP_ROWS),
        timings_ms: Timings {
            load: load_ms,
            collect: collect_ms,
            symbolize: symbolize_ms,
            render: render_ms,
            stop_to_output: elapsed_ms(stopped),
        },
    };
    written.push(output::write_json(&dir, "summary.json", &summary)?);
    print_report(
        &summary,
        event_loop.as_ref().map(|(report, _)| report),
        &written,
    );

    Ok(match command_status {
        Some(status) => status.code().unwrap_or(1),
        None => 0,
    })
}

/// Samples until a stop condition; keeps the mappings and the perf map
/// current on the way, and draws the live line.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site, all state of the session"
)]
async fn watch(
    args: &AttachArgs,
    pid: u32,
    mut child: Option<&mut Child>,
    sampler: &mut Sampler,
    loop_events: &mut Vec<profiler_common::LoopEvent>,
    space: &mut AddressSpace,
    perf_map: &mut Option<PerfMapFile>,
    process: &ProcessInfo,
    cpu_last: &mut Option<f64>,
    live: bool,
) -> anyhow::Result<StopReason> {
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|secs| tokio::time::Instant::now() + Duration::from_secs_f64(secs));
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut tick = interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let mut cpu_prev = (Instant::now(), *cpu_last);

    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(StopReason::Interrupted),
            _ = sigterm.recv() => return Ok(StopReason::Terminated),
            () = async { sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                return Ok(StopReason::Duration);
            }
            status = async { child.as_mut().unwrap().wait().await }, if child.is_some() => {
                let status = status.context("cannot wait for the command")?;
                return Ok(StopReason::CommandExited(status));
            }
            _ = tick.tick() => {
                if !procfs::is_alive(pid) {
                    return Ok(StopReason::TargetExited);
                }
                sampler.drain_loop_events(loop_events);
                ticks += 1;
                // Every tick: new mappings, so that a library loaded since
                // (dlopen) is walked with its table within a quarter second.
                match space.refresh() {
                    Ok(true) => {
                        if let Err(err) = sampler.load_unwind_tables(space) {
                            debug!("loading new unwind tables failed: {err:#}");
                        }
                    }
                    Ok(_) => {}
                    Err(err) => debug!("refreshing the mappings failed: {err}"),
                }
                if !ticks.is_multiple_of(4) {
                    continue;
                }
                // Once a second: the perf map once it appears, CPU time,
                // and the live line.
                if perf_map.is_none() {
                    *perf_map = open_perf_map(process);
                }
                let now = (Instant::now(), procfs::cpu_time_s(pid));
                if now.1.is_some() {
                    *cpu_last = now.1;
                }
                if live {
                    let cpu_percent = match (cpu_prev.1, now.1) {
                        (Some(a), Some(b)) => {
                            100.0 * (b - a) / now.0.duration_since(cpu_prev.0).as_secs_f64()
                        }
                        _ => 0.0,
                    };
                    let samples = sampler.stats().map(|s| s.samples).unwrap_or(0);
                    eprint!(
                        "\r\x1b[K{:6.1} s  {samples} samples  target CPU {cpu_percent:.0}%",
                        started.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                }
                cpu_prev = now;
            }
        }
    }
}

fn spawn(command: &[String]) -> anyhow::Result<Child> {
    let (program, rest) = command.split_first().context("empty command")?;
    Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("cannot run `{}`", command.join(" ")))
}

/// Waits, briefly, until a just-spawned child has replaced this program's
/// image with the command's, so that its name and mappings are the
/// command's.
fn wait_for_exec(pid: u32) {
    let ours = std::fs::read_link("/proc/self/exe").ok();
    for _ in 0..400 {
        match std::fs::read_link(procfs::proc_path(pid, "exe")) {
            Ok(exe) if Some(&exe) != ours.as_ref() => return,
            Err(_) => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Ends a command still running when profiling stops: SIGTERM, then
/// SIGKILL after two seconds.
async fn stop_child(child: &mut Child) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been reused.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        Ok(Ok(status)) => status,
        _ => {
            let _ = child.kill().await;
            child.wait().await.unwrap_or_default()
        }
    }
}

pub fn open_perf_map(process: &ProcessInfo) -> Option<PerfMapFile> {
    let path = perf_map::path_for(process);
    match PerfMapFile::open_trusted(&path, process.uid) {
        Ok(file) => {
            if file.is_some() {
                debug!("using perf map {}", path.display());
            }
            file
        }
        Err(err) => {
            warn!("{err}; JIT frames will be unnamed");
            None
        }
    }
}

fn thread_shares(profile: &Profile) -> Vec<ThreadShare> {
    let total = profile.total().max(1) as f64;
    profile
        .by_thread()
        .into_iter()
        .map(|(thread, samples)| ThreadShare {
            thread,
            samples,
            percent: (samples as f64 * 10000.0 / total).round() / 100.0,
        })
        .collect()
}

/// Writes the folded stacks and the flame graph.
fn write_profile(
    dir: &Path,
    profile: &Profile,
    process: &ProcessInfo,
    (frequency_hz, duration_s, samples): (u64, f64, u64),
    (look, thread_roots): (&output::flamegraph::Look, bool),
) -> anyhow::Result<Vec<PathBuf>> {
    let folded = profile.folded(thread_roots);
    if folded.is_empty() {
        warn!("no samples: the target did not run on a CPU while it was profiled; no flame graph");
    }
    let title = format!(
        "{} (pid {})",
        shorten(&process.command_line(), 80),
        process.pid
    );
    let subtitle = format!("{duration_s:.1} s at {frequency_hz} Hz, {samples} samples");
    output::write_stacks(
        dir,
        ("stacks.folded", "flamegraph.svg"),
        &folded,
        (&title, &subtitle),
        look,
    )
}

/// Writes `blocking.folded`, `blocking.svg` and `episodes.json`.
fn write_event_loop(
    dir: &Path,
    report: &LoopReport,
    blocking: &Profile,
    process: &ProcessInfo,
    (look, thread_roots): (&output::flamegraph::Look, bool),
) -> anyhow::Result<Vec<PathBuf>> {
    let title = format!(
        "Event-loop blocking: {} (pid {})",
        shorten(&process.command_line(), 70),
        process.pid
    );
    let subtitle = format!(
        "{} episodes of {} ms or more, {} samples",
        report.all.episode_count, report.threshold_ms, report.episode_samples
    );
    let mut written = output::write_stacks(
        dir,
        ("blocking.folded", "blocking.svg"),
        &blocking.folded(thread_roots),
        (&title, &subtitle),
        look,
    )?;
    written.push(output::write_json(dir, "episodes.json", &report.episodes)?);
    Ok(written)
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn elapsed_ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

fn print_report(summary: &Summary, event_loop: Option<&LoopReport>, written: &[PathBuf]) {
    let mut out = String::new();
    out.push_str(&format!(
        "profiled pid {} ({}) for {:.1} s at {} Hz: {}\n",
        summary.pid,
        shorten(&summary.command, 60),
        summary.duration_s,
        summary.frequency_hz,
        summary.stop_reason
    ));
    out.push_str(&format!(
        "  {} samples, {} lost, {} stack errors",
        summary.samples, summary.lost_samples, summary.stack_errors
    ));
    if let (Some(cpu), Some(expected)) = (summary.target_cpu_s, summary.expected_samples) {
        out.push_str(&format!(
            "; target used {cpu:.1} CPU s (~{expected} samples)"
        ));
    }
    out.push('\n');
    if let Some(status) = summary.command_exit_status {
        out.push_str(&format!("  command exit status: {status}\n"));
    }
    if !summary.top_self.is_empty() {
        out.push_str("\nhottest frames by self time:\n");
        out.push_str(&format_top(&summary.top_self));
    }
    if let Some(report) = event_loop {
        out.push_str(&format!(
            "\nevent loop: {} iterations on {} thread(s); {} blocking episode(s) of {} ms or more\n",
            report.all.iterations, report.all.threads, report.all.episode_count, report.threshold_ms
        ));
        for (role, stats) in [
            ("main thread", &report.main_thread),
            ("other threads", &report.other_threads),
        ] {
            if stats.threads == 0 {
                continue;
            }
            out.push_str(&format!(
                "  {role:<13} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} episode(s)\n",
                stats.p50_ms, stats.p90_ms, stats.p99_ms, stats.max_ms, stats.episode_count
            ));
        }
        if report.all.episode_count > 0 {
            out.push_str("  longest:\n");
            for episode in report.episodes.iter().take(3) {
                let culprit = episode
                    .culprit()
                    .map(|row| format!("{} ({:.0}%)", shorten(&row.frame, 70), row.percent))
                    .unwrap_or_else(|| "no samples".to_owned());
                let role = if episode.main_thread {
                    "main"
                } else {
                    "worker"
                };
                let mut notes = String::new();
                if episode.off_cpu {
                    notes.push_str(&format!(", {:.0} ms off-CPU", episode.off_cpu_ms));
                }
                if episode.in_progress {
                    notes.push_str(", still running at the stop");
                }
                out.push_str(&format!(
                    "  {:>8.1} ms  {} ({role}, tid {}) at {:.2} s{notes}: {culprit}\n",
                    episode.duration_ms, episode.thread, episode.tid, episode.start_s
                ));
            }
        }
    }
    out.push_str("\nwrote:\n");
    for path in written {
        out.push_str(&format!("  {}\n", path.display()));
    }
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = stdout.write_all(out.as_bytes());
}

fn format_top(rows: &[TopEntry]) -> String {
    rows.iter()
        .map(|row| {
            format!(
                "  {:>6.2}%  {:>7}  {}\n",
                row.percent,
                row.samples,
                shorten(&row.frame, 100)
            )
        })
        .collect()
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max_chars - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_frequency_is_refused() {
        let err = check_frequency(0, Some(100_000)).unwrap_err();
        assert!(err.to_string().contains("at least 1 Hz"));
    }

    #[test]
    fn frequency_above_the_kernel_limit_is_refused() {
        let err = check_frequency(200_000, Some(100_000)).unwrap_err();
        assert!(
            err.to_string().contains("perf_event_max_sample_rate"),
            "{err}"
        );
        check_frequency(99, Some(100_000)).unwrap();
    }

    #[test]
    fn long_names_are_shortened_on_a_char_boundary() {
        assert_eq!(shorten("héllo wörld", 6), "héllo…");
        assert_eq!(shorten("short", 10), "short");
    }
}
