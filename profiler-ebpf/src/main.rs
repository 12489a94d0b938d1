//! Kernel side of the profiler: a `perf_event` program run on every CPU at
//! the sampling frequency. It keeps the work per sample small: filter by
//! process, store the user and kernel stacks, and count the pair.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext as _},
};
use profiler_common::{
    DEFAULT_COUNT_ENTRIES, DEFAULT_STACK_ENTRIES, NO_STACK, STACK_LOST, SampleKey, TARGET_ENTRIES,
    THREAD_ENTRIES, ThreadInfo, stat,
};

/// When non-zero, every process is sampled and `TARGETS` is ignored.
#[unsafe(no_mangle)]
static SAMPLE_ALL: u8 = 0;

/// Processes to sample, by thread-group id.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(TARGET_ENTRIES, 0);

/// Stacks, deduplicated by the kernel.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_STACK_ENTRIES, 0);

/// Sample counts per thread and stack pair.
#[map]
static COUNTS: HashMap<SampleKey, u64> = HashMap::with_max_entries(DEFAULT_COUNT_ENTRIES, 0);

/// Last seen name of each sampled thread.
#[map]
static THREADS: HashMap<u32, ThreadInfo> = HashMap::with_max_entries(THREAD_ENTRIES, 0);

/// Counters described in `profiler_common::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const EFAULT: i32 = 14;

#[perf_event]
pub fn profile(ctx: PerfEventContext) -> u32 {
    try_profile(&ctx);
    0
}

#[inline(always)]
fn try_profile(ctx: &PerfEventContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;

    // SAFETY: a read of a constant the loader may have patched; volatile so
    // the compiler cannot fold it to its initial value.
    let sample_all = unsafe { core::ptr::read_volatile(&SAMPLE_ALL) } != 0;
    if tid == 0 || (!sample_all && TARGETS.get_ptr(pid).is_none()) {
        bump(stat::OTHER_TASK);
        return;
    }
    bump(stat::SAMPLES);

    let user_stack_id = stack_id(ctx, BPF_F_USER_STACK as u64, stat::USER_STACK_ERRORS);
    let kernel_stack_id = stack_id(ctx, 0, stat::KERNEL_STACK_ERRORS);
    let key = SampleKey {
        pid,
        tid,
        user_stack_id,
        kernel_stack_id,
    };
    match COUNTS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful map lookup and stays
        // valid for this program run. The key holds the thread id, and a
        // thread runs on one CPU at a time, so no other CPU writes this
        // entry concurrently and a plain add is enough.
        Some(count) => unsafe { *count += 1 },
        None => {
            // A concurrent insert of the same key from another CPU makes
            // this fail with EEXIST; that sample is then counted as full.
            if COUNTS.insert(key, 1u64, BPF_NOEXIST as u64).is_err() {
                bump(stat::COUNTS_FULL);
            }
        }
    }

    record_thread(pid, tid);
}

#[inline(always)]
fn stack_id(ctx: &PerfEventContext, flags: u64, error_slot: u32) -> i32 {
    match ctx.get_stackid(&STACKS, flags) {
        Ok(id) => id as i32,
        // No stack of this kind: a kernel thread has no user stack, and a
        // sample taken in user mode has no kernel stack.
        Err(err) if err == -EFAULT => NO_STACK,
        Err(_) => {
            bump(error_slot);
            STACK_LOST
        }
    }
}

#[inline(always)]
fn record_thread(pid: u32, tid: u32) {
    let Ok(comm) = bpf_get_current_comm() else {
        return;
    };
    if let Some(known) = THREADS.get_ptr(tid) {
        // SAFETY: pointer from a successful lookup, read once.
        if unsafe { (*known).comm } == comm {
            return;
        }
    }
    let info = ThreadInfo { pid, _pad: 0, comm };
    if THREADS.insert(tid, info, 0).is_err() {
        bump(stat::THREADS_FULL);
    }
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot of this CPU; the program is not preempted by
        // another run of itself on the same CPU.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
