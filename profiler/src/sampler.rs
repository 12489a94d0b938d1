//! Loads the eBPF program, attaches it to a `cpu-clock` event on every
//! online CPU, and reads back what it aggregated in its maps.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet};

use anyhow::{Context as _, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        FEntry, FExit, PerfEvent, Program, RawTracePoint,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
    },
    util::online_cpus,
};
use log::{debug, warn};
use std::os::{
    fd::{AsFd as _, AsRawFd as _},
    unix::fs::MetadataExt as _,
};

use crate::{
    mappings::{AddressSpace, Mapping},
    unwind,
};
use profiler_common::{
    HIST_BUCKETS, HIST_GROUPS, LoopEvent, LoopThread, MAX_UNWIND_MAPPINGS, NO_STACK, ProcUnwind,
    ROW_CACHE_ENTRIES, RowCacheEntry, STACK_LOST, SampleKey, Stack, TASK_COMM_LEN, ThreadInfo,
    UnwindMapping, UnwindRow, stat,
};

/// The eBPF object, built by `build.rs` and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// The two counts maps, by the slot value that selects them.
const COUNTS_MAPS: [&str; 2] = ["COUNTS", "COUNTS_ALT"];

/// What to sample.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// Thread-group ids to sample; empty with `sample_all` set.
    pub pids: Vec<u32>,
    pub sample_all: bool,
    /// Capacity of the stack-trace map, in distinct stacks.
    pub stack_entries: u32,
    /// Track event-loop iterations, with this blocking threshold.
    pub event_loop_threshold_ns: Option<u64>,
    /// Capacity of the unwind-row array; 0 walks every stack by frame
    /// pointer.
    pub unwind_rows: u32,
}

/// Counters kept by the eBPF program, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub samples: u64,
    pub other_task_ticks: u64,
    pub user_stack_errors: u64,
    pub kernel_stack_errors: u64,
    pub counts_map_full: u64,
    pub threads_map_full: u64,
    pub loop_events_lost: u64,
    pub loop_threads_full: u64,
    pub loop_iterations: u64,
    pub loop_max_ns: u64,
    pub table_walks: u64,
    pub row_lookups: u64,
    pub row_cache_hits: u64,
}

/// Everything the eBPF program gathered, copied out of its maps.
#[derive(Debug, Default)]
pub struct RawProfile {
    pub counts: Vec<(SampleKey, u64)>,
    /// Stack id → addresses, leaf first.
    pub stacks: StdHashMap<u64, Vec<u64>>,
    /// Thread id → (pid, name) as seen by the eBPF program.
    pub threads: BTreeMap<u32, (u32, String)>,
    /// Stack ids referenced by a count whose stack could not be read back.
    pub missing_stacks: u64,
}

/// A loaded, attached profiler program.
pub struct Sampler {
    ebpf: Ebpf,
    links: Vec<PerfEventLinkId>,
    /// Which of `COUNTS_MAPS` new samples go to.
    counts_slot: u32,
    /// Present while event-loop tracking is on.
    loop_events: Option<RingBuf<MapData>>,
    loop_probe: Option<LoopProbe>,
    unwind: UnwindState,
}

/// Unwind tables loaded into the kernel side so far.
#[derive(Default)]
struct UnwindState {
    /// Next free slot of the row array, and its size.
    next_row: u32,
    capacity: u32,
    /// Binaries by (device, inode): their rows and segments, or `None` if
    /// they have no usable table.
    files: StdHashMap<(u64, u64), Option<LoadedTable>>,
    /// What each process's entry holds now.
    procs: StdHashMap<u32, Vec<UnwindMapping>>,
    /// Ranges of rows freed by binaries no process maps any more.
    free: Vec<(u32, u32)>,
    /// End of the highest rows ever written: rows given out below it
    /// replace others, and the kernel's row cache must forget those.
    high_water: u32,
}

impl UnwindState {
    /// Room for `len` rows: the first freed range that fits, else the end.
    fn allocate(&mut self, len: u32) -> Option<u32> {
        if let Some(i) = self.free.iter().position(|&(_, free)| free >= len) {
            let (start, free) = self.free[i];
            if free == len {
                self.free.swap_remove(i);
            } else {
                self.free[i] = (start + len, free - len);
            }
            return Some(start);
        }
        let start = self.next_row;
        if start.saturating_add(len) > self.capacity {
            return None;
        }
        self.next_row = start + len;
        Some(start)
    }

