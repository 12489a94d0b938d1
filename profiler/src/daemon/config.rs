//! The daemon's settings: the TOML config file as written, and the
//! configuration resolved from it, the flags and the defaults (flags win).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use regex::Regex;
use serde::Deserialize;

use crate::cli::DaemonArgs;

pub const DEFAULT_FREQUENCY_HZ: u64 = 19;
const DEFAULT_INTERVAL_S: f64 = 60.0;
const DEFAULT_OUTPUT: &str = "/var/lib/profiler";
const DEFAULT_MAX_AGE_H: f64 = 24.0 * 7.0;
const DEFAULT_MAX_SIZE_MIB: f64 = 1024.0;
const DEFAULT_QUEUE: usize = 64;
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
const DEFAULT_BLOCK_THRESHOLD_MS: f64 = 50.0;

/// The config file, as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    output: Option<PathBuf>,
    frequency_hz: Option<u64>,
    interval_s: Option<f64>,
    unwind_rows: Option<u32>,
    #[serde(default)]
    select: FileSelect,
    #[serde(default)]
    retention: FileRetention,
    pyroscope: Option<FilePyroscope>,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    event_loop: FileEventLoop,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSelect {
    #[serde(default)]
    pids: Vec<u32>,
    name: Option<String>,
    cgroup: Option<String>,
    #[serde(default)]
    host: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    max_age_hours: Option<f64>,
    max_size_mib: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePyroscope {
    url: Option<String>,
    app_name: Option<String>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    tenant: Option<String>,
    queue: Option<usize>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEventLoop {
    enabled: Option<bool>,
    block_threshold_ms: Option<f64>,
}

/// Which processes are sampled.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Every process; the other fields are then unused.
    pub host: bool,
    /// Only these pids, when not empty.
    pub pids: BTreeSet<u32>,
    /// Only processes whose name matches.
    pub name: Option<Regex>,
    /// Only processes in this cgroup or below it.
    pub cgroup: Option<String>,
}

impl Selector {
    /// Whether a process is selected. Given criteria narrow each other.
    pub fn matches(&self, pid: u32, name: &str, cgroup: Option<&str>) -> bool {
        if self.host {
            return true;
        }
        let pid_ok = self.pids.is_empty() || self.pids.contains(&pid);
        let name_ok = self.name.as_ref().is_none_or(|re| re.is_match(name));
        let cgroup_ok = self.cgroup.as_deref().is_none_or(|want| {
            cgroup.is_some_and(|have| {
                have == want
                    || have
                        .strip_prefix(want.trim_end_matches('/'))
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        });
        pid_ok && name_ok && cgroup_ok
    }

    /// How the selection reads in logs.
    pub fn describe(&self) -> String {
        if self.host {
            return "every process".to_owned();
        }
        let mut parts = Vec::new();
        if !self.pids.is_empty() {
            let pids: Vec<String> = self.pids.iter().map(u32::to_string).collect();
            parts.push(format!("pid {}", pids.join(", ")));
        }
        if let Some(name) = &self.name {
            parts.push(format!("name matching {}", name.as_str()));
        }
        if let Some(cgroup) = &self.cgroup {
            parts.push(format!("cgroup {cgroup}"));
        }
        format!("processes with {}", parts.join(" and "))
    }
}

/// Where to push profiles.
#[derive(Clone, Debug, PartialEq)]
pub struct PushConfig {
    /// Base URL of the server; `/ingest` is appended.
    pub url: String,
    /// Application name; the process name when unset.
    pub app_name: Option<String>,
    pub auth: Auth,
    /// Sent as `X-Scope-OrgID` for a multi-tenant server.
    pub tenant: Option<String>,
    /// Intervals held while the server cannot be reached.
    pub queue: usize,
    /// Labels added to every profile.
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Auth {
    None,
    Bearer(String),
    Basic { user: String, password: String },
}

/// The resolved configuration of a daemon.
#[derive(Clone, Debug)]
pub struct Config {
    pub selector: Selector,
    pub frequency_hz: u64,
    pub interval: Duration,
    pub output: PathBuf,
    pub max_age: Duration,
    pub max_bytes: u64,
    pub push: Option<PushConfig>,
    pub metrics_addr: Option<SocketAddr>,
    /// Event-loop tracking, with this threshold.
    pub block_threshold_ns: Option<u64>,
    pub unwind_rows: u32,
}

impl Config {
    /// Reads the config file, if any, and lays the flags over it.
    pub fn load(args: &DaemonArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => File::default(),
        };
        resolve(file, args)
    }

    /// Whether going from `self` to `new` needs the eBPF program loaded
    /// again: the sampling frequency, host-wide sampling, event-loop
    /// tracking and the size of the unwind-row array are fixed when it is
    /// loaded.
    pub fn needs_reload(&self, new: &Config) -> bool {
        self.frequency_hz != new.frequency_hz
            || self.selector.host != new.selector.host
            || self.block_threshold_ns != new.block_threshold_ns
            || self.unwind_rows != new.unwind_rows
    }
}

fn read_file(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
}

fn resolve(file: File, args: &DaemonArgs) -> anyhow::Result<Config> {
    let flags_select =
        args.host || !args.pids.is_empty() || args.name.is_some() || args.cgroup.is_some();
    // Selection from the flags replaces the file's as a whole: mixing
    // "pid from the command line, name from the file" would surprise.
    let (host, pids, name, cgroup) = if flags_select {
        (
            args.host,
            args.pids.clone(),
            args.name.clone(),
            args.cgroup.clone(),
        )
    } else {
        let s = file.select;
        (s.host, s.pids, s.name, s.cgroup)
    };
    let name = name
        .map(|re| Regex::new(&re).with_context(|| format!("bad process-name regex {re:?}")))
        .transpose()?;
    if !host && pids.is_empty() && name.is_none() && cgroup.is_none() {
        bail!(
            "choose what to sample: --pid, --name REGEX, --cgroup PATH or --host \
             (or [select] in the config file)"
        );
    }
    if host && (!pids.is_empty() || name.is_some() || cgroup.is_some()) {
        bail!("--host samples every process; it cannot be combined with --pid, --name or --cgroup");
    }
    let selector = Selector {
        host,
        pids: pids.into_iter().collect(),
        name,
        cgroup,
    };

    let frequency_hz = args
        .frequency
        .or(file.frequency_hz)
        .unwrap_or(DEFAULT_FREQUENCY_HZ);
    let interval_s = args
        .interval
        .or(file.interval_s)
        .unwrap_or(DEFAULT_INTERVAL_S);
    if !(interval_s >= 1.0 && interval_s.is_finite()) {
        bail!("the interval must be at least 1 second");
    }
    let max_age_h = args
        .max_age
        .or(file.retention.max_age_hours)
        .unwrap_or(DEFAULT_MAX_AGE_H);
    let max_size_mib = args
        .max_size
        .or(file.retention.max_size_mib)
        .unwrap_or(DEFAULT_MAX_SIZE_MIB);
    if !(max_age_h > 0.0 && max_age_h.is_finite() && max_size_mib > 0.0 && max_size_mib.is_finite())
    {
        bail!("retention limits must be positive numbers");
    }

    let push = resolve_push(file.pyroscope, args)?;

    let listen = args
        .metrics_addr
        .clone()
        .or(file.metrics.listen)
        .unwrap_or_else(|| DEFAULT_METRICS_ADDR.to_owned());
    let metrics_addr = match listen.as_str() {
        "" | "off" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .with_context(|| format!("bad metrics address {addr:?}; expected IP:PORT"))?,
        ),
    };

    let loop_on = !args.no_event_loop && file.event_loop.enabled.unwrap_or(true);
    let threshold_ms = args
        .block_threshold
        .or(file.event_loop.block_threshold_ms)
        .unwrap_or(DEFAULT_BLOCK_THRESHOLD_MS);
    if !(threshold_ms > 0.0 && threshold_ms.is_finite()) {
        bail!("the block threshold must be a positive number of milliseconds");
    }

    Ok(Config {
        selector,
        frequency_hz,
        interval: Duration::from_secs_f64(interval_s),
        output: args
            .output
            .clone()
            .or(file.output)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT)),
        max_age: Duration::from_secs_f64(max_age_h * 3600.0),
        max_bytes: (max_size_mib * 1024.0 * 1024.0) as u64,
        push,
        metrics_addr,
        block_threshold_ns: loop_on.then(|| (threshold_ms * 1e6).round() as u64),
        unwind_rows: args
            .unwind_rows
            .or(file.unwind_rows)
            .unwrap_or(profiler_common::DEFAULT_UNWIND_ROWS),
    })
}

