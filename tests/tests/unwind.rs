//! Complete user stacks through code without frame pointers: unwind tables
//! from `.eh_frame` for native code, frame pointers over JIT code.

use std::{fs, path::Path, process::Command, thread, time::Duration};

use integration_tests::{Run, Target, attach, c_fixture_with, can_profile, fixture, scratch};

/// Share, in percent, of the samples whose stack contains `leaf` that also
/// contain `caller` below it.
fn attributed(run: &Run, leaf: &str, caller: &str) -> (u64, f64) {
    let with_leaf: Vec<(String, u64)> = run
        .folded()
        .into_iter()
        .filter(|(stack, _)| stack.contains(leaf))
        .collect();
    let total: u64 = with_leaf.iter().map(|(_, n)| n).sum();
    let under: u64 = with_leaf
        .iter()
        .filter(|(stack, _)| stack.contains(caller))
        .map(|(_, n)| n)
        .sum();
    (total, 100.0 * under as f64 / total.max(1) as f64)
}

/// The `split` fixture's profile has whole stacks and names its frames.
fn assert_split_whole_and_named(run: &Run, case: &str) {
    run.assert_success();
    let stacks = &run.summary()["stacks"];
    let complete = stacks["complete_percent"].as_f64().unwrap();
    assert!(complete >= 95.0, "{case}: {stacks}");
    let named = run.self_share(|leaf| leaf == "spin");
    assert!(named > 80.0, "spin holds {named:.1}% {case}");
}

#[test]
fn openssl_samples_sit_under_the_js_function_that_called_pbkdf2() {
    if !can_profile("openssl_samples_sit_under_the_js_function_that_called_pbkdf2") {
        return;
    }
    let target = Target::spawn(
        Command::new("node")
            .args([
                "--perf-basic-prof-only-functions",
                "--interpreted-frames-native-stack",
            ])
            .arg(fixture("crypto-loop.js")),
    )
    .settle(Duration::from_millis(1000));
    let dir = scratch("unwind-crypto");
    let pid = target.pid().to_string();

    let tables = attach(&dir.join("tables"), &["-p", &pid, "-d", "6"]);
    let frame_pointers = attach(
        &dir.join("fp"),
        &["-p", &pid, "-d", "4", "--unwind-rows", "0"],
    );

    tables.assert_success();
    frame_pointers.assert_success();
    let stacks = &tables.summary()["stacks"];
    let complete = stacks["complete_percent"].as_f64().unwrap();
    assert!(
        complete >= 99.0,
        "{complete}% of stacks reach the thread entry: {stacks}"
    );
    // The loop's stacks repeat, so most frames find their row in the
    // kernel side's cache of recent lookups rather than by a search.
    let hit_percent = stacks["row_cache_hit_percent"].as_f64().unwrap();
    assert!(stacks["row_lookups"].as_u64().unwrap() > 1000, "{stacks}");
    assert!(
        hit_percent >= 80.0,
        "{hit_percent}% row cache hits: {stacks}"
    );
    let (openssl, under) = attributed(&tables, ";sha512_block_data_order", ";hashPassword ");
    assert!(openssl > 50, "{openssl} OpenSSL samples");
    assert!(
        under >= 95.0,
        "{under:.1}% of OpenSSL samples under hashPassword"
    );

    // The same process by frame pointers alone, for contrast.
    let fp_stacks = &frame_pointers.summary()["stacks"];
    let (_, fp_under) = attributed(
        &frame_pointers,
        ";sha512_block_data_order",
        ";hashPassword ",
    );
    eprintln!(
        "frame pointers only: {}% complete, {fp_under:.1}% of OpenSSL under hashPassword; \
         with tables: {complete}% and {under:.1}%",
        fp_stacks["complete_percent"]
    );
    assert_eq!(fp_stacks["unwinding"], "frame pointers");
    assert!(fp_under < under);

    // With whole stacks, each sample's thread role is known: the loop runs
    // pbkdf2Sync synchronously, on the main thread.
    let roles = Command::new(integration_tests::profiler_bin())
        .args(["report", "--by", "thread-role", "--format", "json"])
        .arg(dir.join("tables"))
        .output()
        .unwrap();
    assert!(roles.status.success());
    let roles: serde_json::Value = serde_json::from_slice(&roles.stdout).unwrap();
    assert_eq!(roles[0]["role"], "main thread", "{roles:#}");
    assert!(roles[0]["percent"].as_f64().unwrap() > 80.0, "{roles:#}");
}