    /// Frees the rows of binaries that no process entry points at, and that
    /// are not among `in_use`, so that a long run over changing processes
    /// does not fill the array.
    fn release_unused(&mut self, in_use: &[u32]) {
        let used: std::collections::HashSet<u32> = self
            .procs
            .values()
            .flatten()
            .map(|m| m.rows_start)
            .chain(in_use.iter().copied())
            .collect();
        let free = &mut self.free;
        self.files.retain(|_, table| match table {
            Some(t) if !used.contains(&t.rows_start) => {
                free.push((t.rows_start, t.rows_len));
                false
            }
            _ => true,
        });
        // Merge neighbours, and give a range at the end back to the end.
        self.free.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.free.len());
        for &(start, len) in &self.free {
            match merged.last_mut() {
                Some((last, last_len)) if *last + *last_len == start => *last_len += len,
                _ => merged.push((start, len)),
            }
        }
        if let Some(&(start, len)) = merged.last()
            && start + len == self.next_row
        {
            self.next_row = start;
            merged.pop();
        }
        self.free = merged;
    }
}

struct LoadedTable {
    rows_start: u32,
    rows_len: u32,
    segments: Vec<unwind::Segment>,
}

/// What loading unwind tables for a process did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct UnwindLoad {
    /// Executable mappings walked with tables.
    pub mappings: usize,
    /// Rows in the kernel's row array, over all binaries.
    pub rows: u32,
}

impl Sampler {
    /// Loads the program into the kernel and fills the target map.
    pub fn load(config: &SamplerConfig) -> anyhow::Result<Self> {
        let sample_all = u8::from(config.sample_all);
        let threshold_ns = config.event_loop_threshold_ns.unwrap_or(u64::MAX);
        // The kernel's BTF, to attach the epoll-wait probes, is parsed on
        // another thread while the kernel verifies the sampling program.
        let btf = config
            .event_loop_threshold_ns
            .map(|_| std::thread::spawn(Btf::from_sys_fs));
        let mut ebpf = EbpfLoader::new()
            .override_global("SAMPLE_ALL", &sample_all, true)
            .override_global("BLOCK_THRESHOLD_NS", &threshold_ns, true)
            .map_max_entries("STACKS", config.stack_entries)
            .map_max_entries("UNWIND_ROWS", config.unwind_rows.max(1))
            .load(EBPF_OBJECT)
            .map_err(|err| explain_bpf_error(anyhow::Error::new(err)))
            .context("cannot load the eBPF program")?;

        {
            let mut targets: HashMap<&mut MapData, u32, u8> =
                HashMap::try_from(ebpf.map_mut("TARGETS").context("map TARGETS is missing")?)?;
            for &pid in &config.pids {
                targets
                    .insert(pid, 1, 0)
                    .with_context(|| format!("cannot add pid {pid} to the target map"))?;
            }
        }

        let program: &mut PerfEvent = ebpf
            .program_mut("profile")
            .context("program `profile` is missing from the eBPF object")?
            .try_into()?;
        program
            .load()
            .map_err(|err| explain_bpf_error(anyhow::Error::new(err)))
            .context("the kernel refused the eBPF program")?;

        let (loop_probe, loop_events) = match btf {
            Some(btf) => {
                let btf = btf
                    .join()
                    .map_err(|_| anyhow!("reading the kernel's BTF panicked"))?
                    .context("cannot read the kernel's BTF");
                load_loop_programs(&mut ebpf, btf)?.unzip()
            }
            None => (None, None),
        };

        Ok(Self {
            ebpf,
            links: Vec::new(),
            counts_slot: 0,
            loop_events,
            loop_probe,
            unwind: UnwindState {
                capacity: config.unwind_rows,
                ..UnwindState::default()
            },
        })
    }

