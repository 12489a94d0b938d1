//! The example dashboard API under load: the profiler must name the JS
//! functions behind its synchronous hotspots.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{Target, attach, can_profile, root, scratch};

#[test]
fn baseline_api_hotspots_are_named_under_load() {
    if !can_profile("baseline_api_hotspots_are_named_under_load") {
        return;
    }
    let example = root().join("examples/dashboard-api");
    assert!(
        example.join("node_modules").exists(),
        "the example's npm packages are missing; `cargo xtask test` installs them"
    );
    let mut server = Command::new("node")
        .args([
            "--perf-basic-prof-only-functions",
            "--interpreted-frames-native-stack",
        ])
        .arg("server.js")
        .current_dir(&example)
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the API");
    let stdout = server.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.starts_with("listening on"))
        .expect("the API printed its address");
    thread::spawn(move || lines.for_each(drop));
    let url = listening
        .split_whitespace()
        .nth(2)
        .expect("listening on URL")
        .to_owned();
    let pid = server.id();
    let _server = Target::adopt(server);
    thread::sleep(Duration::from_millis(300));
    let dir = scratch("dashboard");

    let run = attach(
        &dir.join("profile"),
        &[
            "-p",
            &pid.to_string(),
            "--",
            "node",
            example.join("loadtest.js").to_str().unwrap(),
            "--url",
            &url,
            "--connections",
            "100",
            "--warmup",
            "2",
            "--duration",
            "8",
            "--out",
            dir.join("load.json").to_str().unwrap(),
        ],
    );

    run.assert_success();
    let summary = run.summary();
    // Share of samples whose innermost JS frame is each function, from the
    // folded stacks (JS frames end in `_[j]`).
    let folded = run.folded();
    let total: u64 = folded.iter().map(|(_, n)| n).sum();
    let running_share = |names: &[&str]| -> f64 {
        let hits: u64 = folded
            .iter()
            .filter(|(stack, _)| {
                let innermost = stack.split(';').rev().find(|f| f.ends_with("_[j]"));
                innermost.is_some_and(|frame| {
                    names
                        .iter()
                        .any(|name| frame.starts_with(&format!("{name} ")))
                })
            })
            .map(|(_, n)| n)
            .sum();
        100.0 * hits as f64 / total as f64
    };
    // The hashing (the app's function, or node's pbkdf2Sync it calls: the
    // frame-pointer walk out of OpenSSL's assembly can skip the caller),
    // the aggregation and the regex search, by JS name.
    let top_js: Vec<&str> = summary["top_js"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["frame"].as_str().unwrap())
        .collect();
    for names in [
        &["hashPassword", "pbkdf2Sync"][..],
        &["aggregateMetrics"],
        &["searchEvents"],
    ] {
        let share = running_share(names);
        assert!(
            share >= 1.0,
            "{names:?} ran in {share:.2}% of samples; top JS: {top_js:?}"
        );
    }
    assert!(
        top_js.iter().any(|f| f.starts_with("searchEvents ")),
        "the regex search leads the JS functions: {top_js:?}"
    );
    let main = &summary["event_loop"]["main_thread"];
    assert!(
        main["episode_count"].as_u64().unwrap() > 0,
        "the baseline blocks its loop: {main}"
    );
}
