//! Event-loop blocking episodes, measured on node servers that block their
//! loop on purpose while serving traffic.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{Target, attach, c_fixture, can_profile, fixture, scratch};

/// A blocking server and the traffic sent to it.
struct Server {
    server: Target,
    _traffic: Target,
    log: PathBuf,
}

/// Starts `blocking-server.js BLOCK_MS EVERY_MS MODE` with its block log
/// in `dir`, and light traffic for `traffic_s` seconds.
fn start_server(dir: &Path, block_ms: u32, every_ms: u32, mode: &str, traffic_s: u32) -> Server {
    let log = dir.join("blocks.log");
    let server = Target::spawn(
        Command::new("node")
            .arg("--perf-basic-prof-only-functions")
            .arg("--interpreted-frames-native-stack")
            .arg(fixture("blocking-server.js"))
            .args([block_ms.to_string(), every_ms.to_string(), mode.to_owned()])
            .stdout(fs::File::create(&log).unwrap()),
    );
    let port = wait_for_port(&log);
    let traffic = Target::spawn(
        Command::new("node")
            .arg(fixture("traffic.js"))
            .args([port.to_string(), traffic_s.to_string()])
            .stderr(Stdio::null()),
    );
    thread::sleep(Duration::from_millis(500));
    Server {
        server,
        _traffic: traffic,
        log,
    }
}

fn wait_for_port(log: &Path) -> u16 {
    for _ in 0..100 {
        if let Ok(file) = fs::File::open(log)
            && let Some(Ok(line)) = BufReader::new(file).lines().next()
            && let Ok(port) = line.trim().parse()
        {
            return port;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("the fixture server did not print its port");
}

/// Blocks the server logged, as (start, end) in Unix ms.
fn logged_blocks(log: &Path) -> Vec<(f64, f64)> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|v| (v["startMs"].as_f64().unwrap(), v["endMs"].as_f64().unwrap()))
        .collect()
}