    /// Loads the unwind tables of the binaries `space` maps, those not
    /// loaded yet, and points the process's entry at them. A binary whose
    /// table cannot be built or does not fit is walked by frame pointer.
    pub fn load_unwind_tables(&mut self, space: &AddressSpace) -> anyhow::Result<UnwindLoad> {
        // No room for rows: every stack is walked by frame pointer.
        if self.unwind.capacity == 0 {
            return Ok(UnwindLoad::default());
        }
        let mut chosen: Vec<UnwindMapping> = Vec::new();
        for mapping in space.mappings().iter().rev() {
            if !mapping.is_file() || chosen.len() >= MAX_UNWIND_MAPPINGS {
                continue;
            }
            let overlaps = chosen
                .iter()
                .any(|m| m.start < mapping.end && mapping.start < m.end);
            let Some(file) = mapping.file.as_ref() else {
                continue;
            };
            if overlaps {
                continue;
            }
            let meta = file.metadata()?;
            let key = (meta.dev(), meta.ino());
            if !self.unwind.files.contains_key(&key) {
                // The tables chosen so far are not in the process's entry
                // yet: they must not be freed to make room for this one.
                let in_use: Vec<u32> = chosen.iter().map(|m| m.rows_start).collect();
                let loaded = self.load_table(mapping, space.pid(), &in_use);
                self.unwind.files.insert(key, loaded);
            }
            let Some(Some(table)) = self.unwind.files.get(&key) else {
                continue;
            };
            let Some(bias) = unwind::load_bias(&table.segments, mapping.start, mapping.file_offset)
            else {
                continue;
            };
            chosen.push(UnwindMapping {
                start: mapping.start,
                end: mapping.end,
                bias,
                rows_start: table.rows_start,
                rows_len: table.rows_len,
            });
        }

        let pid = space.pid();
        if self.unwind.procs.get(&pid) != Some(&chosen) && !chosen.is_empty() {
            let mut entry = ProcUnwind {
                count: chosen.len() as u32,
                _pad: 0,
                mappings: [UnwindMapping::default(); MAX_UNWIND_MAPPINGS],
            };
            entry.mappings[..chosen.len()].copy_from_slice(&chosen);
            let mut procs: HashMap<&mut MapData, u32, ProcUnwind> = HashMap::try_from(
                self.ebpf
                    .map_mut("PROC_UNWIND")
                    .context("map PROC_UNWIND is missing")?,
            )?;
            procs.insert(pid, entry, 0)?;
            self.unwind.procs.insert(pid, chosen.clone());
        }
        Ok(UnwindLoad {
            mappings: chosen.len(),
            rows: self.unwind.next_row,
        })
    }

