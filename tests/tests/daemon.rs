//! `profiler daemon` against real processes: churn of node processes in a
//! cgroup, a real Prometheus server scraping the metrics, pushes to a
//! receiver that follows Pyroscope's ingest contract, config reload, a
//! full disk, and the last interval written at SIGTERM.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use integration_tests::{
    Cgroup, Target, can_profile, fixture, free_port, http_get, profiler_bin, rss_kib, scratch,
    signal,
};
use serde_json::Value;

/// A running daemon, stopped with SIGTERM (then killed) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let log = dir.join("daemon.log");
        let child = Command::new(profiler_bin())
            .arg("daemon")
            .arg("-o")
            .arg(dir.join("profiles"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("create the daemon log"))
            .spawn()
            .expect("start the daemon");
        Self { child, log }
    }

    /// A daemon sampling `cgroup`, with `interval_s` intervals, metrics on
    /// `metrics_port`, and more flags.
    fn on_cgroup(
        dir: &Path,
        cgroup: &Cgroup,
        interval_s: &str,
        metrics_port: u16,
        more: &[&str],
    ) -> Self {
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        let mut args = vec![
            "--cgroup",
            &cgroup.path,
            "--interval",
            interval_s,
            "--metrics-addr",
            &metrics_addr,
        ];
        args.extend_from_slice(more);
        Self::start(dir, &args)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("poll the daemon");
        assert!(
            status.is_none(),
            "the daemon exited ({status:?}):\n{}",
            self.log()
        );
    }

    /// SIGTERM, then waits; the exit status must be success.
    fn stop(&mut self) {
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                assert!(status.success(), "daemon exit {status}:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon ignored SIGTERM:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), libc::SIGTERM);
            thread::sleep(Duration::from_secs(2));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A node process spending its time in `computeHotPrimes`. Over a long run
/// TurboFan would inline it into its caller, and the perf map would then
/// name only the caller, so inlining is off.
fn hot_node(cgroup: &Cgroup) -> Target {
    let hot = fixture("hot.js");
    Target::spawn(
        cgroup
            .command(
                "node",
                &[
                    "--perf-basic-prof-only-functions",
                    "--no-turbo-inlining",
                    hot.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null()),
    )
}

fn index(dir: &Path) -> Vec<Value> {
    let text = fs::read_to_string(dir.join("profiles/index.json")).unwrap_or_default();
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn entries_of(index: &[Value], pid: u32) -> Vec<&Value> {
    index
        .iter()
        .filter(|e| e["pid"].as_u64() == Some(u64::from(pid)))
        .collect()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A metric's value from the daemon's endpoint (first series).
fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics")?;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until a metric reaches `at_least`.
fn wait_for_metric(port: u16, name: &str, at_least: f64, timeout: Duration) -> bool {
    wait_until(timeout, || {
        metric(port, name).is_some_and(|n| n >= at_least)
    })
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn churn_gives_every_process_its_intervals_and_memory_stays_flat() {
    if !can_profile("churn_gives_every_process_its_intervals_and_memory_stays_flat") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-churn") else {
        return;
    };
    let dir = scratch("daemon-churn");
    let port = free_port();
    let mut daemon = Daemon::on_cgroup(&dir, &cgroup, "10", port, &[]);
    let started = Instant::now();
    let at = |s: u64| started + Duration::from_secs(s);
    let sleep_until = |t: Instant| thread::sleep(t.saturating_duration_since(Instant::now()));

    // Four node processes come and go over two minutes, at most two at once.
    let mut rss = Vec::new();
    let sample_rss = |until: Instant, rss: &mut Vec<(f64, u64)>| {
        while Instant::now() < until {
            if let Some(kib) = rss_kib(daemon.child.id()) {
                rss.push((started.elapsed().as_secs_f64(), kib));
            }
            thread::sleep(Duration::from_secs(1));
        }
    };
    sample_rss(at(2), &mut rss);
    let mut a = hot_node(&cgroup);
    let (a_pid, a_start) = (a.pid(), now_s());
    sample_rss(at(5), &mut rss);
    let mut b = hot_node(&cgroup);
    let (b_pid, b_start) = (b.pid(), now_s());
    sample_rss(at(35), &mut rss);
    drop_target(&mut a);
    let a_end = now_s();
    sample_rss(at(45), &mut rss);
    let mut c = hot_node(&cgroup);
    let (c_pid, c_start) = (c.pid(), now_s());
    sample_rss(at(70), &mut rss);
    drop_target(&mut b);
    let b_end = now_s();
    sample_rss(at(80), &mut rss);
    let d = hot_node(&cgroup);
    let (d_pid, d_start) = (d.pid(), now_s());
    sample_rss(at(100), &mut rss);
    drop_target(&mut c);
    let c_end = now_s();
    sample_rss(at(118), &mut rss);

    let targets = metric(port, "profiler_targets");
    daemon.assert_running();
    sleep_until(at(118));
    let stop_s = now_s();
    daemon.stop();
    drop(d);

    let index = index(&dir);
    for (label, pid, start, end) in [
        ("a", a_pid, a_start, Some(a_end)),
        ("b", b_pid, b_start, Some(b_end)),
        ("c", c_pid, c_start, Some(c_end)),
        ("d", d_pid, d_start, None),
    ] {
        let entries = entries_of(&index, pid);
        assert!(
            !entries.is_empty(),
            "no interval of process {label} (pid {pid})"
        );
        let first = entries
            .iter()
            .map(|e| e["start_unix_s"].as_f64().unwrap())
            .fold(f64::MAX, f64::min);
        // Picked up within one interval of starting.
        assert!(
            first <= start + 10.0,
            "process {label} first profiled at {first}, started {start}"
        );
        for entry in &entries {
            assert_eq!(entry["cgroup"], cgroup.path.as_str(), "{entry}");
            assert_eq!(entry["name"], "node");
            // Every node process shares the service folder; its files carry
            // its pid.
            assert_eq!(entry["service"], "node");
            let file = entry["folded"].as_str().unwrap();
            assert!(
                file.starts_with("node/") && file.ends_with(&format!("Z-{pid}.folded")),
                "{entry}"
            );
            let begin = entry["start_unix_s"].as_f64().unwrap();
            if let Some(end) = end {
                // Dropped once it exited: no interval begins after its exit.
                assert!(
                    begin < end + 1.0,
                    "process {label} has an interval after it exited: {entry}"
                );
            }
            let folded =
                fs::read_to_string(dir.join("profiles").join(entry["folded"].as_str().unwrap()))
                    .expect("listed folded file");
            let total: u64 = folded
                .lines()
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum();
            assert_eq!(total, entry["samples"].as_u64().unwrap(), "{entry}");
            assert!(
                dir.join("profiles")
                    .join(entry["pprof"].as_str().unwrap())
                    .exists()
            );
        }
        let hot: u64 = entries
            .iter()
            .map(|e| {
                let text =
                    fs::read_to_string(dir.join("profiles").join(e["folded"].as_str().unwrap()))
                        .unwrap();
                text.lines()
                    .filter(|l| l.contains("computeHotPrimes"))
                    .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                    .sum::<u64>()
            })
            .sum();
        let samples: u64 = entries.iter().map(|e| e["samples"].as_u64().unwrap()).sum();
        assert!(
            hot * 10 >= samples * 8,
            "process {label}: computeHotPrimes in {hot} of {samples} samples"
        );
    }

    // SIGTERM wrote the partial interval of the process still running.
    let last = entries_of(&index, d_pid)
        .into_iter()
        .max_by(|x, y| {
            x["start_unix_s"]
                .as_f64()
                .partial_cmp(&y["start_unix_s"].as_f64())
                .unwrap()
        })
        .unwrap();
    let last_end = last["start_unix_s"].as_f64().unwrap() + last["duration_s"].as_f64().unwrap();
    assert!(
        (last_end - stop_s).abs() < 2.0,
        "last interval ends {last_end}, stopped {stop_s}"
    );
    // Partial, unless the stop came within a few samples of a cut, when
    // the partial interval holds no sample and writes no file.
    assert!(last["duration_s"].as_f64().unwrap() < 10.5, "{last}");
    assert_eq!(targets, Some(1.0), "only process d is sampled near the end");

    // Memory: flat after the first interval.
    let after_first: Vec<u64> = rss
        .iter()
        .filter(|(t, _)| *t >= 20.0)
        .map(|(_, kib)| *kib)
        .collect();
    let (low, high) = (
        *after_first.iter().min().unwrap(),
        *after_first.iter().max().unwrap(),
    );
    let at_20 = after_first[0];
    let last_rss = *after_first.last().unwrap();
    eprintln!(
        "daemon RSS after the first interval: {low}..{high} KiB (at 20 s {at_20} KiB, at the end {last_rss} KiB)"
    );
    assert!(
        last_rss <= at_20 + 8 * 1024,
        "RSS grew from {at_20} KiB to {last_rss} KiB over the churn"
    );
}

fn drop_target(target: &mut Target) {
    signal(target.pid(), libc::SIGKILL);
    target.wait();
}

#[test]
fn prometheus_scrapes_the_sample_counter() {
    if !can_profile("prometheus_scrapes_the_sample_counter") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-prom") else {
        return;
    };
    let dir = scratch("daemon-prometheus");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _node = hot_node(&cgroup);
    let mut daemon = Daemon::on_cgroup(&dir, &cgroup, "3", metrics_port, &[]);

    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: profiler\n    \
             static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let mut prometheus = Target::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("prometheus.log")).unwrap()),
    );

    let query = "/api/v1/query?query=profiler_samples_total";
    let mut answer = String::new();
    let found = wait_until(Duration::from_secs(60), || {
        let Some((200, body)) = http_get(prom_port, query) else {
            return false;
        };
        answer = body;
        let json: Value = serde_json::from_str(&answer).unwrap_or_default();
        json["data"]["result"].as_array().is_some_and(|series| {
            series.iter().any(|s| {
                s["metric"]["name"] == "node"
                    && s["metric"]["cgroup"] == cgroup.path.as_str()
                    && s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                        > 0.0
            })
        })
    });
    daemon.assert_running();
    assert!(
        found,
        "Prometheus never returned the sample counter; last answer {answer}\n{}",
        fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );

    // The scrape health and the daemon's own figures are there too.
    let (_, up) = http_get(prom_port, "/api/v1/query?query=up").unwrap();
    assert!(up.contains("\"1\""), "{up}");
    let (_, rss) = http_get(
        prom_port,
        "/api/v1/query?query=process_resident_memory_bytes",
    )
    .unwrap();
    assert!(rss.contains("\"result\":[{"), "{rss}");
    prometheus.wait_killed();
    daemon.stop();
}

trait Kill {
    fn wait_killed(&mut self);
}

impl Kill for Target {
    fn wait_killed(&mut self) {
        signal(self.pid(), libc::SIGTERM);
        self.wait();
    }
}

/// Starts the ingest receiver on `port`, writing what it accepts to `out`.
fn receiver(port: u16, out: &Path, token: &str) -> Target {
    let target = Target::spawn(
        Command::new("python3")
            .arg(fixture("pyroscope_receiver.py"))
            .arg(port.to_string())
            .arg(out)
            .arg(fixture("profile.proto"))
            .arg(token)
            .stdout(Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(20), || http_get(port, "/").is_some()),
        "the receiver did not start"
    );
    target
}

fn received(out: &Path) -> Vec<Value> {
    fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("receiver record"))
        .collect()
}

