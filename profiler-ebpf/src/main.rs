//! Kernel side of the profiler.
//!
//! - `profile`, a `perf_event` program run on every CPU at the sampling
//!   frequency: filter by process, store the user and kernel stacks, count
//!   the pair.
//! - `loop_wait_enter` and `loop_wait_exit`, fentry and fexit programs on
//!   the kernel's epoll wait: they cut the life of every thread of a target
//!   that waits in epoll into event-loop iterations, from the return of one
//!   wait to the next call, and report iterations longer than a threshold.
//!   Samples taken on such a thread outside its wait are also sent to user
//!   space, tagged with the iteration.
//! - `loop_sys_enter` and `loop_sys_exit`, raw tracepoints on every syscall's
//!   entry and return, which do the same on kernels that refuse fentry.

#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_stack,
        bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user, bpf_task_pt_regs, generated,
    },
    macros::{fentry, fexit, map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{FEntryContext, FExitContext, PerfEventContext, RawTracePointContext},
};
use core::{ffi::c_void, ptr::read_volatile};

use profiler_common::{
    DEFAULT_COUNT_ENTRIES, DEFAULT_STACK_ENTRIES, DEFAULT_UNWIND_ROWS, HIST_BUCKETS, HIST_GROUPS,
    LOOP_EVENTS_BYTES, LOOP_THREAD_ENTRIES, LoopEvent, LoopThread, MAX_STACK_DEPTH,
    MAX_UNWIND_MAPPINGS, NO_STACK, ProcUnwind, ROW_CACHE_ENTRIES, RowCacheEntry, STACK_LOST,
    SampleKey, Stack, TARGET_ENTRIES, THREAD_ENTRIES, ThreadInfo, UnwindMapping, UnwindRow,
    cfa_kind, hist_bucket, loop_event, row_cache_slot, stack_hash, stat,
};

/// When non-zero, every process is sampled and `TARGETS` is ignored.
#[unsafe(no_mangle)]
static SAMPLE_ALL: u8 = 0;

/// Iterations at least this long are blocking episodes.
#[unsafe(no_mangle)]
static BLOCK_THRESHOLD_NS: u64 = 50_000_000;

/// Processes to sample, by thread-group id.
#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(TARGET_ENTRIES, 0);

/// Stacks by the hash of their frames. Not preallocated: memory is taken
/// as distinct stacks arrive.
#[map]
static STACKS: HashMap<u64, Stack> =
    HashMap::with_max_entries(DEFAULT_STACK_ENTRIES, BPF_F_NO_PREALLOC);

/// Unwind rows of every binary with tables, one range per binary.
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(DEFAULT_UNWIND_ROWS, 0);

/// Each CPU's cache of recent row lookups, by `row_cache_slot`.
#[map]
static ROW_CACHE: PerCpuArray<RowCacheEntry> = PerCpuArray::with_max_entries(ROW_CACHE_ENTRIES, 0);

/// Processes whose user stacks are walked with unwind tables.
#[map]
static PROC_UNWIND: HashMap<u32, ProcUnwind> = HashMap::with_max_entries(TARGET_ENTRIES, 0);

/// Per-CPU room to walk a stack into before it is hashed and stored.
#[map]
static SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU copy of the user registers of the sample being walked, for
/// unwind rules based on a register other than `rsp` and `rbp`. Kept out
/// of the walk's stack frame, which the verifier bounds.
#[map]
static LEAF_REGS: PerCpuArray<pt_regs> = PerCpuArray::with_max_entries(1, 0);

/// Sample counts per thread and stack pair. There are two, so that user
/// space can read and clear one while the other fills: `COUNTS_SLOT` says
/// which one new samples go to (0 for `COUNTS`, 1 for `COUNTS_ALT`).
#[map]
static COUNTS: HashMap<SampleKey, u64> = HashMap::with_max_entries(DEFAULT_COUNT_ENTRIES, 0);

#[map]
static COUNTS_ALT: HashMap<SampleKey, u64> = HashMap::with_max_entries(DEFAULT_COUNT_ENTRIES, 0);

#[map]
static COUNTS_SLOT: Array<u32> = Array::with_max_entries(1, 0);

/// Last seen name of each sampled thread.
#[map]
static THREADS: HashMap<u32, ThreadInfo> = HashMap::with_max_entries(THREAD_ENTRIES, 0);