    /// Writes rows to the row array from index `start`: in batches of one
    /// syscall each where the kernel supports it, else one row at a time.
    fn write_rows(&mut self, start: u32, rows: &[UnwindRow]) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut("UNWIND_ROWS")
            .context("map UNWIND_ROWS is missing")?;
        let aya::maps::Map::Array(data) = &*map else {
            anyhow::bail!("map UNWIND_ROWS is not an array");
        };
        let fd = data.fd().as_fd().as_raw_fd();
        match update_batch(fd, start, rows) {
            Ok(()) => return Ok(()),
            Err(err) => debug!("batched map update failed ({err}); writing rows one by one"),
        }
        let mut array: Array<&mut MapData, UnwindRow> = Array::try_from(map)?;
        for (i, row) in rows.iter().enumerate() {
            array.set(start + i as u32, row, 0)?;
        }
        Ok(())
    }

    /// Builds one binary's table and writes it to the row array.
    fn load_table(&mut self, mapping: &Mapping, pid: u32, in_use: &[u32]) -> Option<LoadedTable> {
        let path = mapping.readable_path(pid)?;
        // Mapped, not read: only the headers and the CFI sections are paged
        // in, not the whole of a 100 MB binary.
        let data = std::fs::File::open(&path)
            // SAFETY: the map is read-only and dropped before this function
            // returns; a binary truncated meanwhile can fault the read, which
            // the held-open file of a running program makes unlikely.
            .and_then(|file| unsafe { memmap2::Mmap::map(&file) })
            .map_err(|err| debug!("cannot map {}: {err}", mapping.path))
            .ok()?;
        let table = match unwind::UnwindTable::compile(&data) {
            Ok(table) => table,
            Err(err) => {
                debug!("no unwind table for {}: {err}", mapping.path);
                return None;
            }
        };
        let segments = unwind::segments(&data).ok()?;
        let rows = table.kernel_rows();
        let rows_len = u32::try_from(rows.len()).ok()?;
        // Tables of binaries no process maps any more are kept, in case the
        // next process maps them too, until their room is needed.
        let allocated = self.unwind.allocate(rows_len).or_else(|| {
            self.unwind.release_unused(in_use);
            self.unwind.allocate(rows_len)
        });
        let Some(rows_start) = allocated else {
            warn!(
                "the unwind-row array is full ({} rows); {} is walked by frame pointer. \
                 A larger --unwind-rows makes room",
                self.unwind.capacity, mapping.path
            );
            return None;
        };
        // No process points at reused rows yet, so once the cache is clear
        // no lookup can bring back a row of the binary they held before.
        if rows_start < self.unwind.high_water
            && let Err(err) = self.clear_row_cache()
        {
            warn!(
                "cannot clear the row cache ({err:#}); {} is walked by frame pointer",
                mapping.path
            );
            self.unwind.free.push((rows_start, rows_len));
            return None;
        }
        self.unwind.high_water = self.unwind.high_water.max(rows_start + rows_len);
        if let Err(err) = self.write_rows(rows_start, &rows) {
            warn!(
                "cannot write unwind rows for {}: {err:#}; ignoring",
                mapping.path
            );
            self.unwind.free.push((rows_start, rows_len));
            return None;
        }
        debug!("{}: {rows_len} unwind rows at {rows_start}", mapping.path);
        Some(LoadedTable {
            rows_start,
            rows_len,
            segments,
        })
    }

    /// Empties every CPU's cache of row lookups.
    fn clear_row_cache(&mut self) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
        let mut cache: PerCpuArray<&mut MapData, RowCacheEntry> = PerCpuArray::try_from(
            self.ebpf
                .map_mut("ROW_CACHE")
                .context("map ROW_CACHE is missing")?,
        )?;
        for slot in 0..ROW_CACHE_ENTRIES {
            let empty = PerCpuValues::try_from(vec![RowCacheEntry::default(); cpus])?;
            cache.set(slot, empty, 0)?;
        }
        debug!("cleared the row cache: unwind rows are reused");
        Ok(())
    }

    /// Whether event-loop iterations are being tracked.
    pub fn tracks_event_loop(&self) -> bool {
        self.loop_events.is_some()
    }

    /// How event-loop iterations are cut, when they are tracked.
    pub fn loop_probe(&self) -> Option<LoopProbe> {
        self.loop_probe
    }

    /// Moves the loop events sent so far into `out`.
    pub fn drain_loop_events(&mut self, out: &mut Vec<LoopEvent>) {
        let Some(ring) = self.loop_events.as_mut() else {
            return;
        };
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<LoopEvent>() {
                // SAFETY: the kernel side writes whole `LoopEvent`s, a Pod
                // type; the read is unaligned-safe.
                out.push(unsafe { item.as_ptr().cast::<LoopEvent>().read_unaligned() });
            }
        }
    }

    /// Loop-iteration counts per histogram bucket, summed over CPUs: main
    /// threads' buckets, then the other threads'.
    pub fn loop_histogram(&self) -> anyhow::Result<Vec<u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("LOOP_HIST")
                .context("map LOOP_HIST is missing")?,
        )?;
        (0..HIST_BUCKETS * HIST_GROUPS)
            .map(|bucket| Ok(map.get(&bucket, 0)?.iter().sum()))
            .collect()
    }

    /// The event-loop state of every tracked thread.
    pub fn loop_threads(&self) -> anyhow::Result<Vec<(u32, LoopThread)>> {
        let map: HashMap<&MapData, u32, LoopThread> = HashMap::try_from(
            self.ebpf
                .map("LOOP_THREADS")
                .context("map LOOP_THREADS is missing")?,
        )?;
        map.iter()
            .map(|entry| entry.context("cannot read the loop-thread map"))
            .collect()
    }

    /// Starts sampling on every online CPU.
    pub fn attach(&mut self, frequency_hz: u64) -> anyhow::Result<()> {
        let cpus = online_cpus().map_err(|(path, err)| anyhow!("cannot read {path}: {err}"))?;
        let program: &mut PerfEvent = self
            .ebpf
            .program_mut("profile")
            .context("program `profile` is missing")?
            .try_into()?;
        for cpu in cpus {
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(frequency_hz),
                    false,
                )
                .map_err(|err| explain_bpf_error(anyhow::Error::new(err)))
                .with_context(|| format!("cannot open a cpu-clock perf event on CPU {cpu}"))?;
            self.links.push(link);
        }
        debug!("sampling at {frequency_hz} Hz on {} CPUs", self.links.len());
        Ok(())
    }

    /// Stops sampling; the maps stay readable.
    pub fn detach(&mut self) {
        let Ok(program) = self
            .ebpf
            .program_mut("profile")
            .map(<&mut PerfEvent>::try_from)
            .transpose()
        else {
            return;
        };
        if let Some(program) = program {
            for link in self.links.drain(..) {
                if let Err(err) = program.detach(link) {
                    debug!("detaching a perf event failed: {err}");
                }
            }
        }
    }

    /// Current counters, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("map STATS is missing")?)?;
        let sum = |slot: u32| -> anyhow::Result<u64> { Ok(map.get(&slot, 0)?.iter().sum()) };
        let max = |slot: u32| -> anyhow::Result<u64> {
            Ok(map.get(&slot, 0)?.iter().copied().max().unwrap_or(0))
        };
        Ok(Stats {
            samples: sum(stat::SAMPLES)?,
            other_task_ticks: sum(stat::OTHER_TASK)?,
            user_stack_errors: sum(stat::USER_STACK_ERRORS)?,
            kernel_stack_errors: sum(stat::KERNEL_STACK_ERRORS)?,
            counts_map_full: sum(stat::COUNTS_FULL)?,
            threads_map_full: sum(stat::THREADS_FULL)?,
            loop_events_lost: sum(stat::LOOP_EVENTS_LOST)?,
            loop_threads_full: sum(stat::LOOP_THREADS_FULL)?,
            loop_iterations: sum(stat::LOOP_ITERATIONS)?,
            loop_max_ns: max(stat::LOOP_MAX_NS)?,
            table_walks: sum(stat::TABLE_WALKS)?,
            row_lookups: sum(stat::ROW_LOOKUPS)?,
            row_cache_hits: sum(stat::ROW_CACHE_HITS)?,
        })
    }

    /// Copies the counts, the stacks they reference and the thread names.
    pub fn collect(&self) -> anyhow::Result<RawProfile> {
        let mut raw = RawProfile {
            counts: self.read_counts(COUNTS_MAPS[self.counts_slot as usize])?,
            ..RawProfile::default()
        };
        self.complete(&mut raw)?;
        Ok(raw)
    }

    /// Sends new samples to the other counts map, and takes what the one
    /// filled so far holds, leaving it empty: consecutive calls cut the
    /// sample stream into intervals that neither overlap nor miss a sample.
    pub fn take_counts(&mut self) -> anyhow::Result<RawProfile> {
        let old = self.counts_slot;
        let new = 1 - old;
        {
            let mut slot: Array<&mut MapData, u32> = Array::try_from(
                self.ebpf
                    .map_mut("COUNTS_SLOT")
                    .context("map COUNTS_SLOT is missing")?,
            )?;
            slot.set(0, new, 0)?;
        }
        self.counts_slot = new;
        // A program run that read the old slot just before the switch may
        // still be counting into the old map; runs take microseconds.
        std::thread::sleep(std::time::Duration::from_millis(2));

        let name = COUNTS_MAPS[old as usize];
        let counts = self.read_counts(name)?;
        let mut map: HashMap<&mut MapData, SampleKey, u64> = HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .with_context(|| format!("map {name} is missing"))?,
        )?;
        for (key, _) in &counts {
            if let Err(err) = map.remove(key) {
                debug!("cannot clear a count from {name}: {err}");
            }
        }
        let mut raw = RawProfile {
            counts,
            ..RawProfile::default()
        };
        self.complete(&mut raw)?;
        Ok(raw)
    }

    /// Processes with samples in the counts map being filled now.
    pub fn sampled_pids(&self) -> anyhow::Result<HashSet<u32>> {
        let name = COUNTS_MAPS[self.counts_slot as usize];
        let map: HashMap<&MapData, SampleKey, u64> = HashMap::try_from(
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} is missing"))?,
        )?;
        Ok(map
            .keys()
            .filter_map(Result::ok)
            .map(|key| key.pid)
            .collect())
    }

    fn read_counts(&self, name: &str) -> anyhow::Result<Vec<(SampleKey, u64)>> {
        let map: HashMap<&MapData, SampleKey, u64> = HashMap::try_from(
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} is missing"))?,
        )?;
        let mut counts = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("cannot read the counts map")?;
        counts.sort_unstable();
        Ok(counts)
    }

    /// Adds the stacks the counts reference and the thread names.
    fn complete(&self, raw: &mut RawProfile) -> anyhow::Result<()> {
        let stacks: HashMap<&MapData, u64, Stack> =
            HashMap::try_from(self.ebpf.map("STACKS").context("map STACKS is missing")?)?;
        let threads: HashMap<&MapData, u32, ThreadInfo> =
            HashMap::try_from(self.ebpf.map("THREADS").context("map THREADS is missing")?)?;

        for (key, count) in &raw.counts {
            for id in [key.user_stack_id, key.kernel_stack_id] {
                if id == NO_STACK || id == STACK_LOST || raw.stacks.contains_key(&id) {
                    continue;
                }
                match stacks.get(&id, 0) {
                    Ok(stack) => {
                        let len = (stack.len as usize).min(stack.ips.len());
                        raw.stacks.insert(id, stack.ips[..len].to_vec());
                    }
                    Err(err) => {
                        debug!("stack {id} is unreadable: {err}");
                        raw.missing_stacks += count;
                    }
                }
            }
        }

        for entry in threads.iter() {
            let (tid, info) = entry.context("cannot read the thread map")?;
            raw.threads
                .insert(tid, (info.pid, comm_to_string(&info.comm)));
        }
        Ok(())
    }

    /// Makes the target map hold exactly `pids`.
    pub fn set_targets(&mut self, pids: &BTreeSet<u32>) -> anyhow::Result<()> {
        let mut targets: HashMap<&mut MapData, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut("TARGETS")
                .context("map TARGETS is missing")?,
        )?;
        let current = targets
            .keys()
            .collect::<Result<BTreeSet<u32>, _>>()
            .context("cannot read the target map")?;
        for pid in current.difference(pids) {
            targets.remove(pid)?;
        }
        for &pid in pids.difference(&current) {
            targets
                .insert(pid, 1, 0)
                .with_context(|| format!("cannot add pid {pid} to the target map"))?;
        }
        Ok(())
    }

    /// Drops what the kernel side keeps for a process that has exited: its
    /// unwind entry. Its binaries' rows stay until their room is needed.
    pub fn forget_process(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.unwind.procs.remove(&pid).is_some() {
            let mut procs: HashMap<&mut MapData, u32, ProcUnwind> = HashMap::try_from(
                self.ebpf
                    .map_mut("PROC_UNWIND")
                    .context("map PROC_UNWIND is missing")?,
            )?;
            procs.remove(&pid)?;
        }
        Ok(())
    }

    /// Bounds the kernel maps of a long run: removes stacks that neither
    /// `keep` nor the counts being filled now refer to, and the thread
    /// entries of threads that have exited. Returns how many stacks were
    /// removed.
    pub fn prune(&mut self, keep: &HashSet<u64>) -> anyhow::Result<usize> {
        let mut keep = keep.clone();
        for (key, _) in self.read_counts(COUNTS_MAPS[self.counts_slot as usize])? {
            keep.insert(key.user_stack_id);
            keep.insert(key.kernel_stack_id);
        }
        let mut stacks: HashMap<&mut MapData, u64, Stack> = HashMap::try_from(
            self.ebpf
                .map_mut("STACKS")
                .context("map STACKS is missing")?,
        )?;
        let stale: Vec<u64> = stacks
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in &stale {
            // A stack recorded again since it was listed is removed too; its
            // sample then shows as a lost stack.
            if let Err(err) = stacks.remove(id) {
                debug!("cannot remove stack {id}: {err}");
            }
        }

        let thread_alive = |tid: u32| std::path::Path::new(&format!("/proc/{tid}")).exists();
        self.prune_threads::<ThreadInfo>("THREADS", thread_alive)?;
        self.prune_threads::<LoopThread>("LOOP_THREADS", thread_alive)?;
        Ok(stale.len())
    }

    fn prune_threads<V: aya::Pod>(
        &mut self,
        name: &str,
        alive: impl Fn(u32) -> bool,
    ) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, u32, V> = HashMap::try_from(
            self.ebpf
                .map_mut(name)
                .with_context(|| format!("map {name} is missing"))?,
        )?;
        let gone: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|&tid| !alive(tid))
            .collect();
        for tid in gone {
            if let Err(err) = map.remove(&tid) {
                debug!("cannot remove thread {tid} from {name}: {err}");
            }
        }
        Ok(())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.detach();
    }
}