fn episodes(dir: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(dir.join("episodes.json")).expect("episodes.json");
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn every_blocking_episode_is_found_with_its_duration_and_function() {
    if !can_profile("every_blocking_episode_is_found_with_its_duration_and_function") {
        return;
    }
    let dir = scratch("loop-blocking");
    let server = start_server(&dir, 200, 2000, "spin", 14);

    let run = attach(
        &dir.join("out"),
        &["-p", &server.server.pid().to_string(), "-d", "9"],
    );

    run.assert_success();
    let summary = run.summary();
    let start_ms = summary["started_unix_s"].as_f64().unwrap() * 1000.0;
    let end_ms = start_ms + summary["duration_s"].as_f64().unwrap() * 1000.0;
    let blocks: Vec<(f64, f64)> = logged_blocks(&server.log)
        .into_iter()
        .filter(|(start, end)| *start >= start_ms && *end <= end_ms)
        .collect();
    assert!(
        blocks.len() >= 3,
        "the fixture blocked {} times",
        blocks.len()
    );

    let episodes = episodes(&run.dir);
    let count = episodes.len() as i64;
    assert!(
        (count - blocks.len() as i64).abs() <= 1,
        "{count} episodes for {} blocks: {episodes:#?}",
        blocks.len()
    );
    let all_blocks = logged_blocks(&server.log);
    for episode in &episodes {
        let start = start_ms + episode["start_s"].as_f64().unwrap() * 1000.0;
        let duration = episode["duration_ms"].as_f64().unwrap();
        // The logged block nearest to the episode's start; one still under
        // way when profiling stopped may end after the profile.
        let (block_start, block_end) = *all_blocks
            .iter()
            .min_by(|a, b| (a.0 - start).abs().total_cmp(&(b.0 - start).abs()))
            .unwrap();
        let real = block_end - block_start;
        if episode["in_progress"] == true {
            // Cut short by the end of the profile.
            assert!(duration <= real * 1.10, "{episode}");
        } else {
            assert!(
                (duration - real).abs() <= real * 0.10,
                "episode of {duration:.1} ms for a block of {real:.1} ms"
            );
        }
        assert!(
            (start - block_start).abs() < 100.0,
            "episode starts {start} vs {block_start}"
        );
        assert_eq!(episode["thread"], "node");
        assert_eq!(episode["main_thread"], true);
        // A spinning thread is on the CPU, unless the machine is so busy
        // that it waits to run; on a shared machine allow for some of that.
        let on_cpu = episode["on_cpu_ms"].as_f64().unwrap();
        assert!(
            on_cpu >= 0.25 * duration,
            "{on_cpu} ms on-CPU of {duration} ms: {episode}"
        );
        let culprit = episode["top_js"][0]["frame"].as_str().unwrap();
        assert!(culprit.starts_with("blockTheLoop "), "{culprit}");
    }

    // The blocking function carries the episode samples, in the folded
    // stacks and in the flame graph.
    let folded = fs::read_to_string(run.dir.join("blocking.folded")).unwrap();
    let (mut total, mut in_function) = (0u64, 0u64);
    for line in folded.lines() {
        let (stack, count) = line.rsplit_once(' ').unwrap();
        let count: u64 = count.parse().unwrap();
        total += count;
        if stack.contains(";blockTheLoop ") {
            in_function += count;
        }
    }
    assert!(total > 0);
    let share = 100.0 * in_function as f64 / total as f64;
    assert!(
        share >= 90.0,
        "blockTheLoop holds {share:.1}% of episode samples"
    );

    let svg = fs::read_to_string(run.dir.join("blocking.svg")).unwrap();
    let doc = integration_tests::parse_svg(&svg);
    let svg_share: f64 = doc
        .descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .filter(|t| t.starts_with("blockTheLoop "))
        .filter_map(|t| {
            t.rsplit_once(", ")?
                .1
                .trim_end_matches("%)")
                .parse::<f64>()
                .ok()
        })
        .sum();
    assert!(
        svg_share >= 90.0,
        "blockTheLoop is {svg_share}% of blocking.svg"
    );

    let event_loop = &summary["event_loop"];
    assert_eq!(
        event_loop["episode_count"].as_u64(),
        Some(episodes.len() as u64)
    );
    let probe = event_loop["probe"].as_str().unwrap_or_default();
    assert!(
        [
            "fentry/fexit do_epoll_wait",
            "raw tracepoints sys_enter/sys_exit"
        ]
        .contains(&probe),
        "{event_loop}"
    );
    assert!(
        event_loop["iterations"].as_u64().unwrap() > 100,
        "{event_loop}"
    );
    let max = event_loop["max_ms"].as_f64().unwrap();
    assert!((180.0..240.0).contains(&max), "{max}");
    assert!(event_loop["p50_ms"].as_f64().unwrap() < 20.0);
    assert_eq!(
        event_loop["main_thread"]["episode_count"].as_u64(),
        Some(episodes.len() as u64)
    );
    let stdout = run.stdout();
    assert!(
        stdout.contains("blocking episode(s) of 50 ms or more"),
        "{stdout}"
    );
    assert!(stdout.contains("(main, tid"), "{stdout}");
}

#[test]
fn quiet_loop_has_no_episodes() {
    if !can_profile("quiet_loop_has_no_episodes") {
        return;
    }
    let dir = scratch("loop-quiet");
    let server = start_server(&dir, 0, 0, "spin", 8);

    let run = attach(
        &dir.join("out"),
        &["-p", &server.server.pid().to_string(), "-d", "4"],
    );

    run.assert_success();
    assert!(episodes(&run.dir).is_empty());
    let event_loop = &run.summary()["event_loop"];
    assert_eq!(event_loop["episode_count"], 0);
    assert!(
        event_loop["iterations"].as_u64().unwrap() > 100,
        "{event_loop}"
    );
    assert!(event_loop["max_ms"].as_f64().unwrap() < 50.0);
    assert!(!run.dir.join("blocking.svg").exists());
}

#[test]
fn stall_off_the_cpu_is_reported_as_such() {
    if !can_profile("stall_off_the_cpu_is_reported_as_such") {
        return;
    }
    let dir = scratch("loop-off-cpu");
    let server = start_server(&dir, 150, 1000, "sleep", 8);

    let run = attach(
        &dir.join("out"),
        &["-p", &server.server.pid().to_string(), "-d", "4"],
    );

    run.assert_success();
    let episodes = episodes(&run.dir);
    assert!(episodes.len() >= 3, "{episodes:#?}");
    for episode in &episodes {
        if episode["sampled_ms"].as_f64().unwrap() == 0.0 {
            // Ended before sampling began: nothing to judge it by.
            continue;
        }
        assert_eq!(episode["off_cpu"], true, "{episode}");
        // On and off CPU are judged over the part of the episode inside
        // the profile; the first may have begun before sampling did.
        let off = episode["off_cpu_ms"].as_f64().unwrap();
        let sampled = episode["sampled_ms"].as_f64().unwrap();
        let duration = episode["duration_ms"].as_f64().unwrap();
        assert!(sampled <= duration + 0.001, "{episode}");
        if episode["start_s"].as_f64().unwrap() >= 0.0 {
            assert_eq!(sampled, duration, "{episode}");
        }
        assert!(
            off >= 0.8 * sampled,
            "{off} ms off-CPU of {sampled} ms sampled of a 150 ms wait"
        );
    }
}

#[test]
fn tracking_can_be_turned_off_and_is_absent_without_a_loop() {
    if !can_profile("tracking_can_be_turned_off_and_is_absent_without_a_loop") {
        return;
    }
    let dir = scratch("loop-off");
    let server = start_server(&dir, 100, 500, "spin", 6);

    let off = attach(
        &dir.join("off"),
        &[
            "-p",
            &server.server.pid().to_string(),
            "-d",
            "2",
            "--no-event-loop",
        ],
    );

    off.assert_success();
    assert!(off.summary()["event_loop"].is_null());
    assert!(!off.dir.join("episodes.json").exists());

    let native = Target::spawn(&mut Command::new(c_fixture("split")));
    let plain = attach(
        &dir.join("native"),
        &["-p", &native.pid().to_string(), "-d", "1"],
    );
    plain.assert_success();
    assert!(
        plain.summary()["event_loop"].is_null(),
        "no epoll thread, no loop report"
    );
}
