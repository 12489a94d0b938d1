//! Child processes of the bench: each is killed and reaped when its owner
//! goes away, on every exit path, and is waited for with a deadline and
//! its resource usage.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::{Child, Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::cleanup;

/// A running child process, killed on drop unless it was reaped.
pub struct Owned {
    child: Child,
    name: String,
    reaped: bool,
}

/// How a child ended.
pub struct Exit {
    pub status: ExitStatus,
    /// User and system CPU time of the process and its reaped children.
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub at: Instant,
}

impl Owned {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        cleanup::track(child.id());
        Ok(Self {
            child,
            name: name.to_owned(),
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` unless the process was already reaped (its pid may
    /// belong to another process by then).
    pub fn signal(&self, signal: i32) {
        if !self.reaped {
            // SAFETY: kill has no memory-safety preconditions; the pid is
            // our child and not reaped, so it still names that child.
            unsafe { libc::kill(self.pid() as i32, signal) };
        }
    }

    /// Waits until the process exits or `deadline` passes (`None`).
    pub fn wait_until(&mut self, deadline: Instant) -> anyhow::Result<Option<Exit>> {
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit; past `timeout` it is killed and
    /// that is an error.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<Exit> {
        match self.wait_until(Instant::now() + timeout)? {
            Some(exit) => Ok(exit),
            None => {
                self.kill();
                bail!(
                    "{} did not finish within {} s",
                    self.name,
                    timeout.as_secs()
                )
            }
        }
    }

    /// Sends `signal` and waits up to `grace` for the exit, then kills.
    pub fn stop(&mut self, signal: i32, grace: Duration) -> anyhow::Result<Exit> {
        self.signal(signal);
        self.wait(grace)
    }

    fn try_wait(&mut self) -> anyhow::Result<Option<Exit>> {
        if self.reaped {
            bail!("{} was already reaped", self.name);
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes only into the two out-pointers, which are
        // valid for the duration of the call; the pid is our unreaped child.
        let pid = unsafe { libc::wait4(self.pid() as i32, &mut status, libc::WNOHANG, &mut usage) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("wait4 on {}", self.name));
        }
        if pid == 0 {
            return Ok(None);
        }
        self.reaped = true;
        cleanup::untrack(self.pid());
        let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        Ok(Some(Exit {
            status: ExitStatus::from_raw(status),
            cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
            at: Instant::now(),
        }))
    }

    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        self.signal(libc::SIGKILL);
        let _ = self.wait_until(Instant::now() + Duration::from_secs(10));
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}