/// Counters described in `profiler_common::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Event-loop state of each thread seen waiting in epoll.
#[map]
static LOOP_THREADS: HashMap<u32, LoopThread> = HashMap::with_max_entries(LOOP_THREAD_ENTRIES, 0);

/// Episodes and loop-thread samples, on their way to user space.
#[map]
static LOOP_EVENTS: RingBuf = RingBuf::with_byte_size(LOOP_EVENTS_BYTES, 0);

/// Loop-iteration durations, bucketed by `profiler_common::hist_bucket`.
#[map]
static LOOP_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(HIST_BUCKETS * HIST_GROUPS, 0);

const EEXIST: i32 = 17;

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
    let sample_all = unsafe { read_volatile(&SAMPLE_ALL) } != 0;
    if tid == 0 || (!sample_all && TARGETS.get_ptr(pid).is_none()) {
        bump(stat::OTHER_TASK);
        return;
    }
    bump(stat::SAMPLES);

    let user_stack_id = if PROC_UNWIND.get_ptr(pid).is_some() {
        table_stack_id(ctx, pid)
    } else {
        stack_id(ctx, BPF_F_USER_STACK as u64, stat::USER_STACK_ERRORS)
    };
    let kernel_stack_id = stack_id(ctx, 0, stat::KERNEL_STACK_ERRORS);
    let key = SampleKey {
        pid,
        tid,
        user_stack_id,
        kernel_stack_id,
    };
    match COUNTS_SLOT.get(0) {
        Some(&1) => count_sample(&COUNTS_ALT, &key),
        _ => count_sample(&COUNTS, &key),
    }

    record_thread(pid, tid);

    if let Some(state) = LOOP_THREADS.get_ptr(tid) {
        // SAFETY: pointer from a successful lookup, fields read once.
        let (in_wait, iteration) = unsafe { ((*state).in_wait, (*state).iteration) };
        if in_wait == 0 {
            let now = now_ns();
            send_loop_event(&LoopEvent {
                kind: loop_event::SAMPLE,
                pid,
                tid,
                _pad: 0,
                user_stack_id,
                kernel_stack_id,
                iteration,
                start_ns: now,
                end_ns: now,
            });
        }
    }
}

#[inline(always)]
fn count_sample(counts: &HashMap<SampleKey, u64>, key: &SampleKey) {
    match counts.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful map lookup and stays
        // valid for this program run. The key holds the thread id, and a
        // thread runs on one CPU at a time, so no other CPU writes this
        // entry concurrently and a plain add is enough.
        Some(count) => unsafe { *count += 1 },
        None => {
            // A concurrent insert of the same key from another CPU makes
            // this fail with EEXIST; that sample is then counted as full.
            if counts.insert(key, 1u64, BPF_NOEXIST as u64).is_err() {
                bump(stat::COUNTS_FULL);
            }
        }
    }
}

// The wait syscalls of every epoll user: libuv (node), tokio, nginx.
const SYS_EPOLL_WAIT: i64 = 232;
const SYS_EPOLL_PWAIT: i64 = 281;
const SYS_EPOLL_PWAIT2: i64 = 441;

/// A thread calls the kernel's epoll wait, which `epoll_wait`,
/// `epoll_pwait` and `epoll_pwait2` all go through: for a loop thread, the
/// current iteration ends here.
///
/// Only waits pay for this, where the syscall tracepoints below put every
/// syscall of the host on the kernel's slower traced path.
#[fentry(function = "do_epoll_wait")]
pub fn loop_wait_enter(_ctx: FEntryContext) -> u32 {
    wait_enter();
    0
}

/// A thread returns from its epoll wait: a new iteration starts here.
#[fexit(function = "do_epoll_wait")]
pub fn loop_wait_exit(_ctx: FExitContext) -> u32 {
    wait_exit();
    0
}

/// Syscall entry: a loop thread entering its wait ends an iteration.
///
/// Raw tracepoints need no tracefs. Entry filters on the syscall number
/// before any map lookup, so other syscalls cost a compare.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn loop_sys_enter(ctx: RawTracePointContext) -> u32 {
    let id: i64 = ctx.arg(1);
    if matches!(id, SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2) {
        wait_enter();
    }
    0
}

/// Syscall return: a thread in its wait returns from it, which starts an
/// iteration. A thread is in one syscall at a time, so whichever syscall
/// returns while the wait flag is set is the wait.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn loop_sys_exit(_ctx: RawTracePointContext) -> u32 {
    wait_exit();
    0
}

