//! Types and constants shared by the eBPF program and user space.
//!
//! Every struct here crosses the kernel/user boundary through a BPF map, so
//! each one is `#[repr(C)]` with explicit padding: the verifier and the map
//! key comparison both see every byte, and stray padding would make equal
//! keys compare unequal.

#![no_std]

/// Length of a task name as the kernel stores it, NUL included.
pub const TASK_COMM_LEN: usize = 16;

/// Stack id recorded when no stack of that kind exists for the sample, for
/// example the kernel stack of a sample taken in user mode.
pub const NO_STACK: u64 = 0;

/// Stack id recorded when the stack could not be stored: the stack map was
/// full, or the walk failed.
pub const STACK_LOST: u64 = 1;

/// Most frames kept per stack, as the kernel's own limit.
pub const MAX_STACK_DEPTH: usize = 127;

/// Default capacity of the stack map, in distinct stacks. Entries are
/// allocated as stacks arrive, so an unused capacity costs no memory.
pub const DEFAULT_STACK_ENTRIES: u32 = 64 * 1024;

/// A stack as stored in the stack map, keyed by a 64-bit hash of its frames.
///
/// The kernel's own stack-trace map has one slot per hash bucket and drops
/// a stack whose bucket is taken; a hash map keyed by a 64-bit hash of the
/// frames keeps every distinct stack until it is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stack {
    /// Number of valid entries in `ips`.
    pub len: u64,
    /// Instruction pointers, leaf first.
    pub ips: [u64; MAX_STACK_DEPTH],
}

/// The id of a stack: FNV-1a over its frames, moved off the sentinels.
#[inline(always)]
pub fn stack_hash(ips: &[u64; MAX_STACK_DEPTH], len: usize) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &ip) in ips.iter().enumerate() {
        if i >= len {
            break;
        }
        hash ^= ip;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if hash <= STACK_LOST { hash + 2 } else { hash }
}

/// Default capacity of the per-stack counts map.
pub const DEFAULT_COUNT_ENTRIES: u32 = 64 * 1024;

/// Capacity of the thread-name map.
pub const THREAD_ENTRIES: u32 = 16 * 1024;

/// Capacity of the target-process map.
pub const TARGET_ENTRIES: u32 = 4 * 1024;

/// Capacity of the event-loop thread map.
pub const LOOP_THREAD_ENTRIES: u32 = 16 * 1024;

/// Size of the ring buffer carrying loop events to user space, in bytes.
pub const LOOP_EVENTS_BYTES: u32 = 1 << 20;

/// Buckets of the loop-iteration histogram: [`HIST_SUB_BUCKETS`] per power of
/// two of microseconds, up to 2^40 µs.
pub const HIST_BUCKETS: u32 = 41 * HIST_SUB_BUCKETS;

/// The loop-iteration histogram holds two of [`HIST_BUCKETS`]: first for
/// main threads (thread id equal to process id), then for the others, such
/// as node's worker threads.
pub const HIST_GROUPS: u32 = 2;

/// Sub-buckets per power of two; 8 gives a relative width of 12.5% at most.
pub const HIST_SUB_BUCKETS: u32 = 8;

/// Histogram bucket of a duration in microseconds. Shared by both sides so
/// that user space reads bucket bounds exactly as the kernel side filled
/// them. Written without loops for the verifier.
#[inline(always)]
pub fn hist_bucket(duration_us: u64) -> u32 {
    if duration_us < HIST_SUB_BUCKETS as u64 {
        return duration_us as u32;
    }
    // floor(log2) by binary search, unrolled.
    let mut v = duration_us;
    let mut log2 = 0u32;
    if v >= 1 << 32 {
        v >>= 32;
        log2 += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        log2 += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        log2 += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        log2 += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        log2 += 2;
    }
    if v >= 1 << 1 {
        log2 += 1;
    }
    // The three bits below the leading one pick the sub-bucket.
    let sub = ((duration_us >> (log2 - 3)) & 7) as u32;
    let bucket = (log2 - 2) * HIST_SUB_BUCKETS + sub;
    if bucket >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        bucket
    }
}

/// Smallest duration in microseconds that falls in `bucket`.
pub fn hist_bucket_floor_us(bucket: u32) -> u64 {
    if bucket < HIST_SUB_BUCKETS {
        return bucket as u64;
    }
    let log2 = bucket / HIST_SUB_BUCKETS + 2;
    let sub = (bucket % HIST_SUB_BUCKETS) as u64;
    (1u64 << log2) + (sub << (log2 - 3))
}

/// Event-loop state of one thread that waits in epoll.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopThread {
    /// When the current iteration started: the last return from the wait.
    pub iteration_start_ns: u64,
    /// Count of iterations started so far on this thread.
    pub iteration: u64,
    pub pid: u32,
    /// Non-zero while the thread is inside the wait.
    pub in_wait: u32,
}

