//! Helpers for the integration tests: build fixtures, start targets, run
//! the profiler binary and read what it wrote.
//!
//! The tests need root (or CAP_BPF and CAP_PERFMON) because they load the
//! real eBPF program; without it each test prints why and skips.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests live in the workspace")
        .to_owned()
}

/// The profiler binary under test: `$PROFILER_BIN`, or the release build.
pub fn profiler_bin() -> PathBuf {
    let bin = std::env::var_os("PROFILER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/profiler"));
    assert!(
        bin.exists(),
        "{} is missing; run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// Whether the tests can load BPF programs; prints the reason if not.
pub fn can_profile(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping {test}: it loads an eBPF program and needs root");
    }
    root
}

/// A scratch folder under `target/`, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = root().join("target/test-scratch").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Compiles `tests/fixtures/NAME.c` with frame pointers in every function
/// and debug info. Optimized gcc builds drop the frame of leaf functions
/// even with `-fno-omit-frame-pointer`, so these are built at `-O0`.
pub fn c_fixture(name: &str) -> PathBuf {
    c_fixture_with(name, name, &["-O0", "-fno-omit-frame-pointer"])
}

/// Compiles `tests/fixtures/SOURCE.c` to a binary called `name` with extra
/// compiler flags.
pub fn c_fixture_with(source: &str, name: &str, flags: &[&str]) -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = root().join(format!("tests/fixtures/{source}.c"));
    let out_dir = root().join("target/fixtures");
    fs::create_dir_all(&out_dir).expect("create fixtures folder");
    let bin = out_dir.join(name);
    let status = Command::new("gcc")
        .args([
            "-g",
            "-fno-inline",
            "-fno-optimize-sibling-calls",
            "-pthread",
        ])
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on {}", src.display());
    bin
}

/// Path of a file in `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// A process started for a test, killed when the test ends.
pub struct Target {
    child: Child,
}

impl Target {
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {cmd:?}: {err}"));
        Self { child }
    }

    /// Takes charge of a process already started.
    pub fn adopt(child: Child) -> Self {
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process has run for a moment and is on the CPU.
    pub fn settle(self, delay: Duration) -> Self {
        thread::sleep(delay);
        self
    }

    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run of the profiler left.
pub struct Run {
    pub output: Output,
    pub dir: PathBuf,
}

impl Run {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn assert_success(&self) {
        assert!(
            self.output.status.success(),
            "profiler failed ({}):\n{}\n{}",
            self.output.status,
            self.stdout(),
            self.stderr()
        );
    }

    pub fn summary(&self) -> serde_json::Value {
        let text = fs::read_to_string(self.dir.join("summary.json")).expect("summary.json");
        serde_json::from_str(&text).expect("summary.json is JSON")
    }

    /// Folded stacks: (stack, count).
    pub fn folded(&self) -> Vec<(String, u64)> {
        let text = fs::read_to_string(self.dir.join("stacks.folded")).expect("stacks.folded");
        text.lines()
            .map(|line| {
                let (stack, count) = line.rsplit_once(' ').expect("`stack count` line");
                (stack.to_owned(), count.parse().expect("count"))
            })
            .collect()
    }

    /// Share of samples, in percent, whose leaf frame satisfies `pred`.
    pub fn self_share(&self, pred: impl Fn(&str) -> bool) -> f64 {
        let folded = self.folded();
        let total: u64 = folded.iter().map(|(_, n)| n).sum();
        let hits: u64 = folded
            .iter()
            .filter(|(stack, _)| pred(stack.rsplit(';').next().unwrap_or("")))
            .map(|(_, n)| n)
            .sum();
        100.0 * hits as f64 / total.max(1) as f64
    }
}

/// Runs `profiler attach ARGS -o DIR` and waits for it.
pub fn attach(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(profiler_bin())
        .arg("attach")
        .arg("-o")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the profiler");
    Run {
        output,
        dir: dir.to_owned(),
    }
}

/// Starts `profiler attach ARGS -o DIR` without waiting.
pub fn attach_spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(profiler_bin())
        .arg("attach")
        .arg("-o")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the profiler")
}

/// Waits for `path` to exist, up to `timeout`.
pub fn wait_for_file(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Parses a flame graph, which declares a DTD, as XML.
pub fn parse_svg(svg: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(svg, options).expect("the SVG parses as XML")
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// `GET http://127.0.0.1:PORT/PATH`: the status code and body, or `None`
/// when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A cgroup-v2 group made for one test, removed at the end. Processes are
/// started inside it from their first instruction.
pub struct Cgroup {
    dir: PathBuf,
    /// The group's path as processes see it in `/proc/PID/cgroup`.
    pub path: String,
}

impl Cgroup {
    /// Makes the group, or `None` (with the reason printed) where cgroup v2
    /// is not mounted writable.
    pub fn create(name: &str) -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        });
        let Some(mount) = mount else {
            eprintln!("no cgroup2 mount; cgroup selection is not tested");
            return None;
        };
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let base = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
        let path = format!(
            "{}/{name}-{}",
            base.trim_end_matches('/'),
            std::process::id()
        );
        let dir = mount.join(path.trim_start_matches('/'));
        match fs::create_dir(&dir) {
            Ok(()) => Some(Self { dir, path }),
            Err(err) => {
                eprintln!(
                    "cannot create {}: {err}; cgroup selection is not tested",
                    dir.display()
                );
                None
            }
        }
    }

    /// A command that joins this group, then runs `program` with `args`.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec \"$0\" \"$@\"",
                self.dir.join("cgroup.procs").display()
            ))
            .arg(program)
            .args(args);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Emptied by the tests' own process guards, which drop first.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Resident memory of a process in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
