//! `profiler daemon`: samples the selected processes without end and cuts
//! the stream into intervals. Each interval gives every process that ran
//! its own profile, written to disk with bounded retention and optionally
//! pushed to Pyroscope; a Prometheus endpoint shows how sampling goes.
//!
//! The flow of one interval: the eBPF program counts into one of its two
//! counts maps while the other is read and cleared at the cut (see
//! [`Sampler::take_counts`]); the counts are split by process, symbolized
//! with that process's mappings and perf map, and written.

mod config;
mod metrics;
mod push;
mod store;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, btree_map::Entry},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use log::{debug, info, warn};
use profiler_common::{LoopEvent, STACK_LOST, SampleKey, loop_event};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval, sleep},
};

use self::{
    config::{Config, PushConfig},
    metrics::Metrics,
    push::{Queue, Upload},
    store::{Interval, Store},
};
use crate::{
    attach,
    cli::DaemonArgs,
    mappings::AddressSpace,
    perf_map::PerfMapFile,
    procfs::{self, ProcessInfo},
    sampler::{RawProfile, Sampler, SamplerConfig},
    symbolize::{ProcessSymbols, ResolvedStacks, Symbolizer},
};

/// How often new processes are looked for and mappings refreshed.
const TICK: Duration = Duration::from_secs(1);
/// How long the queue may take to empty at exit.
const EXIT_PUSH_LIMIT: Duration = Duration::from_secs(5);

pub fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    let config = Config::load(&args)?;
    attach::preflight(config.frequency_hz)?;
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut daemon = Daemon::start(args, config).await?;
        daemon.run().await
    })
}

/// A sampled process and what is needed to symbolize its stacks.
struct Process {
    info: ProcessInfo,
    start_ticks: Option<u64>,
    cgroup: Option<String>,
    service: String,
    /// `None` for kernel threads, which have no user space.
    space: Option<AddressSpace>,
    perf_map: Option<PerfMapFile>,
    /// Gone, or no longer selected; dropped after the next cut.
    retired: bool,
    /// Had samples in this interval or the last. In host mode only active
    /// processes have their mappings kept current.
    active: bool,
    /// Blocking episodes of the interval under way.
    episodes: u64,
}

impl Process {
    fn new(pid: u32) -> Option<Self> {
        let info = procfs::read_info(pid).ok()?;
        let kernel_thread = info.cmdline.is_empty() && procfs::rss_bytes(pid) == Some(0);
        let space = (!kernel_thread).then(|| AddressSpace::new(pid));
        let cgroup = procfs::cgroup(pid);
        Some(Self {
            start_ticks: procfs::start_ticks(pid),
            service: store::service_name(&info.comm, cgroup.as_deref()),
            cgroup,
            perf_map: None,
            space,
            retired: false,
            active: false,
            episodes: 0,
            info,
        })
    }

    fn same_process_as(&self, pid: u32) -> bool {
        procfs::is_alive(pid) && procfs::start_ticks(pid) == self.start_ticks
    }
}

struct Daemon {
    args: DaemonArgs,
    config: Config,
    sampler: Sampler,
    processes: BTreeMap<u32, Process>,
    store: Store,
    symbolizer: Symbolizer,
    /// Processes left since the symbolizer was made; its caches hold their
    /// files until it is made anew.
    symbolizer_stale: bool,
    metrics: Arc<Metrics>,
    push: Option<(Arc<Queue>, Arc<Mutex<PushConfig>>)>,
    loop_events: Vec<LoopEvent>,
    interval_start: SystemTime,
    own_pid: u32,
    /// A failing disk is reported once until a write works again.
    write_failing: bool,
}

impl Daemon {
    async fn start(args: DaemonArgs, config: Config) -> anyhow::Result<Self> {
        let store = Store::open(&config.output)?;
        let metrics = Arc::new(Metrics::default());
        metrics.update(|s| s.start_unix_s = store::unix_now_s());
        if let Some(addr) = config.metrics_addr {
            let listener = metrics::bind(addr).await?;
            info!("metrics at http://{addr}/metrics");
            tokio::spawn(metrics::serve(listener, metrics.clone()));
        }
        let sampler = load_sampler(&config)?;
        let mut daemon = Self {
            args,
            push: None,
            sampler,
            processes: BTreeMap::new(),
            store,
            symbolizer: Symbolizer::new(),
            symbolizer_stale: false,
            metrics,
            loop_events: Vec::new(),
            interval_start: SystemTime::now(),
            own_pid: std::process::id(),
            write_failing: false,
            config,
        };
        daemon.set_push(daemon.config.push.clone());
        daemon.scan();
        daemon.check_first_scan()?;
        daemon.sampler.attach(daemon.config.frequency_hz)?;
        daemon.interval_start = SystemTime::now();
        info!(
            "sampling {} at {} Hz; {}-second intervals to {}",
            daemon.config.selector.describe(),
            daemon.config.frequency_hz,
            daemon.config.interval.as_secs_f64(),
            daemon.store.dir().display()
        );
        Ok(daemon)
    }

