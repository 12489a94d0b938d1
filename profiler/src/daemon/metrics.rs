//! The daemon's Prometheus endpoint: counters kept as the daemon runs,
//! rendered in the text exposition format on `GET /metrics`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use log::debug;
use profiler_common::{HIST_BUCKETS, hist_bucket_floor_us};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::sampler::Stats;

/// Upper bounds of the loop-iteration histogram's buckets, in seconds.
const LOOP_BOUNDS_S: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One sampled process.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub service: String,
    pub name: String,
    pub cgroup: String,
    pub samples: u64,
    /// Samples whose user stack could not be walked or stored.
    pub lost_samples: u64,
    pub episodes: u64,
}

/// Everything the endpoint shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// By pid.
    pub targets: BTreeMap<u32, Target>,
    pub kernel: Stats,
    /// Loop-iteration counts per internal bucket: main threads, then others.
    pub loop_histogram: Vec<u64>,
    pub intervals: u64,
    pub write_errors: u64,
    pub push_ok: u64,
    pub push_failed: u64,
    pub push_dropped: u64,
    pub push_queue: usize,
    pub stacks_pruned: u64,
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub start_unix_s: f64,
}

/// Shared between the sampling loop, the push task and the endpoint.
#[derive(Debug, Default)]
pub struct Metrics(Mutex<Snapshot>);

impl Metrics {
    pub fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        change(&mut self.0.lock().unwrap());
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.lock().unwrap().clone()
    }

    pub fn push_result(&self, ok: bool) {
        self.update(|s| {
            if ok {
                s.push_ok += 1;
            } else {
                s.push_failed += 1;
            }
        });
    }

    pub fn push_dropped(&self, count: u64) {
        self.update(|s| s.push_dropped += count);
    }

    pub fn set_push_queue(&self, len: usize) {
        self.update(|s| s.push_queue = len);
    }
}

/// Binds the endpoint; an address in use is an error at start-up.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot serve metrics on {addr}: {err}; choose another --metrics-addr or `off`"
        )
    })
}

/// Answers scrapes until the runtime stops.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let answered =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await;
            if !matches!(answered, Ok(Ok(()))) {
                debug!("metrics request from {peer} failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() > 16 * 1024 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&metrics.snapshot()),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "profiler daemon: metrics at /metrics\n".to_owned(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// The text exposition format of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let section = |out: &mut String, name: &str, kind: &str, help: &str, rows: Vec<String>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for row in rows {
            let _ = writeln!(out, "{name}{row}");
        }
    };
    let per_target = |value: fn(&Target) -> u64| -> Vec<String> {
        s.targets
            .iter()
            .map(|(pid, t)| format!("{{{}}} {}", target_labels(*pid, t), value(t)))
            .collect()
    };

    section(
        &mut out,
        "profiler_samples_total",
        "counter",
        "Samples taken of a process, counted when its interval ends.",
        per_target(|t| t.samples),
    );
    section(
        &mut out,
        "profiler_lost_samples_total",
        "counter",
        "Samples of a process whose user stack could not be walked or stored.",
        per_target(|t| t.lost_samples),
    );
    section(
        &mut out,
        "profiler_event_loop_episodes_total",
        "counter",
        "Event-loop iterations of a process at least the blocking threshold long.",
        per_target(|t| t.episodes),
    );
    section(
        &mut out,
        "profiler_targets",
        "gauge",
        "Processes being sampled.",
        vec![format!(" {}", s.targets.len())],
    );
    let k = &s.kernel;
    section(
        &mut out,
        "profiler_kernel_samples_total",
        "counter",
        "Samples of selected processes taken by the eBPF program.",
        vec![format!(" {}", k.samples)],
    );
    section(
        &mut out,
        "profiler_dropped_samples_total",
        "counter",
        "Samples dropped because the kernel counts map was full.",
        vec![format!(" {}", k.counts_map_full)],
    );
    section(
        &mut out,
        "profiler_stack_errors_total",
        "counter",
        "Stacks the eBPF program could not walk or store, by kind.",
        vec![
            format!("{{kind=\"user\"}} {}", k.user_stack_errors),
            format!("{{kind=\"kernel\"}} {}", k.kernel_stack_errors),
        ],
    );
    section(
        &mut out,
        "profiler_event_loop_records_lost_total",
        "counter",
        "Event-loop records lost because the ring buffer was full.",
        vec![format!(" {}", k.loop_events_lost)],
    );
    let _ = writeln!(
        out,
        "# HELP profiler_event_loop_iteration_seconds Event-loop iterations by duration.\n\
         # TYPE profiler_event_loop_iteration_seconds histogram"
    );
    for (group, thread) in ["main", "other"].iter().enumerate() {
        let start = group * HIST_BUCKETS as usize;
        let buckets = s
            .loop_histogram
            .get(start..start + HIST_BUCKETS as usize)
            .unwrap_or(&[]);
        write_histogram(&mut out, thread, buckets);
    }
    section(
        &mut out,
        "profiler_intervals_total",
        "counter",
        "Intervals cut.",
        vec![format!(" {}", s.intervals)],
    );
    section(
        &mut out,
        "profiler_write_errors_total",
        "counter",
        "Profiles that could not be written to disk.",
        vec![format!(" {}", s.write_errors)],
    );
    section(
        &mut out,
        "profiler_push_total",
        "counter",
        "Push attempts to Pyroscope, by result.",
        vec![
            format!("{{result=\"success\"}} {}", s.push_ok),
            format!("{{result=\"failure\"}} {}", s.push_failed),
        ],
    );
    section(
        &mut out,
        "profiler_push_dropped_total",
        "counter",
        "Profiles never pushed: the queue was full or the server rejected them.",
        vec![format!(" {}", s.push_dropped)],
    );
    section(
        &mut out,
        "profiler_push_queue_length",
        "gauge",
        "Profiles waiting to be pushed.",
        vec![format!(" {}", s.push_queue)],
    );
    section(
        &mut out,
        "profiler_stacks_pruned_total",
        "counter",
        "Stacks removed from the kernel stack map once no interval needed them.",
        vec![format!(" {}", s.stacks_pruned)],
    );
    section(
        &mut out,
        "process_cpu_seconds_total",
        "counter",
        "CPU time of the daemon, user and system.",
        vec![format!(" {}", s.cpu_s)],
    );
    section(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon.",
        vec![format!(" {}", s.rss_bytes)],
    );
    section(
        &mut out,
        "process_start_time_seconds",
        "gauge",
        "Start of the daemon, in Unix seconds.",
        vec![format!(" {}", s.start_unix_s)],
    );
    out
}