/// Kinds of [`LoopEvent`].
pub mod loop_event {
    /// An iteration that lasted at least the blocking threshold.
    pub const EPISODE: u32 = 1;
    /// A CPU sample taken on a loop thread outside its wait.
    pub const SAMPLE: u32 = 2;
}

/// A record sent from the kernel side to user space through the ring
/// buffer: either an episode or a sample on a loop thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopEvent {
    /// One of [`loop_event`].
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// Sample only: stack ids as in [`SampleKey`].
    pub user_stack_id: u64,
    pub kernel_stack_id: u64,
    /// The iteration the event belongs to.
    pub iteration: u64,
    /// Episode: iteration start; sample: when it was taken (CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// Episode: iteration end; sample: equal to `start_ns`.
    pub end_ns: u64,
}

/// Capacity of the unwind-row array shared by all unwound binaries, by
/// default: 16 bytes a row, preallocated (16 MiB). node's own binary needs
/// about 370 000 rows.
pub const DEFAULT_UNWIND_ROWS: u32 = 1 << 20;

/// Entries of each CPU's cache of row lookups; a power of two.
pub const ROW_CACHE_ENTRIES: u32 = 2048;

/// One remembered row lookup: the row that applies at file address `vaddr`
/// of the binary whose rows start at `rows_start`.
///
/// Stacks repeat from sample to sample, and a binary search over the row
/// array touches a dozen cache lines that are cold by the next sample, so
/// the walk looks here first. 32 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowCacheEntry {
    pub vaddr: u64,
    pub rows_start: u32,
    /// The binary's row count; 0 marks an empty entry.
    pub rows_len: u32,
    pub row: UnwindRow,
}

/// Slot of [`RowCacheEntry`] for file address `vaddr` of the binary whose
/// rows start at `rows_start`.
#[inline(always)]
pub fn row_cache_slot(vaddr: u64, rows_start: u32) -> u32 {
    let key = vaddr ^ (u64::from(rows_start) << 32);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 53) as u32 & (ROW_CACHE_ENTRIES - 1)
}

/// Executable mappings with unwind rows per process.
pub const MAX_UNWIND_MAPPINGS: usize = 32;

/// How a row finds the canonical frame address (CFA).
pub mod cfa_kind {
    /// No rule: walk this frame by frame pointer.
    pub const UNKNOWN: u8 = 0;
    /// `rsp + offset`.
    pub const RSP: u8 = 1;
    /// `rbp + offset`.
    pub const RBP: u8 = 2;
    /// `*(rsp + offset) + deref_add`.
    pub const RSP_DEREF: u8 = 3;
    /// `*(rbp + offset) + deref_add`.
    pub const RBP_DEREF: u8 = 4;
    /// `cfa_register + offset`, for another general register (DWARF
    /// number). Only the innermost frame's registers are known, so other
    /// frames with this rule are walked by frame pointer. Hand-written
    /// assembly keeps the entry `rsp` in such a register around its
    /// prologue and epilogue.
    pub const REGISTER: u8 = 5;
}

/// One row of an unwind table: applies from `pc` up to the next row's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    /// Virtual address in the ELF file, before load bias.
    pub pc: u32,
    pub cfa_offset: i32,
    pub deref_add: i16,
    /// Where the caller's `rbp` was saved, from the CFA, if `rbp_saved`.
    pub rbp_offset: i16,
    /// One of [`cfa_kind`].
    pub cfa_kind: u8,
    pub rbp_saved: u8,
    /// DWARF register number, for [`cfa_kind::REGISTER`].
    pub cfa_register: u8,
    pub _pad: u8,
}

/// An executable mapping of a process whose binary has unwind rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Subtracted from a runtime address to get the file's virtual address.
    pub bias: u64,
    /// The binary's rows in the row array.
    pub rows_start: u32,
    pub rows_len: u32,
}

/// The unwindable mappings of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcUnwind {
    pub count: u32,
    pub _pad: u32,
    pub mappings: [UnwindMapping; MAX_UNWIND_MAPPINGS],
}

/// Key of the counts map: one entry per distinct thread and stack pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    /// Process (thread group) id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Key in the stack map, or [`NO_STACK`] / [`STACK_LOST`].
    pub user_stack_id: u64,
    /// Key in the stack map, or [`NO_STACK`] / [`STACK_LOST`].
    pub kernel_stack_id: u64,
}

/// Name of a sampled thread, as last seen by the eBPF program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Process (thread group) id.
    pub pid: u32,
    /// Explicit padding to keep `comm` 8-byte aligned on every target.
    pub _pad: u32,
    /// NUL-padded thread name.
    pub comm: [u8; TASK_COMM_LEN],
}