#[test]
fn pushes_survive_a_receiver_outage_within_the_queue_bound() {
    if !can_profile("pushes_survive_a_receiver_outage_within_the_queue_bound") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-push") else {
        return;
    };
    let dir = scratch("daemon-push");
    let out = dir.join("received.jsonl");
    let (push_port, metrics_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{push_port}");
    let node = hot_node(&cgroup);
    let pid = node.pid();
    let push = [
        "--push-queue",
        "3",
        "--pyroscope-url",
        &url,
        "--pyroscope-token",
        "s3cret",
    ];
    let mut daemon = Daemon::on_cgroup(&dir, &cgroup, "2", metrics_port, &push);

    // The receiver is down for about six intervals: more than the queue
    // holds, so the oldest are dropped, and counted.
    thread::sleep(Duration::from_secs(13));
    daemon.assert_running();
    let outage_end = now_s();
    let _receiver = receiver(push_port, &out, "s3cret");
    // Backoff is at most a minute; here it is at 8 s after six failures.
    assert!(
        wait_until(Duration::from_secs(40), || metric(
            metrics_port,
            "profiler_push_queue_length"
        ) == Some(0.0)
            && !received(&out).is_empty()),
        "the queue never emptied:\n{}",
        daemon.log()
    );
    thread::sleep(Duration::from_secs(3));
    daemon.stop();
    drop(node);

    let written = entries_of(&index(&dir), pid)
        .iter()
        .map(|e| e["start_unix_s"].as_f64().unwrap().floor() as u64)
        .collect::<BTreeSet<u64>>();
    let records = received(&out);
    let pushed: BTreeSet<u64> = records
        .iter()
        .filter(|r| r["labels"]["pid"] == pid.to_string().as_str())
        .map(|r| r["from"].as_u64().unwrap())
        .collect();
    let log = daemon.log();
    let dropped = log.matches("the Pyroscope queue is full").count();
    assert!(dropped >= 1, "no drop while the receiver was down:\n{log}");
    assert_eq!(
        written.len(),
        pushed.len() + dropped,
        "written {written:?}, pushed {pushed:?}, dropped {dropped}"
    );
    assert!(
        pushed.is_subset(&written),
        "pushed {pushed:?} written {written:?}"
    );
    // Within the bound nothing is lost: the newest intervals of the outage,
    // which the queue held, and every one after it arrived.
    let during: Vec<u64> = written
        .iter()
        .copied()
        .filter(|&s| (s as f64) < outage_end)
        .collect();
    let must_arrive: BTreeSet<u64> = during
        .iter()
        .rev()
        .take(2)
        .copied()
        .chain(
            written
                .iter()
                .copied()
                .filter(|&s| (s as f64) >= outage_end),
        )
        .collect();
    assert!(
        must_arrive.is_subset(&pushed),
        "missing {:?}",
        must_arrive.difference(&pushed)
    );

    let index = index(&dir);
    for record in records
        .iter()
        .filter(|r| r["labels"]["pid"] == pid.to_string().as_str())
    {
        // Pyroscope's application name carries the profile type.
        assert_eq!(record["app"], "node.cpu");
        assert_eq!(record["labels"]["cgroup"], cgroup.path.as_str());
        // Outside a systemd service, the service is the process name.
        assert_eq!(record["labels"]["service"], "node");
        assert_eq!(record["sample_rate"], "19");
        assert_eq!(record["spy_name"], "ebpfspy");
        assert_eq!(record["sample_types"][0], "samples");
        let entry = index
            .iter()
            .find(|e| {
                e["start_unix_s"].as_f64().unwrap().floor() as u64
                    == record["from"].as_u64().unwrap()
                    && e["pid"].as_u64() == Some(u64::from(pid))
            })
            .expect("a pushed interval is on disk too");
        assert_eq!(record["samples"], entry["samples"], "{record}");
    }
    assert!(
        records.iter().any(|r| r["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("computeHotPrimes"))),
        "no pushed profile names the hot function"
    );
}

#[test]
fn wrong_token_is_rejected_and_counted() {
    if !can_profile("wrong_token_is_rejected_and_counted") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-auth") else {
        return;
    };
    let dir = scratch("daemon-auth");
    let out = dir.join("received.jsonl");
    let (push_port, metrics_port) = (free_port(), free_port());
    let _receiver = receiver(push_port, &out, "right");
    let _node = hot_node(&cgroup);
    let url = format!("http://127.0.0.1:{push_port}");
    let push = ["--pyroscope-url", &url, "--pyroscope-token", "wrong"];
    let mut daemon = Daemon::on_cgroup(&dir, &cgroup, "2", metrics_port, &push);

    assert!(
        wait_for_metric(
            metrics_port,
            "profiler_push_dropped_total",
            1.0,
            Duration::from_secs(20)
        ),
        "rejections were not counted:\n{}",
        daemon.log()
    );
    daemon.stop();
    assert!(received(&out).is_empty());
    assert!(daemon.log().contains("HTTP 401"), "{}", daemon.log());
}

#[test]
fn sighup_reloads_the_config_and_a_bad_one_is_kept_out() {
    if !can_profile("sighup_reloads_the_config_and_a_bad_one_is_kept_out") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-hup") else {
        return;
    };
    let dir = scratch("daemon-reload");
    let config = dir.join("daemon.toml");
    let write_config = |hz: u32| {
        fs::write(
            &config,
            format!(
                "frequency_hz = {hz}\ninterval_s = 2\n[select]\ncgroup = '{}'\n[metrics]\nlisten = 'off'\n",
                cgroup.path
            ),
        )
        .unwrap();
    };
    write_config(19);
    let node = hot_node(&cgroup);
    let mut daemon = Daemon::start(&dir, &["--config", config.to_str().unwrap()]);

    thread::sleep(Duration::from_secs(5));
    write_config(49);
    signal(daemon.pid(), libc::SIGHUP);
    let reloaded = now_s();
    thread::sleep(Duration::from_secs(5));
    fs::write(&config, "frequency_hz = 'fast'\n").unwrap();
    signal(daemon.pid(), libc::SIGHUP);
    thread::sleep(Duration::from_secs(3));
    daemon.assert_running();
    daemon.stop();
    drop(node);

    let log = daemon.log();
    assert!(log.contains("keeping the running configuration"), "{log}");
    let all = index(&dir);
    let entries = entries_of(&all, node_pid(&dir));
    let before: Vec<u64> = entries
        .iter()
        .filter(|e| e["start_unix_s"].as_f64().unwrap() < reloaded - 0.5)
        .map(|e| e["frequency_hz"].as_u64().unwrap())
        .collect();
    let after: Vec<u64> = entries
        .iter()
        .filter(|e| e["start_unix_s"].as_f64().unwrap() > reloaded + 0.5)
        .map(|e| e["frequency_hz"].as_u64().unwrap())
        .collect();
    assert!(
        !before.is_empty() && before.iter().all(|&hz| hz == 19),
        "{before:?}"
    );
    assert!(
        !after.is_empty() && after.iter().all(|&hz| hz == 49),
        "{after:?}"
    );
}