/// How event-loop iterations are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopProbe {
    /// fentry and fexit on the kernel's epoll wait: only waits pay.
    EpollWait,
    /// Raw tracepoints on every syscall's entry and return: every syscall
    /// of the host pays while they are attached.
    SyscallTracepoints,
}

impl LoopProbe {
    pub fn describe(self) -> &'static str {
        match self {
            Self::EpollWait => "fentry/fexit do_epoll_wait",
            Self::SyscallTracepoints => "raw tracepoints sys_enter/sys_exit",
        }
    }
}

/// Loads and attaches the programs that cut event-loop iterations: on the
/// kernel's epoll wait where the kernel allows fentry, else on the syscall
/// tracepoints. If neither can be attached, tracking is off and the run
/// goes on without it.
///
/// The epoll-wait probes cost nothing outside epoll waits. Measured by
/// `cargo xtask bench` on a kernel that refuses them: the tracepoints add
/// a few hundred nanoseconds to a wait and about 200 ns to every other
/// syscall of the host; uprobes on libc's waits cost nothing outside the
/// target but about 25 µs per loop iteration.
fn load_loop_programs(
    ebpf: &mut Ebpf,
    btf: anyhow::Result<Btf>,
) -> anyhow::Result<Option<(LoopProbe, RingBuf<MapData>)>> {
    let probe = match btf.and_then(|btf| attach_epoll_wait_probes(ebpf, &btf)) {
        Ok(()) => LoopProbe::EpollWait,
        Err(err) => {
            debug!("cannot probe do_epoll_wait ({err:#}); using the syscall tracepoints");
            if let Err(err) = attach_syscall_tracepoints(ebpf) {
                warn!("{err:#}; event-loop tracking is off");
                return Ok(None);
            }
            LoopProbe::SyscallTracepoints
        }
    };
    debug!("event-loop tracking on {}", probe.describe());
    let map = ebpf
        .take_map("LOOP_EVENTS")
        .context("map LOOP_EVENTS is missing")?;
    Ok(Some((probe, RingBuf::try_from(map)?)))
}

