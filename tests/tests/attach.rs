//! `profiler attach` against real processes, with the real eBPF program.

use std::{fs, process::Command, thread, time::Duration};

use integration_tests::{
    Target, attach, attach_spawn, c_fixture, can_profile, fixture, profiler_bin, scratch,
};

#[test]
fn native_split_is_measured_within_five_points() {
    if !can_profile("native_split_is_measured_within_five_points") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(300));
    let dir = scratch("native-split");

    let run = attach(
        &dir,
        &["--pid", &target.pid().to_string(), "-d", "5", "-F", "199"],
    );

    run.assert_success();
    let hot = run.self_share(|leaf| leaf == "hot_three" || leaf == "spin");
    let summary = run.summary();
    assert!(summary["samples"].as_u64().unwrap() > 300, "{summary}");

    // `spin` is the leaf; attribute it by its caller.
    let folded = run.folded();
    let total: u64 = folded.iter().map(|(_, n)| n).sum();
    let under = |name: &str| -> f64 {
        let n: u64 = folded
            .iter()
            .filter(|(stack, _)| stack.split(';').any(|f| f == name))
            .map(|(_, n)| n)
            .sum();
        100.0 * n as f64 / total as f64
    };
    let (hot_share, cold_share) = (under("hot_three"), under("cold_one"));
    assert!(hot > 90.0, "most samples are in the spin loop: {hot:.1}%");
    assert!(
        (hot_share - 75.0).abs() <= 5.0,
        "hot_three {hot_share:.1}%, expected 75%"
    );
    assert!(
        (cold_share - 25.0).abs() <= 5.0,
        "cold_one {cold_share:.1}%, expected 25%"
    );

    // Full stacks from the entry point, with the thread name as root.
    assert!(
        folded
            .iter()
            .any(|(s, _)| s.starts_with("split;") && s.contains("main;hot_three;spin")),
        "{folded:?}"
    );
    // Every stack is whole, and walked with the binary's unwind table.
    let stacks = &summary["stacks"];
    assert!(
        stacks["complete_percent"].as_f64().unwrap() >= 99.0,
        "{stacks}"
    );
    assert!(
        stacks["table_mappings"].as_u64().unwrap() >= 2,
        "the fixture and libc: {stacks}"
    );
    assert_eq!(stacks["table_walks"], summary["samples"], "{stacks}");
    assert_eq!(summary["pid"].as_u64(), Some(u64::from(target.pid())));
    assert_eq!(summary["frequency_hz"].as_u64(), Some(199));
    assert!(summary["command"].as_str().unwrap().ends_with("split"));
    let top_total: Vec<&str> = summary["top_total"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["frame"].as_str().unwrap())
        .collect();
    assert!(top_total.contains(&"hot_three"), "{top_total:?}");
    assert!(
        run.stdout().contains("hottest frames by self time"),
        "{}",
        run.stdout()
    );
}

#[test]
fn node_js_functions_are_named_from_the_perf_map() {
    if !can_profile("node_js_functions_are_named_from_the_perf_map") {
        return;
    }
    let target = Target::spawn(
        Command::new("node")
            .arg("--perf-basic-prof")
            .arg(fixture("hot.js")),
    )
    .settle(Duration::from_millis(1500));
    let dir = scratch("node-hot");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "4"]);

    run.assert_success();
    let share = run.self_share(|leaf| leaf.starts_with("computeHotPrimes "));
    assert!(
        share > 50.0,
        "computeHotPrimes holds {share:.1}% of self time"
    );
    let folded = run.folded();
    assert!(
        folded
            .iter()
            .any(|(s, _)| s.contains(";computeHotPrimes ") && s.contains("hot.js:")),
        "JS frame with its script location: {folded:?}"
    );
    let summary = run.summary();
    assert_eq!(summary["top_self"][0]["kind"], "jit", "{summary}");
    assert!(
        summary["perf_map"]
            .as_str()
            .unwrap()
            .ends_with(&format!("perf-{}.map", target.pid()))
    );
}

#[test]
fn node_without_perf_map_gets_a_hint() {
    if !can_profile("node_without_perf_map_gets_a_hint") {
        return;
    }
    let target = Target::spawn(Command::new("node").arg(fixture("hot.js")))
        .settle(Duration::from_millis(500));
    let dir = scratch("node-no-map");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "1"]);

    run.assert_success();
    assert!(
        run.stderr().contains("--perf-basic-prof-only-functions"),
        "{}",
        run.stderr()
    );
}