fn node_pid(dir: &Path) -> u32 {
    index(dir)
        .first()
        .and_then(|e| e["pid"].as_u64())
        .expect("an interval was written") as u32
}

#[test]
fn full_disk_is_logged_and_sampling_goes_on() {
    if !can_profile("full_disk_is_logged_and_sampling_goes_on") {
        return;
    }
    let Some(cgroup) = Cgroup::create("profiler-full") else {
        return;
    };
    let dir = scratch("daemon-full-disk");
    let profiles = dir.join("profiles");
    fs::create_dir_all(&profiles).unwrap();
    // A tiny tmpfs: a few intervals fill it.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48k", "tmpfs"])
        .arg(&profiles)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping full_disk_is_logged_and_sampling_goes_on: cannot mount a tmpfs");
        return;
    }
    let _unmount = Unmount(profiles.clone());
    let metrics_port = free_port();
    let _node = hot_node(&cgroup);
    let mut daemon = Daemon::on_cgroup(&dir, &cgroup, "1", metrics_port, &[]);

    assert!(
        wait_for_metric(
            metrics_port,
            "profiler_write_errors_total",
            2.0,
            Duration::from_secs(40)
        ),
        "the disk never filled:\n{}",
        daemon.log()
    );
    let samples_then = metric(metrics_port, "profiler_kernel_samples_total").unwrap();
    thread::sleep(Duration::from_secs(3));
    daemon.assert_running();
    let samples_now = metric(metrics_port, "profiler_kernel_samples_total").unwrap();
    assert!(
        samples_now > samples_then,
        "sampling stopped on a full disk"
    );
    daemon.stop();

    let log = daemon.log();
    assert!(log.contains("No space left on device"), "{log}");
    assert_eq!(
        log.matches("sampling goes on").count(),
        1,
        "the failure is logged once:\n{log}"
    );
    // What is listed is complete, and nothing half-written is left.
    for entry in index(&dir) {
        let folded = fs::read_to_string(profiles.join(entry["folded"].as_str().unwrap())).unwrap();
        assert!(folded.ends_with('\n'));
    }
    let leftovers: Vec<String> = walk(&profiles)
        .into_iter()
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.extend(walk(&entry.path()));
        } else {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names
}