/// A loop thread enters its wait: the current iteration ends here.
#[inline(always)]
fn wait_enter() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let Some(state) = LOOP_THREADS.get_ptr_mut(tid) else {
        // First wait of a thread of a target: track it from the return.
        // SAFETY: a read of a constant the loader may have patched.
        let sample_all = unsafe { read_volatile(&SAMPLE_ALL) } != 0;
        if sample_all || TARGETS.get_ptr(pid).is_some() {
            let state = LoopThread {
                iteration_start_ns: 0,
                iteration: 0,
                pid,
                in_wait: 1,
            };
            if LOOP_THREADS.insert(tid, state, BPF_NOEXIST as u64).is_err() {
                bump(stat::LOOP_THREADS_FULL);
            }
        }
        return;
    };
    let now = now_ns();
    // SAFETY: pointer from a successful lookup; only this thread, which
    // runs on one CPU at a time, writes its own entry.
    let state = unsafe { &mut *state };
    if state.in_wait != 0 {
        return;
    }
    state.in_wait = 1;

    let duration_ns = now.saturating_sub(state.iteration_start_ns);
    bump(stat::LOOP_ITERATIONS);
    let group = if tid == state.pid { 0 } else { HIST_BUCKETS };
    if let Some(bucket) = LOOP_HIST.get_ptr_mut(group + hist_bucket(duration_ns / 1000)) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe { *bucket += 1 };
    }
    if let Some(max) = STATS.get_ptr_mut(stat::LOOP_MAX_NS) {
        // SAFETY: per-CPU slot of this CPU.
        unsafe {
            if duration_ns > *max {
                *max = duration_ns;
            }
        }
    }

    // SAFETY: a read of a constant the loader may have patched.
    let threshold_ns = unsafe { core::ptr::read_volatile(&BLOCK_THRESHOLD_NS) };
    if duration_ns >= threshold_ns {
        send_loop_event(&LoopEvent {
            kind: loop_event::EPISODE,
            pid: state.pid,
            tid,
            _pad: 0,
            user_stack_id: NO_STACK,
            kernel_stack_id: NO_STACK,
            iteration: state.iteration,
            start_ns: state.iteration_start_ns,
            end_ns: now,
        });
    }
}

/// A thread returns from a syscall: if it was its wait, a new iteration
/// starts here.
#[inline(always)]
fn wait_exit() {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(state) = LOOP_THREADS.get_ptr_mut(tid) else {
        return;
    };
    // SAFETY: as in `wait_enter`.
    let state = unsafe { &mut *state };
    if state.in_wait == 0 {
        return;
    }
    state.iteration_start_ns = now_ns();
    state.iteration += 1;
    state.in_wait = 0;
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments and cannot fail.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn send_loop_event(event: &LoopEvent) {
    if LOOP_EVENTS.output::<LoopEvent>(event, 0).is_err() {
        bump(stat::LOOP_EVENTS_LOST);
    }
}

/// Registers and progress of a user-stack walk, shared with `walk_step`.
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    bp: u64,
    pid: u32,
    len: u32,
    /// The mapping of the last frame found in one; consecutive frames are
    /// mostly in the same binary, so this saves a map lookup per frame.
    mapping: UnwindMapping,
    /// Row lookups of this walk, and those the row cache answered; added
    /// to the statistics once per walk rather than once per frame.
    row_lookups: u32,
    row_cache_hits: u32,
}

/// Walks the user stack with the process's unwind tables where a frame's
/// code has them, and by frame pointer elsewhere (JIT code, code without
/// CFI), then stores it like `stack_id` does.
#[inline(always)]
fn table_stack_id(ctx: &PerfEventContext, pid: u32) -> u64 {
    let Some((pc, sp, bp)) = user_registers(ctx) else {
        bump(stat::USER_STACK_ERRORS);
        return STACK_LOST;
    };
    let mut walk = Walk {
        pc,
        sp,
        bp,
        pid,
        len: 0,
        mapping: UnwindMapping::default(),
        row_lookups: 0,
        row_cache_hits: 0,
    };
    // SAFETY: `walk_step` has the callback signature bpf_loop expects, and
    // `walk` outlives the call.
    unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32,
            walk_step as *mut c_void,
            (&mut walk as *mut Walk).cast(),
            0,
        )
    };
    bump(stat::TABLE_WALKS);
    add(stat::ROW_LOOKUPS, walk.row_lookups.into());
    add(stat::ROW_CACHE_HITS, walk.row_cache_hits.into());
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return STACK_LOST;
    };
    // SAFETY: the per-CPU slot of this CPU, filled by `walk_step`.
    let stack = unsafe { &mut *scratch };
    store_stack(stack, walk.len as usize, stat::USER_STACK_ERRORS)
}

