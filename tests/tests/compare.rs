//! `profiler diff` and `profiler report` on profiles of real processes, and
//! their errors on bad input.

use std::{fs, process::Command, time::Duration};

use integration_tests::{Target, attach, c_fixture, can_profile, profiler_bin, scratch};

fn profiler(args: &[&str]) -> std::process::Output {
    Command::new(profiler_bin())
        .args(args)
        .output()
        .expect("run the profiler")
}

#[test]
fn diff_shows_a_removed_function_as_the_largest_negative_change() {
    if !can_profile("diff_shows_a_removed_function_as_the_largest_negative_change") {
        return;
    }
    let bin = c_fixture("split");
    let dir = scratch("compare-diff");
    let before_target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let before = attach(
        &dir.join("before"),
        &["-p", &before_target.pid().to_string(), "-d", "2"],
    );
    drop(before_target);
    let after_target = Target::spawn(Command::new(&bin).args(["0", "cold-only"]))
        .settle(Duration::from_millis(200));
    let after = attach(
        &dir.join("after"),
        &[
            "-p",
            &after_target.pid().to_string(),
            "-d",
            "2",
            "-F",
            "199",
        ],
    );
    before.assert_success();
    after.assert_success();

    let out_dir = dir.join("diff");
    let output = profiler(&[
        "diff",
        dir.join("before").to_str().unwrap(),
        dir.join("after").to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]);

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("different frequencies (99 Hz and 199 Hz)"),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out_dir.join("diff.json")).unwrap()).unwrap();
    let changes = json["changes"].as_array().unwrap();
    let most_negative = changes
        .iter()
        .min_by(|a, b| {
            let change = |c: &serde_json::Value| c["total_change"].as_f64().unwrap();
            change(a).total_cmp(&change(b))
        })
        .unwrap();
    assert_eq!(most_negative["frame"], "hot_three", "{changes:#?}");
    assert!(most_negative["total_change"].as_f64().unwrap() < -60.0);
    let md = fs::read_to_string(out_dir.join("diff.md")).unwrap();
    assert!(md.contains("| `hot_three` |"), "{md}");
    assert!(md.contains("different frequencies"), "{md}");
    let svg = fs::read_to_string(out_dir.join("diff.svg")).unwrap();
    integration_tests::parse_svg(&svg);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("hot_three"), "{stdout}");

    // The report of the baseline, as JSON and as Markdown.
    let report = profiler(&[
        "report",
        dir.join("before").to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(report.status.success());
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["top_self"][0]["frame"], "spin");
    assert_eq!(report["top_total"][0]["total_percent"], 100.0);
    let md = profiler(&[
        "report",
        dir.join("before").to_str().unwrap(),
        "--format",
        "md",
    ]);
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(
        md.contains("| frame | self | total |") && md.contains("| `spin` |"),
        "{md}"
    );
}

#[test]
fn bad_input_to_diff_and_report_is_named_and_writes_nothing() {
    let dir = scratch("compare-bad");
    let good = dir.join("good.folded");
    fs::write(&good, "main;work 3\nmain;rest 1\n").unwrap();
    let bad = dir.join("bad.folded");
    fs::write(&bad, "main;work 3\n\nmain;rest many\n").unwrap();
    let out_dir = dir.join("out");

    let malformed = profiler(&[
        "diff",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(malformed.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(
        stderr.contains("bad.folded:3: `many` is not a sample count"),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "nothing written for bad input");

    let missing = profiler(&["report", dir.join("no-such-profile").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open"));

    let not_a_profile = profiler(&["report", dir.to_str().unwrap()]);
    assert_eq!(not_a_profile.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&not_a_profile.stderr).contains("no stacks.folded"));

    let report = profiler(&["report", good.to_str().unwrap()]);
    assert!(report.status.success());
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.contains("75.00%  work"), "{text}");
}

#[test]
fn pprof_from_a_known_folded_input_round_trips_to_the_same_totals() {
    let dir = scratch("compare-pprof");
    let folded = dir.join("known.folded");
    fs::write(
        &folded,
        "main;parse;tokenize 40\nmain;parse 10\nmain;render 25\nmain;sys_read_[k] 5\n",
    )
    .unwrap();
    let pprof = dir.join("known.pb.gz");

    let output = profiler(&[
        "report",
        folded.to_str().unwrap(),
        "--pprof",
        pprof.to_str().unwrap(),
    ]);

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read = Command::new("python3")
        .arg(integration_tests::fixture("read_pprof.py"))
        .arg(&pprof)
        .arg(integration_tests::fixture("profile.proto"))
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["totals"][0], 80);
    assert_eq!(read["totals"][1], 80 * 10_000_000u64);
    assert_eq!(
        read["heaviest_stack"],
        serde_json::json!(["tokenize", "parse", "main"])
    );
    let functions = read["functions"].as_array().unwrap();
    assert!(
        functions.contains(&serde_json::json!("sys_read_[k]")),
        "{functions:?}"
    );
}