#[test]
fn bad_selection_and_busy_metrics_port_are_refused_at_start() {
    let dir = scratch("daemon-bad-start");
    let run = |args: &[&str]| {
        Command::new(profiler_bin())
            .arg("daemon")
            .arg("-o")
            .arg(dir.join("profiles"))
            .args(args)
            .output()
            .expect("run the daemon")
    };

    let none = run(&[]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("choose what to sample"));

    let regex = run(&["--name", "(node"]);
    assert!(String::from_utf8_lossy(&regex.stderr).contains("bad process-name regex"));

    if !can_profile("bad_selection_and_busy_metrics_port_are_refused_at_start") {
        return;
    }
    let gone = run(&["--pid", "999999999", "--metrics-addr", "off"]);
    assert!(!gone.status.success());
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains("no process with pid 999999999"), "{stderr}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let taken = run(&[
        "--name",
        "^nothing-runs-by-this-name$",
        "--metrics-addr",
        &addr,
    ]);
    assert!(!taken.status.success());
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
}

/// The systemd unit runs the daemon as an unprivileged user with a few
/// capabilities; this runs it the same way, with the unit's own list.
#[test]
fn daemon_samples_with_only_the_capabilities_of_its_systemd_unit() {
    if !can_profile("daemon_samples_with_only_the_capabilities_of_its_systemd_unit") {
        return;
    }
    let unit = fs::read_to_string(integration_tests::root().join("dist/profiler-daemon.service"))
        .expect("the systemd unit");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit lists ambient capabilities")
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(
        !caps.iter().any(|c| c == "+sys_admin"),
        "the unit asks for CAP_SYS_ADMIN"
    );
    let caps = caps.join(",");
    let probe = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg("true")
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipping: setpriv cannot grant {caps} here (bounding set)");
        return;
    }

    let dir = scratch("daemon-capabilities");
    let out = dir.join("profiles");
    fs::create_dir_all(&out).unwrap();
    let chown = Command::new("chown")
        .args(["65534:65534"])
        .arg(&out)
        .status();
    assert!(chown.is_ok_and(|s| s.success()));
    let spin = integration_tests::c_fixture("split");
    let target = Target::spawn(Command::new(&spin).stdout(Stdio::null()));
    let log = dir.join("daemon.log");
    let mut daemon = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(profiler_bin())
        .args(["daemon", "--interval", "2", "--frequency", "99"])
        .args(["--metrics-addr", "off", "-p"])
        .arg(target.pid().to_string())
        .arg("-o")
        .arg(&out)
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the daemon through setpriv");

    thread::sleep(Duration::from_secs(5));
    signal(daemon.id(), libc::SIGTERM);
    let status = daemon.wait().unwrap();
    let log = fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{log}");

    // Intervals are cut on wall-clock boundaries, so the first and last are
    // partial; the shares are judged over all of them together.
    let index = index(&dir);
    let entries = entries_of(&index, target.pid());
    assert!(!entries.is_empty(), "nothing written:\n{log}");
    let (total, shares) = frame_shares(&out, &entries, &["hot_three"]);
    assert!(total >= 100, "only {total} samples in 5 s at 99 Hz:\n{log}");
    assert!(
        (60.0..=90.0).contains(&shares[0]),
        "hot_three has {:.1}% of {total} samples, expected about 75%",
        shares[0]
    );
}