/// The user-mode `rip`, `rsp` and `rbp` of the interrupted task: the
/// sample's own registers if it hit user mode, else those saved on entry
/// to the kernel. All of them are copied to `LEAF_REGS`.
#[inline(always)]
fn user_registers(ctx: &PerfEventContext) -> Option<(u64, u64, u64)> {
    let leaf = LEAF_REGS.get_ptr_mut(0)?;
    // SAFETY: the context of a perf_event program points to its sample
    // data, which holds the registers at the time of the sample.
    let regs = unsafe { &(*ctx.ctx).regs };
    // SAFETY: `leaf` is this CPU's slot of LEAF_REGS. Context fields are
    // read one by one: the verifier refuses a copy through a pointer
    // computed from the context.
    unsafe {
        if read_volatile(&regs.cs) & 3 == 3 {
            let leaf = &mut *leaf;
            leaf.rax = read_volatile(&regs.rax);
            leaf.rdx = read_volatile(&regs.rdx);
            leaf.rcx = read_volatile(&regs.rcx);
            leaf.rbx = read_volatile(&regs.rbx);
            leaf.rsi = read_volatile(&regs.rsi);
            leaf.rdi = read_volatile(&regs.rdi);
            leaf.rbp = read_volatile(&regs.rbp);
            leaf.rsp = read_volatile(&regs.rsp);
            leaf.rip = read_volatile(&regs.rip);
            leaf.r8 = read_volatile(&regs.r8);
            leaf.r9 = read_volatile(&regs.r9);
            leaf.r10 = read_volatile(&regs.r10);
            leaf.r11 = read_volatile(&regs.r11);
            leaf.r12 = read_volatile(&regs.r12);
            leaf.r13 = read_volatile(&regs.r13);
            leaf.r14 = read_volatile(&regs.r14);
            leaf.r15 = read_volatile(&regs.r15);
        } else {
            let user = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
            if user.is_null() {
                return None;
            }
            let copied = generated::bpf_probe_read_kernel(
                leaf.cast(),
                core::mem::size_of::<pt_regs>() as u32,
                user.cast(),
            );
            if copied != 0 {
                return None;
            }
        }
        let leaf = &*leaf;
        Some((leaf.rip, leaf.rsp, leaf.rbp))
    }
}

/// General register `number` of the innermost frame, in DWARF's numbering
/// for x86-64.
#[inline(always)]
fn leaf_register(number: u8) -> Option<u64> {
    // SAFETY: this CPU's slot of LEAF_REGS, filled by `user_registers`.
    let regs = unsafe { &*LEAF_REGS.get_ptr(0)? };
    Some(match number {
        0 => regs.rax,
        1 => regs.rdx,
        2 => regs.rcx,
        3 => regs.rbx,
        4 => regs.rsi,
        5 => regs.rdi,
        6 => regs.rbp,
        7 => regs.rsp,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        15 => regs.r15,
        _ => return None,
    })
}