#[test]
fn syscall_heavy_workload_has_kernel_frames() {
    if !can_profile("syscall_heavy_workload_has_kernel_frames") {
        return;
    }
    let bin = c_fixture("syscalls");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("syscalls");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "3"]);

    run.assert_success();
    let kernel = run.self_share(|leaf| leaf.ends_with("_[k]"));
    assert!(
        kernel > 50.0,
        "kernel frames hold {kernel:.1}% of self time"
    );
    let folded = run.folded();
    assert!(
        folded.iter().any(|(s, _)| {
            // libc's read keeps no frame pointer, so a frame-pointer walk
            // skips its caller; `main` must still be below it.
            s.contains(";main;") && s.contains(";vfs_read_[k]") && !s.contains("[unknown]_[k]")
        }),
        "user caller under kernel read frames: {:?}",
        &folded[..folded.len().min(5)]
    );
}

#[test]
fn target_that_exits_mid_run_is_still_symbolized() {
    if !can_profile("target_that_exits_mid_run_is_still_symbolized") {
        return;
    }
    let bin = c_fixture("split");
    let mut target = Target::spawn(Command::new(&bin).arg("1.5"));
    let dir = scratch("exits");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "20"]);
    target.wait();

    run.assert_success();
    let summary = run.summary();
    assert_eq!(summary["stop_reason"], "target exited");
    assert!(summary["duration_s"].as_f64().unwrap() < 10.0);
    assert!(summary["samples"].as_u64().unwrap() > 50);
    let named = run.self_share(|leaf| leaf == "spin");
    assert!(named > 80.0, "frames named after exit: {named:.1}%");
    assert!(dir.join("flamegraph.svg").exists());
}

#[test]
fn missing_pid_is_a_clear_error_and_writes_nothing() {
    if !can_profile("missing_pid_is_a_clear_error_and_writes_nothing") {
        return;
    }
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dir = scratch("bad-pid").join("out");

    let run = attach(&dir, &["-p", &(pid_max + 1).to_string(), "-d", "1"]);

    assert_eq!(run.output.status.code(), Some(2));
    assert!(
        run.stderr()
            .contains(&format!("no process with pid {}", pid_max + 1)),
        "{}",
        run.stderr()
    );
    assert!(!dir.exists(), "no output folder for a failed run");
}

#[test]
fn missing_privileges_say_what_is_needed() {
    if !can_profile("missing_privileges_say_what_is_needed") {
        return;
    }
    let target = Target::spawn(Command::new("sleep").arg("30"));

    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(profiler_bin())
        .args([
            "attach",
            "-p",
            &target.pid().to_string(),
            "-d",
            "1",
            "-o",
            "/tmp",
        ])
        .output()
        .expect("run setpriv");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CAP_BPF and CAP_PERFMON"), "{stderr}");
}

#[test]
fn bad_frequency_and_unwritable_output_are_refused_up_front() {
    if !can_profile("bad_frequency_and_unwritable_output_are_refused_up_front") {
        return;
    }
    let target = Target::spawn(Command::new("sleep").arg("30"));
    let pid = target.pid().to_string();
    let dir = scratch("bad-input");

    let zero = attach(&dir.join("zero"), &["-p", &pid, "-F", "0"]);
    assert_eq!(zero.output.status.code(), Some(2));
    assert!(zero.stderr().contains("at least 1 Hz"), "{}", zero.stderr());

    let max: u64 = fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let high = attach(
        &dir.join("high"),
        &["-p", &pid, "-F", &(max + 1).to_string()],
    );
    assert_eq!(high.output.status.code(), Some(2));
    assert!(
        high.stderr().contains("perf_event_max_sample_rate"),
        "{}",
        high.stderr()
    );

    let blocked = dir.join("file");
    fs::write(&blocked, "a file where a folder should be").unwrap();
    let unwritable = attach(&blocked.join("out"), &["-p", &pid, "-d", "1"]);
    assert_eq!(unwritable.output.status.code(), Some(2));
    assert!(
        unwritable
            .stderr()
            .contains("cannot create the output folder"),
        "{}",
        unwritable.stderr()
    );
    assert!(!dir.join("zero").exists() && !dir.join("high").exists());
}

#[test]
fn command_runs_while_profiling_and_its_status_is_reported() {
    if !can_profile("command_runs_while_profiling_and_its_status_is_reported") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("command");

    let run = attach(
        &dir,
        &[
            "-p",
            &target.pid().to_string(),
            "--",
            "sh",
            "-c",
            "sleep 1; exit 3",
        ],
    );

    assert_eq!(run.output.status.code(), Some(3), "{}", run.stderr());
    let summary = run.summary();
    assert_eq!(summary["command_exit_status"], 3);
    assert!(
        summary["stop_reason"]
            .as_str()
            .unwrap()
            .starts_with("command exited")
    );
    let duration = summary["duration_s"].as_f64().unwrap();
    assert!((0.8..5.0).contains(&duration), "{duration}");
    assert!(run.stdout().contains("command exit status: 3"));
}