/// Samples in the intervals `entries` of the store at `out`, and the share
/// of them, in percent, with each of `frames` on the stack.
fn frame_shares(out: &Path, entries: &[&Value], frames: &[&str]) -> (u64, Vec<f64>) {
    let mut total = 0;
    let mut hits = vec![0; frames.len()];
    for entry in entries {
        let path = out.join(entry["folded"].as_str().unwrap());
        for line in fs::read_to_string(path).unwrap().lines() {
            let (stack, count) = line.rsplit_once(' ').expect("`stack count` line");
            let count: u64 = count.parse().expect("count");
            total += count;
            for (frame, hit) in frames.iter().zip(&mut hits) {
                if stack.split(';').any(|f| f == *frame) {
                    *hit += count;
                }
            }
        }
    }
    let shares = hits
        .iter()
        .map(|&hit| 100.0 * hit as f64 / total.max(1) as f64)
        .collect();
    (total, shares)
}

/// In host mode a process is named from its first second with samples, so
/// one that starts and exits between two cuts still gets named stacks.
#[test]
fn host_mode_names_a_process_that_exits_before_the_cut() {
    if !can_profile("host_mode_names_a_process_that_exits_before_the_cut") {
        return;
    }
    let dir = scratch("daemon-host");
    let mut daemon = Daemon::start(&dir, &["--host", "--interval", "60", "--frequency", "99"]);
    assert!(
        wait_until(Duration::from_secs(20), || daemon
            .log()
            .contains("sampling every process")),
        "the daemon did not start:\n{}",
        daemon.log()
    );

    let mut split = Command::new(integration_tests::c_fixture("split"))
        .arg("4")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the split fixture");
    let pid = split.id();
    assert!(split.wait().unwrap().success());
    daemon.stop();

    let index = index(&dir);
    let entries = entries_of(&index, pid);
    assert!(
        !entries.is_empty(),
        "no interval for pid {pid}:\n{}",
        daemon.log()
    );
    let (total, shares) = frame_shares(&dir.join("profiles"), &entries, &["main", "hot_three"]);
    assert!(total >= 200, "only {total} samples in 4 s at 99 Hz");
    // Samples of the first second, before the mappings are read, may be
    // unnamed.
    assert!(
        shares[0] >= 60.0,
        "{:.1}% of {total} samples under main",
        shares[0]
    );
    let hot_of_named = 100.0 * shares[1] / shares[0];
    assert!(
        (60.0..=90.0).contains(&hot_of_named),
        "hot_three has {hot_of_named:.1}% of the named samples, expected about 75%"
    );
}