fn target_labels(pid: u32, t: &Target) -> String {
    format!(
        "service=\"{}\",name=\"{}\",pid=\"{pid}\",cgroup=\"{}\"",
        escape(&t.service),
        escape(&t.name),
        escape(&t.cgroup)
    )
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One thread group's series of the loop-iteration histogram. The
/// internal buckets are finer; each is counted under the first bound at or
/// above its upper edge, and the sum is estimated from bucket midpoints.
fn write_histogram(out: &mut String, thread: &str, buckets: &[u64]) {
    let name = "profiler_event_loop_iteration_seconds";
    let mut cumulative = vec![0u64; LOOP_BOUNDS_S.len()];
    let (mut count, mut sum_s) = (0u64, 0.0f64);
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let low_s = hist_bucket_floor_us(i as u32) as f64 / 1e6;
        let high_s = hist_bucket_floor_us(i as u32 + 1) as f64 / 1e6;
        count += n;
        sum_s += n as f64 * (low_s + high_s) / 2.0;
        for (bound, slot) in LOOP_BOUNDS_S.iter().zip(cumulative.iter_mut()) {
            if high_s <= *bound {
                *slot += n;
            }
        }
    }
    for (bound, n) in LOOP_BOUNDS_S.iter().zip(&cumulative) {
        let _ = writeln!(
            out,
            "{name}_bucket{{thread=\"{thread}\",le=\"{bound}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{thread=\"{thread}\",le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "{name}_sum{{thread=\"{thread}\"}} {sum_s}");
    let _ = writeln!(out, "{name}_count{{thread=\"{thread}\"}} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::hist_bucket;

    #[test]
    fn exposition_has_target_series_and_a_consistent_histogram() {
        let mut s = Snapshot::default();
        s.targets.insert(
            42,
            Target {
                service: "api".into(),
                name: "node".into(),
                cgroup: "/a\"b".into(),
                samples: 57,
                lost_samples: 1,
                episodes: 2,
            },
        );
        s.loop_histogram = vec![0; 2 * HIST_BUCKETS as usize];
        s.loop_histogram[hist_bucket(3_000) as usize] += 4; // 3 ms, main
        s.loop_histogram[hist_bucket(200_000) as usize] += 1; // 200 ms, main
        s.loop_histogram[HIST_BUCKETS as usize + hist_bucket(20) as usize] += 2;

        let text = render(&s);

        assert!(
            text.contains(
                "profiler_samples_total{service=\"api\",name=\"node\",pid=\"42\",\
             cgroup=\"/a\\\"b\"} 57\n"
            ),
            "{text}"
        );
        let main = |le: &str| {
            let key = format!(
                "profiler_event_loop_iteration_seconds_bucket{{thread=\"main\",le=\"{le}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap()
                .parse::<u64>()
                .unwrap()
        };
        assert_eq!(main("0.001"), 0);
        assert_eq!(main("0.005"), 4);
        assert_eq!(main("0.1"), 4);
        assert_eq!(main("0.25"), 5);
        assert_eq!(main("+Inf"), 5);
        assert!(text.contains("profiler_event_loop_iteration_seconds_count{thread=\"other\"} 2\n"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let family = line.split(['{', ' ']).next().unwrap();
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