/// One frame of a table walk; returns 1 to stop.
#[inline(never)]
extern "C" fn walk_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `table_stack_id` gave it.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: the per-CPU slot of this CPU.
    let stack = unsafe { &mut *scratch };
    let i = index as usize;
    if i >= MAX_STACK_DEPTH || walk.pc == 0 {
        return 1;
    }
    stack.ips[i] = walk.pc;
    walk.len = i as u32 + 1;

    // A caller's pc is a return address, after its call: look up the call.
    let lookup = if i == 0 { walk.pc } else { walk.pc - 1 };
    if !(walk.mapping.start <= lookup && lookup < walk.mapping.end)
        && let Some(mapping) = find_mapping(walk.pid, lookup)
    {
        walk.mapping = mapping;
    }
    let row = if walk.mapping.start <= lookup && lookup < walk.mapping.end {
        walk.row_lookups += 1;
        find_row(&walk.mapping, lookup, &mut walk.row_cache_hits)
    } else {
        None
    };
    // Another register's value is only known in the innermost frame.
    let row = row.filter(|row| {
        row.cfa_kind != cfa_kind::UNKNOWN && (row.cfa_kind != cfa_kind::REGISTER || i == 0)
    });
    let (cfa, bp, return_address) = match row {
        Some(row) => {
            let offset = row.cfa_offset as i64 as u64;
            let cfa = match row.cfa_kind {
                cfa_kind::RSP => walk.sp.wrapping_add(offset),
                cfa_kind::RBP => walk.bp.wrapping_add(offset),
                cfa_kind::REGISTER => match leaf_register(row.cfa_register) {
                    Some(value) => value.wrapping_add(offset),
                    None => return 1,
                },
                kind => {
                    let base = if kind == cfa_kind::RBP_DEREF {
                        walk.bp
                    } else {
                        walk.sp
                    };
                    match read_user(base.wrapping_add(offset)) {
                        Some(value) => value.wrapping_add(row.deref_add as i64 as u64),
                        None => return 1,
                    }
                }
            };
            // The stack grows down: a caller's frame is always above.
            if cfa <= walk.sp {
                return 1;
            }
            if row.rbp_saved != 0 && row.rbp_offset == -16 {
                // The usual prologue, `push rbp` right below the return
                // address: one read for both.
                match read_pair(cfa - 16) {
                    Some([bp, return_address]) => (cfa, bp, return_address),
                    None => return 1,
                }
            } else {
                let bp = if row.rbp_saved != 0 {
                    match read_user(cfa.wrapping_add(row.rbp_offset as i64 as u64)) {
                        Some(bp) => bp,
                        None => return 1,
                    }
                } else {
                    walk.bp
                };
                match read_user(cfa - 8) {
                    Some(return_address) => (cfa, bp, return_address),
                    None => return 1,
                }
            }
        }
        _ => {
            // Frame pointer: [rbp] is the caller's rbp and the return
            // address is above it, read together; the caller's stack
            // starts above that.
            let cfa = walk.bp.wrapping_add(16);
            if walk.bp == 0 || cfa <= walk.sp {
                return 1;
            }
            match read_pair(walk.bp) {
                Some([caller_bp, return_address]) => (cfa, caller_bp, return_address),
                None => return 1,
            }
        }
    };
    walk.pc = return_address;
    walk.sp = cfa;
    walk.bp = bp;
    0
}

/// The mapping of process `pid` that holds `pc`, if it has a table.
#[inline(always)]
fn find_mapping(pid: u32, pc: u64) -> Option<UnwindMapping> {
    let index = mapping_index(pid, pc);
    // SAFETY: a read of a local. Volatile so that the compiler, which can
    // see the function's result is below the mapping count, keeps the
    // bounds check the verifier needs.
    let index = usize::try_from(unsafe { read_volatile(&index) }).ok()?;
    let proc = PROC_UNWIND.get_ptr(pid)?;
    // SAFETY: pointer from a successful lookup; read only.
    unsafe { (*proc).mappings.get(index).copied() }
}

/// Index of the mapping of process `pid` that holds `pc`, or -1. A global
/// function, so the verifier checks it once on its own rather than once
/// for every path through the walk that reaches it, which multiplied by
/// the mapping count made loading take most of a second.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn mapping_index(pid: u32, pc: u64) -> i64 {
    let Some(proc) = PROC_UNWIND.get_ptr(pid) else {
        return -1;
    };
    // SAFETY: pointer from a successful lookup; read only.
    let proc = unsafe { &*proc };
    for j in 0..MAX_UNWIND_MAPPINGS {
        if j as u32 >= proc.count {
            break;
        }
        let mapping = &proc.mappings[j];
        if mapping.start <= pc && pc < mapping.end {
            return j as i64;
        }
    }
    -1
}

/// The unwind row for `pc`, an address inside `mapping`: from this CPU's
/// row cache, counted in `hits`, else by a search of the binary's rows.
#[inline(always)]
fn find_row(mapping: &UnwindMapping, pc: u64, hits: &mut u32) -> Option<UnwindRow> {
    let vaddr = pc - mapping.bias;
    let cached = ROW_CACHE.get_ptr_mut(row_cache_slot(vaddr, mapping.rows_start));
    if let Some(entry) = cached {
        // SAFETY: this CPU's slot, and one program run at a time uses it.
        let entry = unsafe { &*entry };
        if entry.vaddr == vaddr
            && entry.rows_len != 0
            && entry.rows_start == mapping.rows_start
            && entry.rows_len == mapping.rows_len
        {
            *hits += 1;
            return Some(entry.row);
        }
    }

    let row = search_rows(mapping, vaddr)?;
    if let Some(entry) = cached {
        // SAFETY: as above.
        unsafe {
            *entry = RowCacheEntry {
                vaddr,
                rows_start: mapping.rows_start,
                rows_len: mapping.rows_len,
                row,
            };
        }
    }
    Some(row)
}