/// The kernel function every epoll wait syscall calls.
const EPOLL_WAIT_FN: &str = "do_epoll_wait";

/// Attaches fentry and fexit to [`EPOLL_WAIT_FN`]; on failure, nothing
/// stays attached.
fn attach_epoll_wait_probes(ebpf: &mut Ebpf, btf: &Btf) -> anyhow::Result<()> {
    let attached = (|| -> anyhow::Result<()> {
        let enter: &mut FEntry = ebpf
            .program_mut("loop_wait_enter")
            .context("program loop_wait_enter is missing")?
            .try_into()?;
        enter.load(EPOLL_WAIT_FN, btf)?;
        enter.attach()?;
        let exit: &mut FExit = ebpf
            .program_mut("loop_wait_exit")
            .context("program loop_wait_exit is missing")?
            .try_into()?;
        exit.load(EPOLL_WAIT_FN, btf)?;
        exit.attach()?;
        Ok(())
    })();
    if attached.is_err() {
        unload(ebpf, &["loop_wait_enter", "loop_wait_exit"]);
    }
    attached
}

/// Attaches the syscall tracepoints; on failure, nothing stays attached.
fn attach_syscall_tracepoints(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    const PROGRAMS: [(&str, &str); 2] = [
        ("loop_sys_enter", "sys_enter"),
        ("loop_sys_exit", "sys_exit"),
    ];
    let attached = PROGRAMS.iter().try_for_each(|&(name, tracepoint)| {
        let program: &mut RawTracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing"))?
            .try_into()?;
        program
            .load()
            .and_then(|()| program.attach(tracepoint).map(drop))
            .with_context(|| format!("cannot trace {tracepoint}"))
    });
    if attached.is_err() {
        unload(ebpf, &PROGRAMS.map(|(name, _)| name));
    }
    attached
}