/// When the unwind-row array is full, the rows of binaries no process maps
/// any more are given to the next binary, and the kernel side's cache of
/// row lookups is cleared so that no lookup finds a row of the binary that
/// held them before. Two builds of one program without frame pointers,
/// one after the other, with room for one of them: the second still comes
/// out whole.
#[test]
fn unwind_rows_freed_by_an_exited_binary_serve_the_next_one() {
    if !can_profile("unwind_rows_freed_by_an_exited_binary_serve_the_next_one") {
        return;
    }
    let flags = ["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"];
    let first = integration_tests::c_fixture_with("split", "split-no-fp-a", &flags);
    let second = integration_tests::c_fixture_with("split", "split-no-fp-b", &flags);
    let dir = scratch("daemon-row-reuse");

    // What one process of the program needs: its rows, libc's and the
    // loader's, as `profiler attach -v` reports them.
    let probe = Command::new(profiler_bin())
        .args(["attach", "-v", "-q", "-d", "1", "-o"])
        .arg(dir.join("probe"))
        .arg("--")
        .arg(&first)
        .arg("1")
        .output()
        .expect("run the profiler");
    let log = String::from_utf8_lossy(&probe.stderr);
    let rows: Vec<(String, u32)> = log
        .lines()
        .filter_map(|l| {
            let (_, message) = l.split_once("] ")?;
            let (path, rest) = message.split_once(": ")?;
            let (n, _) = rest.split_once(" unwind rows at ")?;
            Some((path.to_owned(), n.parse().ok()?))
        })
        .collect();
    let own = rows
        .iter()
        .find(|(path, _)| path.ends_with("split-no-fp-a"))
        .map(|(_, n)| *n)
        .unwrap_or_else(|| panic!("no rows for the program:\n{log}"));
    let all: u32 = rows.iter().map(|(_, n)| n).sum();
    let capacity = (all + own / 2).to_string();

    let mut daemon = Daemon::start(
        &dir,
        &[
            "-v",
            "--name",
            "^split-no-fp-",
            "--interval",
            "2",
            "--frequency",
            "99",
            "--metrics-addr",
            "off",
            "--unwind-rows",
            &capacity,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || daemon
            .log()
            .contains("no process matches yet")),
        "the daemon did not start:\n{}",
        daemon.log()
    );
    let run = |bin: &Path| {
        let mut child = Command::new(bin)
            .arg("3")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the fixture");
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        pid
    };
    run(&first);
    // The first process is dropped, and its rows freed, after a cut.
    thread::sleep(Duration::from_secs(3));
    let pid = run(&second);
    daemon.stop();

    let log = daemon.log();
    assert!(
        log.contains("cleared the row cache"),
        "rows were not reused:\n{log}"
    );
    let index = index(&dir);
    let entries = entries_of(&index, pid);
    assert!(!entries.is_empty(), "no interval for pid {pid}:\n{log}");
    let (total, shares) = frame_shares(
        &dir.join("profiles"),
        &entries,
        &["__libc_start_call_main", "hot_three"],
    );
    assert!(total >= 150, "only {total} samples in 3 s at 99 Hz");
    assert!(
        shares[0] >= 90.0,
        "{:.1}% of {total} stacks reach libc's entry",
        shares[0]
    );
    let hot_of_whole = 100.0 * shares[1] / shares[0];
    assert!(
        (60.0..=90.0).contains(&hot_of_whole),
        "hot_three has {hot_of_whole:.1}% of the whole stacks, expected about 75%"
    );
}
