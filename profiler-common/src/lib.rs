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
pub const NO_STACK: i32 = -1;

/// Stack id recorded when the kernel failed to store the stack: a bucket
/// collision in the stack map, or a fault while walking it.
pub const STACK_LOST: i32 = -2;

/// Default capacity of the stack-trace map, in distinct stacks.
pub const DEFAULT_STACK_ENTRIES: u32 = 32 * 1024;

/// Default capacity of the per-stack counts map.
pub const DEFAULT_COUNT_ENTRIES: u32 = 64 * 1024;

/// Capacity of the thread-name map.
pub const THREAD_ENTRIES: u32 = 16 * 1024;

/// Capacity of the target-process map.
pub const TARGET_ENTRIES: u32 = 4 * 1024;

/// Key of the counts map: one entry per distinct thread and stack pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleKey {
    /// Process (thread group) id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Id in the stack-trace map, or [`NO_STACK`] / [`STACK_LOST`].
    pub user_stack_id: i32,
    /// Id in the stack-trace map, or [`NO_STACK`] / [`STACK_LOST`].
    pub kernel_stack_id: i32,
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
    /// User stacks that could not be stored (collision or fault).
    pub const USER_STACK_ERRORS: u32 = 2;
    /// Kernel stacks that could not be stored.
    pub const KERNEL_STACK_ERRORS: u32 = 3;
    /// Samples dropped because the counts map was full.
    pub const COUNTS_FULL: u32 = 4;
    /// Thread names not recorded because the thread map was full.
    pub const THREADS_FULL: u32 = 5;
    /// Number of slots.
    pub const COUNT: u32 = 6;
}

#[cfg(feature = "user")]
mod user {
    use super::{SampleKey, ThreadInfo};

    // SAFETY: `SampleKey` is `repr(C)`, made only of integers, with no
    // padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for SampleKey {}

    // SAFETY: `ThreadInfo` is `repr(C)` with explicit padding and only
    // integer fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for ThreadInfo {}
}