/// Unloads programs, which detaches their links.
fn unload(ebpf: &mut Ebpf, names: &[&str]) {
    for name in names {
        let unloaded = match ebpf.program_mut(name) {
            Some(Program::FEntry(program)) => program.unload(),
            Some(Program::FExit(program)) => program.unload(),
            Some(Program::RawTracePoint(program)) => program.unload(),
            _ => Ok(()),
        };
        if let Err(err) = unloaded {
            debug!("unloading {name}: {err}");
        }
    }
}

/// `BPF_MAP_UPDATE_BATCH` on an array map: consecutive keys from `start`.
fn update_batch(map_fd: i32, start: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
    /// The batch part of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const CHUNK: usize = 64 * 1024;

    for (chunk_index, chunk) in rows.chunks(CHUNK).enumerate() {
        let first = start + (chunk_index * CHUNK) as u32;
        let keys: Vec<u32> = (first..first + chunk.len() as u32).collect();
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map_fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at `keys` and `chunk`, both alive and of
        // `count` elements for the duration of the call; the kernel only
        // reads them, and writes back `count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if attr.count as usize != chunk.len() {
            return Err(std::io::Error::other(
                "the kernel updated only part of a batch",
            ));
        }
    }
    Ok(())
}

fn comm_to_string(comm: &[u8; TASK_COMM_LEN]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Adds the fix to errors whose cause is a missing privilege or feature.
fn explain_bpf_error(err: anyhow::Error) -> anyhow::Error {
    let io = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<std::io::Error>());
    match io.and_then(std::io::Error::raw_os_error) {
        Some(libc::EPERM | libc::EACCES) => err.context(
            "permission denied: run as root, or grant CAP_BPF and CAP_PERFMON \
             (e.g. `sudo setcap cap_bpf,cap_perfmon+ep profiler`)",
        ),
        Some(libc::ENOSYS) => err.context("this kernel has no BPF support (CONFIG_BPF_SYSCALL)"),
        Some(libc::ENOENT | libc::EOPNOTSUPP) => {
            err.context("this kernel cannot sample the cpu-clock software event")
        }
        _ => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows_start: u32, rows_len: u32) -> Option<LoadedTable> {
        Some(LoadedTable {
            rows_start,
            rows_len,
            segments: Vec::new(),
        })
    }

    #[test]
    fn rows_of_unmapped_binaries_are_reused_once_room_runs_out() {
        let mut state = UnwindState {
            capacity: 100,
            ..UnwindState::default()
        };
        let a = state.allocate(40).unwrap();
        let b = state.allocate(30).unwrap();
        let c = state.allocate(20).unwrap();
        assert_eq!((a, b, c), (0, 40, 70));
        state.files.insert((1, 1), table(a, 40));
        state.files.insert((1, 2), table(b, 30));
        state.files.insert((1, 3), table(c, 20));
        let mapping = |rows_start| UnwindMapping {
            rows_start,
            ..UnwindMapping::default()
        };
        // Only the middle binary is still mapped.
        state.procs.insert(7, vec![mapping(b)]);
        assert_eq!(state.allocate(50), None);

        state.release_unused(&[]);

        assert_eq!(state.files.len(), 1);
        // The end range went back to the end; the first is reusable.
        assert_eq!(state.next_row, 70);
        assert_eq!(state.allocate(35), Some(0));
        assert_eq!(state.allocate(30), Some(70));
        assert_eq!(state.allocate(6), None);
        assert_eq!(state.allocate(5), Some(35));
    }

    /// A process that maps a known binary and a new one, when the array is
    /// full: the known binary's table, chosen for the process but not yet
    /// in its entry, must survive the room made for the new one.
    #[test]
    fn tables_chosen_for_the_process_being_loaded_are_not_freed() {
        let mut state = UnwindState {
            capacity: 100,
            ..UnwindState::default()
        };
        let libc = state.allocate(60).unwrap();
        let old = state.allocate(40).unwrap();
        state.files.insert((1, 1), table(libc, 60));
        state.files.insert((1, 2), table(old, 40));

        state.release_unused(&[libc]);

        assert!(state.files.contains_key(&(1, 1)));
        assert!(!state.files.contains_key(&(1, 2)));
        assert_eq!(state.allocate(40), Some(60));
        assert_eq!(state.allocate(1), None);
    }

    #[test]
    fn comm_stops_at_the_first_nul() {
        let mut comm = [0u8; TASK_COMM_LEN];
        comm[..6].copy_from_slice(b"V8Work");
        assert_eq!(comm_to_string(&comm), "V8Work");
        let full = *b"0123456789abcdef";
        assert_eq!(comm_to_string(&full), "0123456789abcdef");
    }
}
