//! Loads the eBPF program, attaches it to a `cpu-clock` event on every
//! online CPU, and reads back what it aggregated in its maps.

use std::collections::{BTreeMap, HashMap as StdHashMap};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, StackTraceMap},
    programs::{
        PerfEvent,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
    },
    util::online_cpus,
};
use log::debug;
use profiler_common::{SampleKey, TASK_COMM_LEN, ThreadInfo, stat};

/// The eBPF object, built by `build.rs` and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// What to sample.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// Thread-group ids to sample; empty with `sample_all` set.
    pub pids: Vec<u32>,
    pub sample_all: bool,
    /// Capacity of the stack-trace map, in distinct stacks.
    pub stack_entries: u32,
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
}

/// Everything the eBPF program gathered, copied out of its maps.
#[derive(Debug, Default)]
pub struct RawProfile {
    pub counts: Vec<(SampleKey, u64)>,
    /// Stack id → addresses, leaf first.
    pub stacks: StdHashMap<i32, Vec<u64>>,
    /// Thread id → (pid, name) as seen by the eBPF program.
    pub threads: BTreeMap<u32, (u32, String)>,
    /// Stack ids referenced by a count whose stack could not be read back.
    pub missing_stacks: u64,
}

/// A loaded, attached profiler program.
pub struct Sampler {
    ebpf: Ebpf,
    links: Vec<PerfEventLinkId>,
}

impl Sampler {
    /// Loads the program into the kernel and fills the target map.
    pub fn load(config: &SamplerConfig) -> anyhow::Result<Self> {
        let sample_all = u8::from(config.sample_all);
        let mut ebpf = EbpfLoader::new()
            .override_global("SAMPLE_ALL", &sample_all, true)
            .map_max_entries("STACKS", config.stack_entries)
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

        Ok(Self {
            ebpf,
            links: Vec::new(),
        })
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
        Ok(Stats {
            samples: sum(stat::SAMPLES)?,
            other_task_ticks: sum(stat::OTHER_TASK)?,
            user_stack_errors: sum(stat::USER_STACK_ERRORS)?,
            kernel_stack_errors: sum(stat::KERNEL_STACK_ERRORS)?,
            counts_map_full: sum(stat::COUNTS_FULL)?,
            threads_map_full: sum(stat::THREADS_FULL)?,
        })
    }

    /// Copies the counts, the stacks they reference and the thread names.
    pub fn collect(&self) -> anyhow::Result<RawProfile> {
        let counts: HashMap<&MapData, SampleKey, u64> =
            HashMap::try_from(self.ebpf.map("COUNTS").context("map COUNTS is missing")?)?;
        let stacks: StackTraceMap<&MapData> =
            StackTraceMap::try_from(self.ebpf.map("STACKS").context("map STACKS is missing")?)?;
        let threads: HashMap<&MapData, u32, ThreadInfo> =
            HashMap::try_from(self.ebpf.map("THREADS").context("map THREADS is missing")?)?;

        let mut raw = RawProfile::default();
        for entry in counts.iter() {
            let (key, count) = entry.context("cannot read the counts map")?;
            raw.counts.push((key, count));
        }
        raw.counts.sort_unstable();

        for (key, count) in &raw.counts {
            for id in [key.user_stack_id, key.kernel_stack_id] {
                if id < 0 || raw.stacks.contains_key(&id) {
                    continue;
                }
                match stacks.get(&(id as u32), 0) {
                    Ok(trace) => {
                        let frames = trace.frames().iter().map(|f| f.ip).collect();
                        raw.stacks.insert(id, frames);
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
        Ok(raw)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.detach();
    }
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

    #[test]
    fn comm_stops_at_the_first_nul() {
        let mut comm = [0u8; TASK_COMM_LEN];
        comm[..6].copy_from_slice(b"V8Work");
        assert_eq!(comm_to_string(&comm), "V8Work");
        let full = *b"0123456789abcdef";
        assert_eq!(comm_to_string(&full), "0123456789abcdef");
    }
}
