//! Command-line flags, as typed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "profiler", version, about)]
pub struct Cli {
    /// More log output: -v for decisions, -vv for detail.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample the on-CPU stacks of a running process.
    Attach(AttachArgs),
    /// Compare two profiles: a differential flame graph and the frames
    /// whose share changed most.
    Diff(DiffArgs),
    /// Print the hottest frames of a saved profile.
    Report(ReportArgs),
    /// Sample continuously: one profile per process and interval, kept on
    /// disk with bounded retention, optionally pushed to Pyroscope, with
    /// Prometheus metrics.
    Daemon(Box<DaemonArgs>),
}

/// Output format of tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Md,
    Json,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The baseline: a profile folder or a folded file.
    pub before: PathBuf,
    /// The profile to compare with it.
    pub after: PathBuf,
    /// Folder for diff.svg, diff.md and diff.json [default: diff].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Rows in the table of changes.
    #[arg(long, default_value_t = 15, value_name = "N")]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A profile folder or a folded file.
    pub profile: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Rows per table.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,
    /// Group samples: `thread-role` splits them into node's main thread,
    /// worker_threads, the libuv threadpool, V8's GC and helper threads and
    /// others, from thread names and stack entries.
    #[arg(long, value_enum, value_name = "GROUPING")]
    pub by: Option<Grouping>,
    /// Also write the profile as gzip-compressed pprof to this file, e.g.
    /// to open a folded file from another tool in pprof or Pyroscope.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Grouping {
    ThreadRole,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  sudo profiler attach --pid 1234 --duration 30
  sudo profiler attach -p 1234 -F 199 -o before -- node loadtest.js
  sudo profiler attach -- node --perf-basic-prof app.js

Node.js: start node with --perf-basic-prof-only-functions (or --perf-basic-prof)
and --interpreted-frames-native-stack so that JS frames get names.")]
pub struct AttachArgs {
    /// Process to profile. Without it, COMMAND is started and profiled.
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Stop after this many seconds (default: until Ctrl-C, the target
    /// exits or COMMAND ends).
    #[arg(short, long, value_name = "SECS")]
    pub duration: Option<f64>,

    /// Samples per second per CPU.
    #[arg(short = 'F', long, default_value_t = 99, value_name = "HZ")]
    pub frequency: u64,

    /// Output folder [default: profile-PID].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Capacity of the kernel-side stack map, in distinct stacks; raise it
    /// when the summary reports stack errors. Memory (about 1 KiB a stack)
    /// is only taken as stacks arrive.
    #[arg(long, default_value_t = profiler_common::DEFAULT_STACK_ENTRIES, value_name = "N")]
    pub stack_entries: u32,

    /// Event-loop iterations at least this long are blocking episodes.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub block_threshold: f64,

    /// Don't track event-loop iterations.
    #[arg(long)]
    pub no_event_loop: bool,

    /// Capacity of the kernel-side array of unwind rows (16 bytes each,
    /// preallocated); 0 walks every stack by frame pointer only.
    #[arg(long, default_value_t = profiler_common::DEFAULT_UNWIND_ROWS, value_name = "N")]
    pub unwind_rows: u32,

    /// Title of the flame graphs, instead of the command line.
    #[arg(long)]
    pub title: Option<String>,

    /// Draw the flame graphs as icicles, roots at the top.
    #[arg(long)]
    pub inverted: bool,

    /// Leave frames narrower than this many pixels out of the flame graphs.
    #[arg(long, default_value_t = 0.1, value_name = "PX")]
    pub min_width: f64,

    /// No thread-name root frame in folded stacks and flame graphs: stacks
    /// of all threads merge.
    #[arg(long)]
    pub no_thread_roots: bool,

    /// No live progress line.
    #[arg(short, long)]
    pub quiet: bool,

    /// A command to run while profiling, e.g. a load test; profiling stops
    /// when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Default, Args)]
#[command(after_help = "\
Examples:
  sudo profiler daemon --name '^node$' -o /var/lib/profiler
  sudo profiler daemon --cgroup /system.slice/api.service --pyroscope-url http://pyroscope:4040
  sudo profiler daemon --config /etc/profiler/daemon.toml

Flags override the config file. SIGHUP reloads the config file; SIGTERM and
SIGINT write the interval under way before exiting.")]
pub struct DaemonArgs {
    /// TOML config file; reloaded on SIGHUP.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Sample this process (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Sample processes whose name (as in /proc/PID/comm) matches.
    #[arg(long, value_name = "REGEX")]
    pub name: Option<String>,

    /// Sample processes in this cgroup (v2 path) or below it.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,

    /// Sample every process of the host.
    #[arg(long)]
    pub host: bool,

    /// Samples per second per CPU [default: 19].
    #[arg(short = 'F', long, value_name = "HZ")]
    pub frequency: Option<u64>,

    /// Length of one profile [default: 60].
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,

    /// Folder of the profiles [default: /var/lib/profiler].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Remove profiles older than this [default: 168, a week].
    #[arg(long, value_name = "HOURS")]
    pub max_age: Option<f64>,

    /// Remove the oldest profiles while all of them take more than this
    /// [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub max_size: Option<f64>,

    /// Push each interval's profiles to this Pyroscope server.
    #[arg(long, value_name = "URL")]
    pub pyroscope_url: Option<String>,

    /// Application name in Pyroscope [default: the process name].
    #[arg(long, value_name = "NAME")]
    pub pyroscope_app: Option<String>,

    /// Bearer token for the Pyroscope server.
    #[arg(
        long,
        env = "PROFILER_PYROSCOPE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub pyroscope_token: Option<String>,

    /// Basic-auth user for the Pyroscope server.
    #[arg(long, env = "PROFILER_PYROSCOPE_USER", value_name = "USER")]
    pub pyroscope_user: Option<String>,

    /// Basic-auth password for the Pyroscope server.
    #[arg(
        long,
        env = "PROFILER_PYROSCOPE_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub pyroscope_password: Option<String>,

    /// Intervals kept for Pyroscope while it cannot be reached
    /// [default: 64].
    #[arg(long, value_name = "N")]
    pub push_queue: Option<usize>,

    /// Address of the Prometheus metrics endpoint, or `off`
    /// [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Event-loop iterations at least this long are blocking episodes
    /// [default: 50].
    #[arg(long, value_name = "MS")]
    pub block_threshold: Option<f64>,

    /// Don't track event-loop iterations.
    #[arg(long)]
    pub no_event_loop: bool,

    /// Capacity of the kernel-side array of unwind rows, shared by every
    /// sampled binary (16 bytes each, preallocated); 0 walks every stack by
    /// frame pointer only [default: 1048576].
    #[arg(long, value_name = "N")]
    pub unwind_rows: Option<u32>,
}