#[test]
fn native_code_without_frame_pointers_comes_out_whole() {
    if !can_profile("native_code_without_frame_pointers_comes_out_whole") {
        return;
    }
    let bin = c_fixture_with(
        "split",
        "split-no-fp",
        &["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"],
    );
    let target = Target::spawn(&mut Command::new(&bin)).settle(Duration::from_millis(200));
    let dir = scratch("unwind-no-fp");

    let run = attach(&dir, &["-p", &target.pid().to_string(), "-d", "3"]);

    run.assert_success();
    let folded = run.folded();
    let total: u64 = folded.iter().map(|(_, n)| n).sum();
    let whole: u64 = folded
        .iter()
        .filter(|(stack, _)| {
            stack.contains(";__libc_start_call_main;main;hot_three;spin")
                || stack.contains(";__libc_start_call_main;main;cold_one;spin")
        })
        .map(|(_, n)| n)
        .sum();
    let share = 100.0 * whole as f64 / total.max(1) as f64;
    assert!(share >= 95.0, "{share:.1}% whole chains: {folded:?}");
}

#[test]
fn deleted_binary_is_still_unwound_and_named() {
    if !can_profile("deleted_binary_is_still_unwound_and_named") {
        return;
    }
    let built = c_fixture_with("split", "split-deleted", &["-O2", "-fomit-frame-pointer"]);
    let dir = scratch("unwind-deleted");
    let copy = dir.join("split-copy");
    fs::copy(&built, &copy).unwrap();
    let target = Target::spawn(&mut Command::new(&copy)).settle(Duration::from_millis(200));
    fs::remove_file(&copy).unwrap();
    thread::sleep(Duration::from_millis(100));

    let run = attach(
        &dir.join("out"),
        &["-p", &target.pid().to_string(), "-d", "2"],
    );

    assert_split_whole_and_named(&run, "after its file was deleted");
}

#[test]
fn library_loaded_after_attach_is_unwound() {
    if !can_profile("library_loaded_after_attach_is_unwound") {
        return;
    }
    let dir = scratch("unwind-dlopen");
    let lib = dir.join("liblate.so");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
        ])
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(fixture("late_lib.c"))
        .status()
        .unwrap();
    assert!(status.success());
    let bin = c_fixture_with("dlopen_late", "dlopen_late", &["-O2", "-ldl"]);
    let target = Target::spawn(Command::new(&bin).arg(&lib).arg("1000"));

    // Attached before the library is loaded. Its table is loaded at the
    // next refresh of the mappings, a quarter second at most after the
    // dlopen; samples before that are walked by frame pointer.
    let run = attach(
        &dir.join("out"),
        &["-p", &target.pid().to_string(), "-d", "6"],
    );

    run.assert_success();
    let (in_library, whole) =
        attributed(&run, ";late_spin", ";main;call_library;late_work;late_spin");
    assert!(in_library > 100, "{in_library} samples in the library");
    assert!(
        whole >= 92.0,
        "{whole:.1}% of the library's samples have a whole stack"
    );
}

#[test]
fn binary_in_another_mount_namespace_is_unwound_and_named() {
    if !can_profile("binary_in_another_mount_namespace_is_unwound_and_named") {
        return;
    }
    let built = c_fixture_with("split", "split-mntns", &["-O2", "-fomit-frame-pointer"]);
    let dir = scratch("unwind-mntns");
    let private = dir.join("private");
    fs::create_dir_all(&private).unwrap();
    // In a new mount namespace, a tmpfs over `private` holds the binary:
    // from this namespace the folder stays empty.
    let script = format!(
        "mount -t tmpfs none {dir} && cp {bin} {dir}/split && exec {dir}/split",
        dir = private.display(),
        bin = built.display()
    );
    let target = Target::spawn(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]))
    .settle(Duration::from_millis(500));
    if !Path::new(&format!("/proc/{}/exe", target.pid())).exists() {
        eprintln!("skipping: `unshare --mount` did not start the fixture here");
        return;
    }
    assert!(
        !private.join("split").exists(),
        "the binary is only in the other namespace"
    );

    let run = attach(
        &dir.join("out"),
        &["-p", &target.pid().to_string(), "-d", "2"],
    );

    assert_split_whole_and_named(&run, "from another mount namespace");
}