fn resolve_push(
    file: Option<FilePyroscope>,
    args: &DaemonArgs,
) -> anyhow::Result<Option<PushConfig>> {
    let file = file.unwrap_or_default();
    let Some(url) = args.pyroscope_url.clone().or(file.url) else {
        return Ok(None);
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("the Pyroscope URL must start with http:// or https://, not {url:?}");
    }
    let token = args.pyroscope_token.clone().or(file.token);
    let user = args.pyroscope_user.clone().or(file.user);
    let password = args.pyroscope_password.clone().or(file.password);
    let auth = match (token, user) {
        (Some(_), Some(_)) => bail!("give the Pyroscope server a token or a user, not both"),
        (Some(token), None) => Auth::Bearer(token),
        (None, Some(user)) => Auth::Basic {
            user,
            password: password.unwrap_or_default(),
        },
        (None, None) => Auth::None,
    };
    let queue = args.push_queue.or(file.queue).unwrap_or(DEFAULT_QUEUE);
    if queue == 0 {
        bail!("the push queue must hold at least one interval");
    }
    Ok(Some(PushConfig {
        url: url.trim_end_matches('/').to_owned(),
        app_name: args.pyroscope_app.clone().or(file.app_name),
        auth,
        tenant: file.tenant,
        queue,
        labels: file.labels,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, args: &DaemonArgs) -> anyhow::Result<Config> {
        resolve(toml::from_str(text)?, args)
    }

    #[test]
    fn defaults_apply_to_a_minimal_file() {
        let config = parse("[select]\nname = '^node$'\n", &DaemonArgs::default()).unwrap();
        assert_eq!(config.frequency_hz, 19);
        assert_eq!(config.interval, Duration::from_secs(60));
        assert_eq!(config.output, PathBuf::from("/var/lib/profiler"));
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.block_threshold_ns, Some(50_000_000));
        assert!(config.push.is_none());
        assert!(config.selector.matches(1, "node", None));
        assert!(!config.selector.matches(1, "nodejs", None));
    }

    #[test]
    fn shipped_config_file_is_valid() {
        let text = include_str!("../../../dist/daemon.toml");
        let config = parse(text, &DaemonArgs::default()).unwrap();
        assert_eq!(config.output, PathBuf::from("/var/lib/profiler"));
        assert!(config.selector.matches(1, "node", None));
    }

    #[test]
    fn flags_win_over_the_file() {
        let text = "frequency_hz = 49\ninterval_s = 30\n[select]\nname = 'x'\n\
                    [metrics]\nlisten = 'off'\n";
        let args = DaemonArgs {
            pids: vec![7],
            interval: Some(10.0),
            ..DaemonArgs::default()
        };
        let config = parse(text, &args).unwrap();
        assert_eq!(config.frequency_hz, 49);
        assert_eq!(config.interval, Duration::from_secs(10));
        assert!(config.metrics_addr.is_none());
        // The flags' selection replaces the file's.
        assert!(config.selector.matches(7, "anything", None));
        assert!(!config.selector.matches(8, "x", None));
    }

    #[test]
    fn cgroup_selects_the_subtree_only() {
        let config = parse(
            "[select]\ncgroup = '/system.slice/api'\n",
            &DaemonArgs::default(),
        )
        .unwrap();
        let s = &config.selector;
        assert!(s.matches(1, "node", Some("/system.slice/api")));
        assert!(s.matches(1, "node", Some("/system.slice/api/worker")));
        assert!(!s.matches(1, "node", Some("/system.slice/api2")));
        assert!(!s.matches(1, "node", None));
    }

    #[test]
    fn mistakes_are_named() {
        let none = DaemonArgs::default();
        let err = |text: &str| format!("{:#}", parse(text, &none).unwrap_err());
        assert!(err("").contains("choose what to sample"));
        assert!(err("[select]\nname = '('\n").contains("bad process-name regex"));
        assert!(err("[select]\nhost = true\npids = [1]\n").contains("cannot be combined"));
        assert!(
            err("[select]\nhost = true\n[metrics]\nlisten = 'nope'\n")
                .contains("bad metrics address")
        );
        assert!(
            err("[select]\nhost = true\n[pyroscope]\nurl = 'pyro:4040'\n")
                .contains("must start with http")
        );
        assert!(err("interval_s = 0.5\n[select]\nhost = true\n").contains("at least 1 second"));
        let unknown = toml::from_str::<File>("frequncy_hz = 3\n").unwrap_err();
        assert!(unknown.to_string().contains("unknown field"), "{unknown}");
    }

    #[test]
    fn push_auth_and_labels_come_from_the_file() {
        let text = "[select]\nhost = true\n[pyroscope]\nurl = 'http://p:4040/'\n\
                    user = 'u'\npassword = 'p'\nqueue = 5\n[pyroscope.labels]\nenv = 'prod'\n";
        let push = parse(text, &DaemonArgs::default()).unwrap().push.unwrap();
        assert_eq!(push.url, "http://p:4040");
        assert_eq!(
            push.auth,
            Auth::Basic {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(push.queue, 5);
        assert_eq!(push.labels["env"], "prod");
    }
}