    async fn run(&mut self) -> anyhow::Result<i32> {
        let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut sighup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        let mut tick = interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;

        loop {
            let until_cut = time_to_next_cut(SystemTime::now(), self.config.interval);
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = sighup.recv() => self.reload(),
                () = sleep(until_cut) => self.cut(),
                _ = tick.tick() => {
                    ticks += 1;
                    self.scan();
                    self.sampler.drain_loop_events(&mut self.loop_events);
                    self.count_episodes();
                    if ticks.is_multiple_of(2) {
                        self.update_metrics();
                    }
                }
            }
        }

        info!("stopping: writing the interval under way");
        self.sampler.detach();
        self.cut();
        if let Some((queue, config)) = &self.push {
            let config = config.lock().unwrap().clone();
            push::flush(queue, &config, EXIT_PUSH_LIMIT).await;
        }
        Ok(0)
    }

    /// Finds new matching processes, retires those gone, keeps mappings
    /// and unwind tables current, and updates the target map.
    fn scan(&mut self) {
        let selector = &self.config.selector;
        let pids = match procfs::all_pids() {
            Ok(pids) => pids,
            Err(err) => {
                warn!("cannot list processes: {err}");
                return;
            }
        };
        let running: HashSet<u32> = pids.iter().copied().collect();
        for (pid, process) in &mut self.processes {
            if !process.retired && (!running.contains(pid) || !process.same_process_as(*pid)) {
                debug!("pid {pid} ({}) has exited", process.info.comm);
                process.retired = true;
            }
        }
        for pid in pids {
            if pid == self.own_pid || self.processes.contains_key(&pid) {
                continue;
            }
            let Some(name) = procfs::comm(pid) else {
                continue;
            };
            let cgroup = selector.cgroup.as_ref().and_then(|_| procfs::cgroup(pid));
            if !selector.matches(pid, &name, cgroup.as_deref()) {
                continue;
            }
            let Some(process) = Process::new(pid) else {
                continue;
            };
            // In host mode a process is tracked from its start, but most
            // are idle: mappings are read when it first shows in samples.
            if !selector.host {
                info!("sampling pid {pid} ({name})");
            }
            self.processes.insert(pid, process);
        }

        // In host mode, a process's mappings are read from its first
        // second with samples, so one that exits before the cut is still
        // named.
        if self.config.selector.host {
            match self.sampler.sampled_pids() {
                Ok(sampled) => {
                    for pid in sampled {
                        if let Some(process) = self.processes.get_mut(&pid) {
                            process.active = true;
                        }
                    }
                }
                Err(err) => debug!("cannot list the sampled processes: {err:#}"),
            }
        }
        for process in self.processes.values_mut() {
            if process.retired {
                continue;
            }
            if !self.config.selector.host || process.active {
                refresh(process, &mut self.sampler);
            }
        }

        if !self.config.selector.host {
            let targets: BTreeSet<u32> = self
                .processes
                .iter()
                .filter(|(_, p)| !p.retired)
                .map(|(pid, _)| *pid)
                .collect();
            if let Err(err) = self.sampler.set_targets(&targets) {
                warn!("cannot update the target map: {err:#}");
            }
        }
    }

    /// Named pids that do not exist are a mistake when nothing else could
    /// match; a selection that matches nothing yet waits for processes.
    fn check_first_scan(&self) -> anyhow::Result<()> {
        let selector = &self.config.selector;
        let missing: Vec<String> = selector
            .pids
            .iter()
            .filter(|pid| !self.processes.contains_key(pid))
            .map(u32::to_string)
            .collect();
        let only_pids = selector.name.is_none() && selector.cgroup.is_none();
        if !missing.is_empty() && only_pids {
            let list = missing.join(", ");
            if self.processes.is_empty() {
                anyhow::bail!("no process with pid {list}");
            }
            warn!("no process with pid {list}; sampling the others");
        } else if self.processes.is_empty() && !selector.host {
            info!("no process matches yet; waiting for one");
        }
        Ok(())
    }

    fn count_episodes(&mut self) {
        for event in self.loop_events.drain(..) {
            if event.kind != loop_event::EPISODE {
                continue;
            }
            if let Some(process) = self.processes.get_mut(&event.pid) {
                process.episodes += 1;
            }
        }
    }

    fn update_metrics(&self) {
        let stats = self.sampler.stats();
        let histogram = self
            .sampler
            .tracks_event_loop()
            .then(|| self.sampler.loop_histogram().ok())
            .flatten();
        let cpu_s = procfs::cpu_time_s(self.own_pid);
        let rss = procfs::rss_bytes(self.own_pid);
        self.metrics.update(|s| {
            if let Ok(stats) = stats {
                s.kernel = stats;
            }
            if let Some(histogram) = histogram {
                s.loop_histogram = histogram;
            }
            s.cpu_s = cpu_s.unwrap_or(s.cpu_s);
            s.rss_bytes = rss.unwrap_or(s.rss_bytes);
        });
    }

    /// Ends the interval under way: one profile per process with samples.
    fn cut(&mut self) {
        let end = SystemTime::now();
        let start = std::mem::replace(&mut self.interval_start, end);
        let cut_started = Instant::now();
        let raw = match self.sampler.take_counts() {
            Ok(raw) => raw,
            Err(err) => {
                warn!("cannot read the samples of the interval: {err:#}");
                return;
            }
        };
        self.sampler.drain_loop_events(&mut self.loop_events);
        self.count_episodes();
        if self.symbolizer_stale {
            self.symbolizer = Symbolizer::new();
            self.symbolizer_stale = false;
        }

        let mut by_pid: BTreeMap<u32, Vec<(SampleKey, u64)>> = BTreeMap::new();
        for (key, count) in &raw.counts {
            by_pid.entry(key.pid).or_default().push((*key, *count));
        }
        let (from_s, until_s) = (unix_s(start), unix_s(end));
        let mut written = 0;
        let active: HashSet<u32> = by_pid.keys().copied().collect();
        for (pid, counts) in by_pid {
            if pid == self.own_pid {
                continue;
            }
            let process = match self.processes.entry(pid) {
                Entry::Occupied(known) => known.into_mut(),
                // Seen in samples before the scan found it, or host mode.
                Entry::Vacant(new) => match Process::new(pid) {
                    Some(process) => new.insert(process),
                    None => {
                        debug!("pid {pid} left before its samples could be named; skipped");
                        continue;
                    }
                },
            };
            if !process.retired {
                refresh(process, &mut self.sampler);
            }
            self.write_process(&raw, &counts, pid, (from_s, until_s));
            written += 1;
        }
        for (pid, process) in &mut self.processes {
            process.episodes = 0;
            process.active = active.contains(pid);
        }

        let keep: HashSet<u64> = raw.stacks.keys().copied().collect();
        match self.sampler.prune(&keep) {
            Ok(pruned) => self.metrics.update(|s| s.stacks_pruned += pruned as u64),
            Err(err) => debug!("pruning the kernel maps failed: {err:#}"),
        }
        self.drop_retired();
        let removed = self
            .store
            .enforce_retention(self.config.max_age, self.config.max_bytes);
        if removed > 0 {
            debug!("retention removed {removed} intervals");
        }
        self.metrics.update(|s| s.intervals += 1);
        self.update_metrics();
        debug!(
            "interval {} to {}: {written} profiles in {:.0} ms",
            store::compact_utc(from_s),
            store::compact_utc(until_s),
            cut_started.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// Symbolizes, writes and queues the profile of one process.
    fn write_process(
        &mut self,
        raw: &RawProfile,
        counts: &[(SampleKey, u64)],
        pid: u32,
        (from_s, until_s): (f64, f64),
    ) {
        // Read again each interval: the file grows as code is compiled.
        let perf_map = self
            .processes
            .get_mut(&pid)
            .and_then(|p| p.perf_map.as_mut())
            .and_then(|file| {
                file.read()
                    .map_err(|err| debug!("pid {pid}: {err}; JIT frames are unnamed"))
                    .ok()
            });
        let process = &self.processes[&pid];
        let own = RawProfile {
            counts: counts.to_vec(),
            stacks: counts
                .iter()
                .flat_map(|(key, _)| [key.user_stack_id, key.kernel_stack_id])
                .filter_map(|id| raw.stacks.get(&id).map(|frames| (id, frames.clone())))
                .collect(),
            threads: BTreeMap::new(),
            missing_stacks: 0,
        };
        let empty = AddressSpace::new(pid);
        let resolved = ResolvedStacks::resolve(
            &self.symbolizer,
            &own,
            &ProcessSymbols {
                space: process.space.as_ref().unwrap_or(&empty),
                perf_map: perf_map.as_ref(),
            },
        );
        let thread_names = procfs::thread_names(pid);
        let profile = resolved.profile(counts, &raw.threads, &thread_names);
        let folded = profile.folded(true);
        let samples = profile.total();
        let lost: u64 = counts
            .iter()
            .filter(|(key, _)| key.user_stack_id == STACK_LOST)
            .map(|(_, n)| n)
            .sum();

        let mut pprof_gz = Vec::new();
        let meta = crate::output::pprof::Meta {
            frequency_hz: self.config.frequency_hz,
            start_unix_ns: (from_s * 1e9) as i64,
            duration_ns: ((until_s - from_s) * 1e9) as i64,
            comment: &format!(
                "profiler daemon: {} (pid {pid})",
                process.info.command_line()
            ),
        };
        if let Err(err) = crate::output::pprof::write(&profile, &meta, &mut pprof_gz) {
            warn!("cannot encode the profile of pid {pid}: {err:#}");
            return;
        }

        let entry = store::Entry {
            service: process.service.clone(),
            name: process.info.comm.clone(),
            pid,
            cgroup: process.cgroup.clone(),
            start: crate::event_loop::rfc3339(from_s),
            start_unix_s: (from_s * 1000.0).round() / 1000.0,
            duration_s: ((until_s - from_s) * 1000.0).round() / 1000.0,
            frequency_hz: self.config.frequency_hz,
            samples,
            episodes: process.episodes,
            folded: String::new(),
            pprof: String::new(),
        };
        let written = self.store.write(Interval {
            entry,
            folded: &folded,
            pprof_gz: &pprof_gz,
        });
        match written {
            Ok(()) => {
                if self.write_failing {
                    info!("writing profiles works again");
                    self.write_failing = false;
                }
            }
            Err(err) => {
                self.metrics.update(|s| s.write_errors += 1);
                if !self.write_failing {
                    warn!(
                        "{err:#}; sampling goes on, and profiles are written again once there is room"
                    );
                    self.write_failing = true;
                }
            }
        }

        if let Some((queue, config)) = &self.push {
            let app_name = config
                .lock()
                .unwrap()
                .app_name
                .clone()
                .unwrap_or_else(|| process.info.comm.clone());
            let mut labels = BTreeMap::from([
                ("pid".to_owned(), pid.to_string()),
                ("process".to_owned(), process.info.comm.clone()),
                ("service".to_owned(), process.service.clone()),
            ]);
            if let Some(cgroup) = &process.cgroup {
                labels.insert("cgroup".to_owned(), cgroup.clone());
            }
            if let Some(host) = hostname() {
                labels.insert("hostname".to_owned(), host);
            }
            queue.push(Upload {
                app_name,
                labels,
                from_unix_s: from_s.floor() as u64,
                until_unix_s: until_s.ceil() as u64,
                frequency_hz: self.config.frequency_hz,
                pprof_gz,
            });
        }

        let (service, name, cgroup, episodes) = (
            process.service.clone(),
            process.info.comm.clone(),
            process.cgroup.clone().unwrap_or_default(),
            process.episodes,
        );
        self.metrics.update(|s| {
            let target = s.targets.entry(pid).or_default();
            target.service = service;
            target.name = name;
            target.cgroup = cgroup;
            target.samples += samples;
            target.lost_samples += lost;
            target.episodes += episodes;
        });
    }

    /// Forgets processes that have exited or are no longer selected, once
    /// their last interval is written.
    fn drop_retired(&mut self) {
        let retired: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| p.retired)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in retired {
            let process = self.processes.remove(&pid).expect("listed above");
            if let Err(err) = self.sampler.forget_process(pid) {
                debug!("cannot forget pid {pid} in the kernel maps: {err:#}");
            }
            self.metrics.update(|s| {
                s.targets.remove(&pid);
            });
            if !self.config.selector.host {
                info!("pid {pid} ({}) is no longer sampled", process.info.comm);
            }
            self.symbolizer_stale = true;
        }
        for process in self.processes.values_mut() {
            if let Some(space) = process.space.as_mut()
                && let Err(err) = space.forget_unmapped()
            {
                debug!("pid {}: {err}", space.pid());
            }
        }
    }

    /// Reads the config file again. An interval is cut first, so that each
    /// interval has one configuration; a bad file keeps the running one.
    fn reload(&mut self) {
        let new = match Config::load(&self.args) {
            Ok(new) => new,
            Err(err) => {
                warn!("{err:#}; keeping the running configuration");
                return;
            }
        };
        info!("reloading the configuration");
        self.cut();

        if self.config.needs_reload(&new) {
            match load_sampler(&new) {
                Ok(sampler) => {
                    self.sampler.detach();
                    self.sampler = sampler;
                    // New maps: every process's tables are loaded again.
                    for process in self.processes.values_mut() {
                        if let Some(space) = process.space.as_mut() {
                            *space = AddressSpace::new(space.pid());
                        }
                    }
                    if let Err(err) = self.sampler.attach(new.frequency_hz) {
                        warn!("{err:#}");
                    }
                }
                Err(err) => {
                    warn!(
                        "cannot load the eBPF program for the new configuration ({err:#}); keeping the running one"
                    );
                    return;
                }
            }
        }
        if new.output != self.config.output {
            match Store::open(&new.output) {
                Ok(store) => self.store = store,
                Err(err) => warn!("{err:#}; profiles stay in {}", self.store.dir().display()),
            }
        }
        if new.metrics_addr != self.config.metrics_addr {
            warn!("the metrics address changes at the next restart");
        }
        self.set_push(new.push.clone());
        for (pid, process) in &mut self.processes {
            let cgroup = process.cgroup.as_deref();
            if !new.selector.matches(*pid, &process.info.comm, cgroup) {
                process.retired = true;
            }
        }
        self.config = new;
        self.drop_retired();
        self.scan();
        info!(
            "now sampling {} at {} Hz",
            self.config.selector.describe(),
            self.config.frequency_hz
        );
    }

    /// Starts, reconfigures or stops pushing.
    fn set_push(&mut self, push: Option<PushConfig>) {
        match (push, &self.push) {
            (Some(new), Some((queue, config))) => {
                queue.set_capacity(new.queue);
                *config.lock().unwrap() = new;
            }
            (Some(new), None) => {
                info!("pushing profiles to {}/ingest", new.url);
                let queue = Queue::new(new.queue, self.metrics.clone());
                let config = Arc::new(Mutex::new(new));
                tokio::spawn(push::run(queue.clone(), config.clone()));
                self.push = Some((queue, config));
            }
            (None, Some(_)) => {
                info!("no longer pushing profiles");
                // The task stays, idle with an empty queue.
                self.push = None;
            }
            (None, None) => {}
        }
    }
}

