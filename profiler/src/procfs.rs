//! Reads what the profiler needs to know about a process from `/proc`.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

/// What `/proc` says about a process at one moment.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Name of the main thread.
    pub comm: String,
    /// Command line, one element per argument.
    pub cmdline: Vec<String>,
    /// Path of the executable as seen inside the process's mount namespace.
    pub exe: Option<PathBuf>,
    /// Effective user id.
    pub uid: u32,
    /// Pid of the process inside its own pid namespace.
    pub ns_pid: u32,
}

impl ProcessInfo {
    /// The command line joined with spaces, or the name in brackets for a
    /// kernel thread.
    pub fn command_line(&self) -> String {
        if self.cmdline.is_empty() {
            format!("[{}]", self.comm)
        } else {
            self.cmdline.join(" ")
        }
    }

    /// Whether the process is a Node.js runtime.
    pub fn is_node(&self) -> bool {
        let exe_is_node = self
            .exe
            .as_deref()
            .and_then(Path::file_name)
            .is_some_and(|name| name.to_string_lossy().starts_with("node"));
        exe_is_node || self.comm == "node" || self.comm == "MainThread"
    }
}

/// Path of `/proc/PID/...`.
pub fn proc_path(pid: u32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Whether a process with this pid is running: present and not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(proc_path(pid, "stat")) {
        Ok(stat) => !matches!(parse_stat_state(&stat), Some('Z' | 'X')),
        Err(_) => false,
    }
}

fn parse_stat_state(stat: &str) -> Option<char> {
    // The name field is in parentheses and may itself hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// Reads the identity of a process.
pub fn read_info(pid: u32) -> io::Result<ProcessInfo> {
    let status = fs::read_to_string(proc_path(pid, "status"))?;
    let fields = parse_status(&status);
    let comm = fields.get("Name").cloned().unwrap_or_default();
    let uid = fields
        .get("Uid")
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ns_pid = fields
        .get("NSpid")
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(pid);

    let cmdline = fs::read(proc_path(pid, "cmdline"))
        .map(|raw| parse_cmdline(&raw))
        .unwrap_or_default();
    let exe = fs::read_link(proc_path(pid, "exe")).ok();

    Ok(ProcessInfo {
        pid,
        comm,
        cmdline,
        exe,
        uid,
        ns_pid,
    })
}

fn parse_status(status: &str) -> BTreeMap<String, String> {
    status
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// CPU time used by all threads of a process so far, in seconds.
pub fn cpu_time_s(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_s())
}

/// When the process started, in clock ticks after boot: with the pid, it
/// tells a process from a later one that reuses the pid.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name, state is field 3 and starttime field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The name of a process's main thread, from `/proc/PID/comm`.
pub fn comm(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(proc_path(pid, "comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// The process's cgroup-v2 path, e.g. `/system.slice/api.service`.
pub fn cgroup(pid: u32) -> Option<String> {
    let text = fs::read_to_string(proc_path(pid, "cgroup")).ok()?;
    parse_cgroup(&text)
}

fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(proc_path(pid, "statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).unwrap_or(4096))
}

/// Pids of every process now running.
pub fn all_pids() -> io::Result<Vec<u32>> {
    Ok(fs::read_dir("/proc")?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect())
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Names of the threads of a process, by thread id.
pub fn thread_names(pid: u32) -> BTreeMap<u32, String> {
    let Ok(tasks) = fs::read_dir(proc_path(pid, "task")) else {
        return BTreeMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(task.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_owned()))
        })
        .collect()
}

/// The highest sampling frequency the kernel accepts, in Hz.
pub fn max_sample_rate_hz() -> Option<u64> {
    fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Linux capability numbers the profiler checks for.
pub mod cap {
    pub const SYS_ADMIN: u32 = 21;
    pub const PERFMON: u32 = 38;
    pub const BPF: u32 = 39;
}

/// Whether the calling process holds a capability in its effective set.
pub fn has_capability(cap: u32) -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    parse_status(&status)
        .get("CapEff")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_path_is_the_unified_line() {
        let text = "12:cpu:/legacy\n0::/system.slice/api.service\n";
        assert_eq!(
            parse_cgroup(text).as_deref(),
            Some("/system.slice/api.service")
        );
        assert_eq!(parse_cgroup("3:memory:/x\n"), None);
    }

    #[test]
    fn own_start_time_and_rss_are_read() {
        let pid = std::process::id();
        assert!(start_ticks(pid).is_some_and(|t| t > 0));
        assert!(rss_bytes(pid).is_some_and(|b| b > 1 << 20));
        assert!(all_pids().unwrap().contains(&pid));
    }

    #[test]
    fn state_is_read_after_a_name_with_parentheses() {
        let stat = "42 (we(ird) n) Z 1 42 42 0 -1";
        assert_eq!(parse_stat_state(stat), Some('Z'));
    }

    #[test]
    fn cmdline_splits_on_nul_and_drops_the_trailing_one() {
        let raw = b"node\0--perf-basic-prof\0server.js\0";
        assert_eq!(
            parse_cmdline(raw),
            ["node", "--perf-basic-prof", "server.js"]
        );
    }

    #[test]
    fn this_process_is_alive_and_readable() {
        let pid = std::process::id();
        assert!(is_alive(pid));
        let info = read_info(pid).unwrap();
        assert_eq!(info.pid, pid);
        assert!(!info.comm.is_empty());
        assert!(cpu_time_s(pid).is_some());
        assert!(thread_names(pid).contains_key(&pid));
    }
}