#[test]
fn command_alone_is_the_target() {
    if !can_profile("command_alone_is_the_target") {
        return;
    }
    let bin = c_fixture("split");
    let dir = scratch("command-target");

    let run = attach(&dir, &["--", bin.to_str().unwrap(), "2"]);

    run.assert_success();
    let summary = run.summary();
    assert!(summary["samples"].as_u64().unwrap() > 50, "{summary}");
    assert!(run.self_share(|leaf| leaf == "spin") > 80.0);
}

#[test]
fn interrupt_writes_what_was_gathered() {
    if !can_profile("interrupt_writes_what_was_gathered") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("interrupt");

    let profiler = attach_spawn(&dir, &["-p", &target.pid().to_string()]);
    thread::sleep(Duration::from_millis(2000));
    // SAFETY: kill has no memory-safety preconditions; the pid is our child.
    unsafe { libc::kill(profiler.id() as i32, libc::SIGINT) };
    let output = profiler.wait_with_output().unwrap();

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stop_reason"], "interrupted (Ctrl-C)");
    assert!(summary["samples"].as_u64().unwrap() > 50);
    assert!(dir.join("flamegraph.svg").exists() && dir.join("stacks.folded").exists());
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn flame_graph_is_well_formed_svg_with_the_frames() {
    if !can_profile("flame_graph_is_well_formed_svg_with_the_frames") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("svg");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "2"]);

    run.assert_success();
    let svg = fs::read_to_string(dir.join("flamegraph.svg")).unwrap();
    let doc = integration_tests::parse_svg(&svg);
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .collect();
    assert!(
        titles.iter().any(|t| t.starts_with("hot_three")),
        "{titles:?}"
    );
    assert!(
        svg.contains(&format!("(pid {})", target.pid())),
        "title names the pid"
    );
}

#[test]
fn pprof_export_reads_back_with_a_protobuf_library() {
    if !can_profile("pprof_export_reads_back_with_a_protobuf_library") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("pprof");

    let run = attach(
        &dir,
        &["-p", &target.pid().to_string(), "-d", "2", "-F", "199"],
    );

    run.assert_success();
    let output = Command::new("python3")
        .arg(fixture("read_pprof.py"))
        .arg(dir.join("profile.pb.gz"))
        .arg(fixture("profile.proto"))
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pprof: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    // The same totals as the folded stacks, in counts and in CPU time.
    let folded_total: u64 = run.folded().iter().map(|(_, n)| n).sum();
    assert_eq!(pprof["totals"][0].as_u64(), Some(folded_total), "{pprof}");
    let period = pprof["period"].as_u64().unwrap();
    assert_eq!(period, 1_000_000_000 / 199);
    assert_eq!(pprof["totals"][1].as_u64(), Some(folded_total * period));
    assert_eq!(
        pprof["sample_types"][0],
        serde_json::json!(["samples", "count"])
    );
    assert_eq!(
        pprof["sample_types"][1],
        serde_json::json!(["cpu", "nanoseconds"])
    );
    let functions: Vec<&str> = pprof["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        functions.contains(&"hot_three") && functions.contains(&"spin"),
        "{functions:?}"
    );
    let heaviest: Vec<&str> = pprof["heaviest_stack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(
        &heaviest[..3],
        ["spin", "hot_three", "main"],
        "leaf first: {heaviest:?}"
    );
    assert_eq!(pprof["labels"], serde_json::json!(["thread", "thread_id"]));
}

#[test]
fn flame_graph_choices_title_icicle_and_no_thread_roots() {
    if !can_profile("flame_graph_choices_title_icicle_and_no_thread_roots") {
        return;
    }
    let bin = c_fixture("split");
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("svg-choices");

    let run = attach(
        &dir,
        &[
            "-p",
            &target.pid().to_string(),
            "-d",
            "2",
            "--title",
            "Split before the fix",
            "--inverted",
            "--no-thread-roots",
        ],
    );

    run.assert_success();
    assert!(
        run.folded()
            .iter()
            .all(|(stack, _)| !stack.starts_with("split;")),
        "no thread-name roots: {:?}",
        run.folded()
    );
    let svg = fs::read_to_string(dir.join("flamegraph.svg")).unwrap();
    assert!(svg.contains("Split before the fix"));
    let doc = integration_tests::parse_svg(&svg);
    // The y of the first frame whose tooltip starts with `name`.
    let y_of = |name: &str| -> f64 {
        doc.descendants()
            .filter(|n| n.has_tag_name("g"))
            .find(|g| {
                g.children().any(|c| {
                    c.has_tag_name("title") && c.text().is_some_and(|t| t.starts_with(name))
                })
            })
            .and_then(|g| g.children().find(|c| c.has_tag_name("rect")))
            .and_then(|rect| rect.attribute("y"))
            .and_then(|y| y.parse().ok())
            .unwrap_or_else(|| panic!("no frame {name}"))
    };
    assert!(
        y_of("main ") < y_of("spin "),
        "an icicle graph has its roots at the top"
    );
}
