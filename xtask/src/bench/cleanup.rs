//! What the bench puts back when a signal (Ctrl-C, SIGTERM, a closed
//! terminal) ends it early, where no drop guard runs: its child processes
//! are killed, and the BPF statistics switch and the trace file systems it
//! mounted are restored. Drop guards do the same on every other path.

use std::{
    ffi::CStr,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

const SLOTS: usize = 64;
static CHILDREN: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
/// What kernel.bpf_stats_enabled was before the bench: 0 or 1, or -1 when
/// the bench did not change it.
static BPF_STATS_WAS: AtomicI32 = AtomicI32::new(-1);
pub const MOUNT_POINTS: [&CStr; 2] = [c"/sys/kernel/tracing", c"/sys/kernel/debug"];
static MOUNTED: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];

/// Kills `pid` if a signal ends the bench. Past 64 children at once the
/// rest go untracked; the bench never runs more than a dozen.
pub fn track(pid: u32) {
    for slot in &CHILDREN {
        if slot
            .compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

pub fn untrack(pid: u32) {
    for slot in &CHILDREN {
        let _ = slot.compare_exchange(pid as i32, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

pub fn restore_bpf_stats_to(was: Option<bool>) {
    BPF_STATS_WAS.store(was.map_or(-1, i32::from), Ordering::SeqCst);
}

pub fn set_mounted(mount_point: &CStr, mounted: bool) {
    if let Some(index) = MOUNT_POINTS.iter().position(|p| *p == mount_point) {
        MOUNTED[index].store(mounted, Ordering::SeqCst);
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP.
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only makes async-signal-safe calls (kill,
        // open, write, close, umount, signal, raise) and reads atomics.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    for slot in &CHILDREN {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe; the pid is a child the
            // bench has not reaped, so it names that child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    let was = BPF_STATS_WAS.load(Ordering::SeqCst);
    if was >= 0 {
        let value: &[u8] = if was == 1 { b"1" } else { b"0" };
        // SAFETY: open, write and close are async-signal-safe; the path is
        // NUL-terminated and the buffer valid for its length.
        unsafe {
            let fd = libc::open(
                c"/proc/sys/kernel/bpf_stats_enabled".as_ptr(),
                libc::O_WRONLY,
            );
            if fd >= 0 {
                libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
            }
        }
    }
    for (mount_point, mounted) in MOUNT_POINTS.iter().zip(&MOUNTED) {
        if mounted.load(Ordering::SeqCst) {
            // SAFETY: umount is async-signal-safe; the path is
            // NUL-terminated and static.
            unsafe { libc::umount(mount_point.as_ptr()) };
        }
    }

    // SAFETY: signal and raise are async-signal-safe; with the default
    // action back, the bench ends as the signal would have ended it.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}