/// The last row of `mapping`'s binary at or below file address `vaddr`.
#[inline(always)]
fn search_rows(mapping: &UnwindMapping, vaddr: u64) -> Option<UnwindRow> {
    // A binary search; 2^24 rows at most per binary. It runs under bpf_loop
    // so that the verifier checks one step instead of every path through
    // an unrolled search.
    let mut search = RowSearch {
        vaddr,
        low: mapping.rows_start,
        high: mapping.rows_start + mapping.rows_len,
        failed: 0,
    };
    // SAFETY: `search_step` has the callback signature bpf_loop expects,
    // and `search` outlives the call.
    unsafe {
        bpf_loop(
            24,
            search_step as *mut c_void,
            (&mut search as *mut RowSearch).cast(),
            0,
        )
    };
    if search.failed != 0 || search.low <= mapping.rows_start {
        return None;
    }
    UNWIND_ROWS.get(search.low - 1).copied()
}

/// State of a binary search over unwind rows, shared with `search_step`.
#[repr(C)]
struct RowSearch {
    vaddr: u64,
    /// First row that may still be above `vaddr`.
    low: u32,
    /// One past the last candidate row.
    high: u32,
    failed: u32,
}

/// One halving of a row search; returns 1 when done.
#[inline(never)]
extern "C" fn search_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `find_row` gave it.
    let search = unsafe { &mut *ctx.cast::<RowSearch>() };
    if search.low >= search.high {
        return 1;
    }
    let mid = search.low + (search.high - search.low) / 2;
    let Some(row) = UNWIND_ROWS.get(mid) else {
        search.failed = 1;
        return 1;
    };
    if u64::from(row.pc) <= search.vaddr {
        search.low = mid + 1;
    } else {
        search.high = mid;
    }
    0
}

/// Two consecutive words of user memory, in one read.
#[inline(always)]
fn read_pair(addr: u64) -> Option<[u64; 2]> {
    // SAFETY: a checked read of user memory; faults return an error.
    unsafe { bpf_probe_read_user(addr as *const [u64; 2]).ok() }
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: a checked read of user memory; faults return an error.
    unsafe { bpf_probe_read_user(addr as *const u64).ok() }
}

/// Hashes the first `len` frames of `stack` and stores the stack.
#[inline(always)]
fn store_stack(stack: &mut Stack, len: usize, error_slot: u32) -> u64 {
    let len = len.min(MAX_STACK_DEPTH);
    if len == 0 {
        return NO_STACK;
    }
    stack.len = len as u64;
    let id = stack_hash(&stack.ips, len);
    if STACKS.get_ptr(id).is_none() {
        // EEXIST from a concurrent insert of the same stack is fine.
        if let Err(err) = STACKS.insert(id, &*stack, BPF_NOEXIST as u64) {
            if err != -EEXIST {
                bump(error_slot);
                return STACK_LOST;
            }
        }
    }
    id
}

#[inline(always)]
fn stack_id(ctx: &PerfEventContext, flags: u64, error_slot: u32) -> u64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return STACK_LOST;
    };
    // SAFETY: the per-CPU slot of this CPU, used by one program run at a
    // time; `ips` is large enough for the size passed.
    let stack = unsafe { &mut *scratch };
    let bytes = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            stack.ips.as_mut_ptr().cast(),
            (MAX_STACK_DEPTH * 8) as u32,
            flags,
        )
    };
    if bytes < 0 {
        bump(error_slot);
        return STACK_LOST;
    }
    // No stack of this kind (length 0): a kernel thread has no user
    // stack, and a sample taken in user mode has no kernel stack.
    store_stack(stack, bytes as usize / 8, error_slot)
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
    add(slot, 1);
}

#[inline(always)]
fn add(slot: u32, n: u64) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot of this CPU; the program is not preempted by
        // another run of itself on the same CPU.
        unsafe { *counter += n };
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