/// Reads new mappings of a process, loads their unwind tables, and opens
/// its perf map once it appears.
fn refresh(process: &mut Process, sampler: &mut Sampler) {
    let Some(space) = process.space.as_mut() else {
        return;
    };
    match space.refresh() {
        Ok(true) => {
            if let Err(err) = sampler.load_unwind_tables(space) {
                debug!("pid {}: loading unwind tables failed: {err:#}", space.pid());
            }
        }
        Ok(false) => {}
        Err(err) => debug!("pid {}: cannot read mappings: {err}", space.pid()),
    }
    if process.perf_map.is_none() {
        process.perf_map = attach::open_perf_map(&process.info);
    }
}

fn load_sampler(config: &Config) -> anyhow::Result<Sampler> {
    Sampler::load(&SamplerConfig {
        pids: Vec::new(),
        sample_all: config.selector.host,
        stack_entries: profiler_common::DEFAULT_STACK_ENTRIES,
        event_loop_threshold_ns: config.block_threshold_ns,
        unwind_rows: config.unwind_rows,
    })
}

/// Time until the next multiple of `interval` since the Unix epoch, so that
/// intervals of all hosts line up.
fn time_to_next_cut(now: SystemTime, interval: Duration) -> Duration {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let interval_ns = interval.as_nanos().max(1);
    let into = since_epoch.as_nanos() % interval_ns;
    Duration::from_nanos((interval_ns - into) as u64)
}

fn unix_s(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// A host-wide daemon holds a file open per mapped binary of each sampled
/// process; the soft limit is raised to the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                debug!("open-file limit raised to {}", limit.rlim_max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_line_up_with_multiples_of_the_interval() {
        let at = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        let minute = Duration::from_secs(60);
        assert_eq!(time_to_next_cut(at(120, 0), minute), minute);
        assert_eq!(
            time_to_next_cut(at(150, 500), minute),
            Duration::from_millis(29_500)
        );
        let ten = Duration::from_secs(10);
        assert_eq!(time_to_next_cut(at(1009, 0), ten), Duration::from_secs(1));
    }
}