/// Slots of the per-CPU statistics array.
pub mod stat {
    /// Samples taken on a thread of a target process.
    pub const SAMPLES: u32 = 0;
    /// Timer ticks that found another task, or the idle task, on the CPU.
    pub const OTHER_TASK: u32 = 1;
    /// User stacks that could not be stored (map full or walk failed).
    pub const USER_STACK_ERRORS: u32 = 2;
    /// Kernel stacks that could not be stored.
    pub const KERNEL_STACK_ERRORS: u32 = 3;
    /// Samples dropped because the counts map was full.
    pub const COUNTS_FULL: u32 = 4;
    /// Thread names not recorded because the thread map was full.
    pub const THREADS_FULL: u32 = 5;
    /// Loop events lost because the ring buffer was full.
    pub const LOOP_EVENTS_LOST: u32 = 6;
    /// Loop threads not tracked because the loop-thread map was full.
    pub const LOOP_THREADS_FULL: u32 = 7;
    /// Loop iterations completed.
    pub const LOOP_ITERATIONS: u32 = 8;
    /// Longest loop iteration seen on this CPU, in nanoseconds (a maximum,
    /// not a count).
    pub const LOOP_MAX_NS: u32 = 9;
    /// User stacks walked with unwind tables.
    pub const TABLE_WALKS: u32 = 10;
    /// Frames whose unwind row was looked up.
    pub const ROW_LOOKUPS: u32 = 11;
    /// Of those, rows found in the per-CPU row cache.
    pub const ROW_CACHE_HITS: u32 = 12;
    /// Number of slots.
    pub const COUNT: u32 = 13;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_cache_slots_stay_in_range_and_spread() {
        let mut used = [false; ROW_CACHE_ENTRIES as usize];
        // The return addresses of one stack: a few hundred bytes apart.
        for i in 0..512u64 {
            let slot = row_cache_slot(0x40_0000 + i * 212, 0);
            assert!(slot < ROW_CACHE_ENTRIES);
            used[slot as usize] = true;
        }
        let distinct = used.iter().filter(|&&u| u).count();
        assert!(distinct > 400, "{distinct} distinct slots of 512");
        // The same address in another binary's rows lands elsewhere.
        assert_ne!(row_cache_slot(0x1234, 0), row_cache_slot(0x1234, 370_000));
    }

    #[test]
    fn stack_ids_depend_on_every_frame_and_skip_sentinels() {
        let mut ips = [0u64; MAX_STACK_DEPTH];
        ips[..3].copy_from_slice(&[0x401000, 0x402000, 0x403000]);
        let three = stack_hash(&ips, 3);
        assert_ne!(three, stack_hash(&ips, 2));
        ips[2] = 0x403001;
        assert_ne!(three, stack_hash(&ips, 3));
        // Frames past the length do not count.
        ips[50] = 7;
        assert_eq!(stack_hash(&ips, 3), stack_hash(&ips, 3));
        assert!(stack_hash(&ips, 0) > STACK_LOST);
    }

    #[test]
    fn buckets_are_monotonic_and_floors_round_trip() {
        let mut last = 0;
        for us in 0..200_000u64 {
            let bucket = hist_bucket(us);
            assert!(bucket >= last, "bucket of {us} went down");
            assert!(hist_bucket_floor_us(bucket) <= us, "floor of {us}");
            last = bucket;
        }
        for bucket in 0..HIST_BUCKETS - 1 {
            assert_eq!(hist_bucket(hist_bucket_floor_us(bucket)), bucket);
        }
    }

    #[test]
    fn bucket_width_is_within_an_eighth() {
        for bucket in HIST_SUB_BUCKETS..HIST_BUCKETS - 1 {
            let low = hist_bucket_floor_us(bucket) as f64;
            let high = hist_bucket_floor_us(bucket + 1) as f64;
            assert!((high - low) / low <= 0.125 + 1e-9, "bucket {bucket}");
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::{
        LoopEvent, LoopThread, ProcUnwind, RowCacheEntry, SampleKey, Stack, ThreadInfo,
        UnwindMapping, UnwindRow,
    };

    // SAFETY: `repr(C)`, integer fields and a Pod row, no padding.
    unsafe impl aya::Pod for RowCacheEntry {}

    // SAFETY: `repr(C)`, integer fields only, padding made explicit.
    unsafe impl aya::Pod for UnwindRow {}

    // SAFETY: `repr(C)`, integer fields only, no padding.
    unsafe impl aya::Pod for UnwindMapping {}

    // SAFETY: `repr(C)`, integer fields and an array of Pod, padding
    // made explicit.
    unsafe impl aya::Pod for ProcUnwind {}

    // SAFETY: `repr(C)`, integer fields only, no padding.
    unsafe impl aya::Pod for Stack {}

    // SAFETY: `repr(C)`, integer fields only, no implicit padding.
    unsafe impl aya::Pod for LoopThread {}

    // SAFETY: `repr(C)`, integer fields only, padding made explicit.
    unsafe impl aya::Pod for LoopEvent {}

    // SAFETY: `SampleKey` is `repr(C)`, made only of integers, with no
    // padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for SampleKey {}

    // SAFETY: `ThreadInfo` is `repr(C)` with explicit padding and only
    // integer fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for ThreadInfo {}
}
