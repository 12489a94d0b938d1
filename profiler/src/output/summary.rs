//! `summary.json`: the figures of a profile in a form scripts can read.

use serde::Serialize;

use crate::{event_loop::LoopReport, profile::TopEntry, sampler::Stats};

#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    pub pid: u32,
    /// Command line of the profiled process.
    pub command: String,
    pub started_unix_s: f64,
    pub duration_s: f64,
    pub frequency_hz: u64,
    /// Samples taken on the target's threads.
    pub samples: u64,
    /// Samples taken but not recorded (counts map full).
    pub lost_samples: u64,
    /// Samples whose user or kernel stack could not be stored or read.
    pub stack_errors: u64,
    /// Samples the target's CPU time predicts at this frequency.
    pub expected_samples: Option<u64>,
    /// CPU time the target used while it was profiled.
    pub target_cpu_s: Option<f64>,
    pub stop_reason: String,
    /// Exit status of the command run with `-- COMMAND`.
    pub command_exit_status: Option<i32>,
    pub command_run: Option<String>,
    pub perf_map: Option<String>,
    pub kernel_counters: Stats,
    pub stacks: StackQuality,
    /// Event-loop iteration statistics, when the target has a loop thread.
    pub event_loop: Option<&'a LoopReport>,
    pub threads: Vec<ThreadShare>,
    /// Share of samples on the main thread (thread id equal to pid); the
    /// rest ran on worker threads, the libuv pool or runtime helpers.
    pub main_thread_percent: f64,
    pub top_self: Vec<TopEntry>,
    pub top_total: Vec<TopEntry>,
    /// JavaScript functions that were running, most samples first.
    pub top_js: Vec<TopEntry>,
    pub timings_ms: Timings,
}

/// How complete the user stacks were, and how they were walked.
#[derive(Debug, Serialize)]
pub struct StackQuality {
    /// How user stacks are unwound.
    pub unwinding: &'static str,
    /// Executable mappings of the target walked with unwind tables.
    pub table_mappings: usize,
    /// Unwind rows loaded into the kernel side.
    pub unwind_rows: u32,
    /// Samples whose user stack was walked with the tables.
    pub table_walks: u64,
    /// Frames whose unwind row was looked up, and the share of them found
    /// in the kernel side's cache of recent lookups.
    pub row_lookups: u64,
    pub row_cache_hit_percent: f64,
    /// Samples with a user stack.
    pub user_stacks: u64,
    /// Of those, the ones that reach the thread's entry point.
    pub complete: u64,
    pub complete_percent: f64,
}

/// Where the profiler's own time went, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Timings {
    /// Loading the eBPF program and opening the perf events.
    pub load: f64,
    /// Copying the maps out of the kernel after sampling stopped.
    pub collect: f64,
    pub symbolize: f64,
    /// Writing the folded stacks and rendering the flame graph.
    pub render: f64,
    /// From the end of sampling to the last file written before the summary.
    pub stop_to_output: f64,
}

#[derive(Debug, Serialize)]
pub struct ThreadShare {
    pub thread: String,
    pub samples: u64,
    pub percent: f64,
}
