//! Stacks as every compared tool reports them, brought to one form (frames
//! from the outermost to the leaf, kernel frames marked `_[k]` and JIT
//! frames `_[j]`), the figures the bench reads from them, and their flame
//! graphs.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{BufWriter, Read},
    path::Path,
};

use anyhow::{Context as _, bail};
use inferno::collapse::Collapse as _;
use serde_json::Value;

/// Outermost user frames that mean a stack was walked to its thread's
/// entry: the program's start or a thread's start, in libc. Walks by frame
/// pointer end at the first function libc built without them, so libc's
/// caller of `main` counts as well.
const ENTRY_FRAMES: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "__GI___clone",
    "__GI___clone3",
];

/// Prefixes V8 gives JS functions in its perf map (`JS:*name file:line`).
const V8_FUNCTION_PREFIXES: &[&str] = &["JS:", "LazyCompile:", "Function:", "Script:", "Eval:"];

pub struct Stack {
    /// Outermost first.
    pub frames: Vec<String>,
    pub count: u64,
}

#[derive(Default)]
pub struct Stacks(pub Vec<Stack>);

impl Stacks {
    /// Folded lines, `root;frame;…;leaf count`, as this profiler and
    /// inferno's collapse-perf write them. The root (a thread or process
    /// name) is dropped.
    pub fn from_folded(text: &str) -> anyhow::Result<Self> {
        let mut stacks = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (stack, count) = line
                .rsplit_once(' ')
                .with_context(|| format!("folded line {} has no count", number + 1))?;
            let count = count
                .parse()
                .with_context(|| format!("folded line {} has a bad count", number + 1))?;
            let frames = stack.split(';').skip(1).map(str::to_owned).collect();
            stacks.push(Stack { frames, count });
        }
        Ok(Self(stacks))
    }

    /// The output of a bpftrace map keyed `[ustack, kstack]` or
    /// `[tid, ustack, kstack]`, printed when bpftrace stops: each entry is
    /// `@[`, the user frames (leaf first, `name+offset`), a line starting
    /// with a comma, the kernel frames, and `]: count`.
    pub fn from_bpftrace(text: &str) -> Self {
        let mut stacks = Vec::new();
        let (mut user, mut kernel) = (Vec::new(), Vec::new());
        let (mut in_entry, mut in_kernel) = (false, false);
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("@[") {
                (in_entry, in_kernel) = (true, false);
                user.clear();
                kernel.clear();
                continue;
            }
            if !in_entry {
                continue;
            }
            let rest = match line.strip_prefix(',') {
                Some(rest) => {
                    in_kernel = true;
                    rest.trim()
                }
                None => line,
            };
            if let Some(count) = rest.strip_prefix("]:") {
                in_entry = false;
                let Ok(count) = count.trim().parse() else {
                    continue;
                };
                let mut frames: Vec<String> = user.drain(..).rev().collect();
                frames.extend(kernel.drain(..).rev());
                stacks.push(Stack { frames, count });
                continue;
            }
            if rest.is_empty() {
                continue;
            }
            let frame = without_offset(rest);
            if in_kernel {
                kernel.push(format!("{frame}_[k]"));
            } else if V8_FUNCTION_PREFIXES.iter().any(|p| frame.starts_with(p)) {
                user.push(format!("{frame}_[j]"));
            } else {
                user.push(frame.to_owned());
            }
        }
        Self(stacks)
    }

    /// The samples of a V8 CPU profile (`node --cpu-prof`) taken between
    /// `from_us` and `to_us` on CLOCK_MONOTONIC, as stacks of its nodes.
    /// JS functions are those with a script URL.
    pub fn from_cpu_profile(profile: &Value, from_us: f64, to_us: f64) -> anyhow::Result<Self> {
        let nodes = profile["nodes"]
            .as_array()
            .context("the CPU profile has no nodes")?;
        let mut frame_of = HashMap::new();
        let mut parent_of = HashMap::new();
        for node in nodes {
            let id = node["id"].as_u64().context("a node without id")?;
            let call = &node["callFrame"];
            let name = call["functionName"].as_str().unwrap_or_default();
            let url = call["url"].as_str().unwrap_or_default();
            let frame = if url.is_empty() {
                name.to_owned()
            } else {
                let name = if name.is_empty() { "(anonymous)" } else { name };
                let line = call["lineNumber"].as_i64().unwrap_or(-1) + 1;
                format!("{name} {url}:{line}_[j]")
            };
            frame_of.insert(id, frame);
            for child in node["children"].as_array().into_iter().flatten() {
                if let Some(child) = child.as_u64() {
                    parent_of.insert(child, id);
                }
            }
        }

        let samples = profile["samples"]
            .as_array()
            .context("the CPU profile has no samples")?;
        let deltas = profile["timeDeltas"]
            .as_array()
            .context("the CPU profile has no timeDeltas")?;
        let mut at_us = profile["startTime"]
            .as_f64()
            .context("the CPU profile has no startTime")?;
        let mut counts = HashMap::<u64, u64>::new();
        for (sample, delta) in samples.iter().zip(deltas) {
            at_us += delta.as_f64().unwrap_or(0.0);
            if at_us < from_us || at_us > to_us {
                continue;
            }
            if let Some(id) = sample.as_u64() {
                *counts.entry(id).or_default() += 1;
            }
        }
        let mut stacks = Vec::new();
        for (leaf, count) in counts {
            let mut frames = Vec::new();
            let mut id = Some(leaf);
            while let Some(node) = id {
                let frame = &frame_of[&node];
                if frame != "(root)" {
                    frames.push(frame.clone());
                }
                id = parent_of.get(&node).copied();
            }
            frames.reverse();
            stacks.push(Stack { frames, count });
        }
        Ok(Self(stacks))
    }

    pub fn samples(&self) -> u64 {
        self.0.iter().map(|s| s.count).sum()
    }

    /// Folded lines with `root` as every stack's root frame.
    pub fn to_folded(&self, root: &str) -> String {
        let mut folded = String::new();
        for stack in &self.0 {
            folded.push_str(root);
            for frame in &stack.frames {
                folded.push(';');
                folded.push_str(frame);
            }
            folded.push_str(&format!(" {}\n", stack.count));
        }
        folded
    }

    /// Percent of all samples with a frame of function `name` anywhere on
    /// the stack.
    pub fn percent_with(&self, name: &str) -> f64 {
        let hits: u64 = self
            .0
            .iter()
            .filter(|s| s.frames.iter().any(|f| plain(f) == name))
            .map(|s| s.count)
            .sum();
        100.0 * hits as f64 / self.samples().max(1) as f64
    }

    /// Samples by the innermost JS function on their stack, and how many
    /// samples had one.
    pub fn innermost_js(&self) -> (BTreeMap<String, u64>, u64) {
        let mut by_function = BTreeMap::<String, u64>::new();
        let mut with_js = 0;
        for stack in &self.0 {
            if let Some(name) = stack.frames.iter().rev().find_map(|f| js_function(f)) {
                *by_function.entry(name).or_default() += stack.count;
                with_js += stack.count;
            }
        }
        (by_function, with_js)
    }

    /// Samples with a user stack, and those of them whose outermost frame
    /// is a thread's entry.
    pub fn completeness(&self) -> (u64, u64) {
        let (mut user, mut complete) = (0, 0);
        for stack in &self.0 {
            let Some(outermost) = stack.frames.first() else {
                continue;
            };
            if outermost.ends_with("_[k]") {
                continue;
            }
            user += stack.count;
            if ENTRY_FRAMES.contains(&plain(outermost)) {
                complete += stack.count;
            }
        }
        (user, complete)
    }
}

/// A frame's function name, without annotation suffix or offset.
pub fn plain(frame: &str) -> &str {
    let frame = ["_[k]", "_[j]", "_[i]", "_[w]"]
        .iter()
        .find_map(|suffix| frame.strip_suffix(suffix))
        .unwrap_or(frame);
    without_offset(frame)
}

/// `name+123` or `name+0x7b` to `name`.
fn without_offset(frame: &str) -> &str {
    match frame.rsplit_once('+') {
        Some((name, offset))
            if !name.is_empty()
                && !offset.is_empty()
                && (offset.bytes().all(|b| b.is_ascii_digit())
                    || offset
                        .strip_prefix("0x")
                        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))) =>
        {
            name
        }
        _ => frame,
    }
}

/// The JS function a JIT frame runs, by name alone: `pbkdf2Sync` for
/// `JS:*pbkdf2Sync node:internal/crypto/pbkdf2:63:20_[j]` (perf and
/// bpftrace, from V8's perf map) and for `pbkdf2Sync node:…_[j]` (this
/// profiler and the CPU profile). JIT code that is not a function, such as
/// `[compiled regexp]`, is none.
pub fn js_function(frame: &str) -> Option<String> {
    let body = frame.strip_suffix("_[j]")?;
    let body = V8_FUNCTION_PREFIXES
        .iter()
        .find_map(|prefix| body.strip_prefix(prefix))
        .unwrap_or(body);
    let body = body.strip_prefix(['*', '~', '^', '+', '-']).unwrap_or(body);
    if body.starts_with('[') {
        return None;
    }
    let name = body.split(' ').next().unwrap_or_default();
    Some(if name.is_empty() { "(anonymous)" } else { name }.to_owned())
}

/// inferno's collapse-perf over `perf script` output, with JIT and kernel
/// frames annotated; one thread, as inferno is built here.
pub fn collapse_perf(script: impl Read) -> anyhow::Result<String> {
    let mut options = inferno::collapse::perf::Options::default();
    options.annotate_jit = true;
    options.annotate_kernel = true;
    let mut folder = inferno::collapse::perf::Folder::from(options);
    let mut folded = Vec::new();
    folder
        .collapse(std::io::BufReader::new(script), &mut folded)
        .context("inferno could not collapse the perf script output")?;
    String::from_utf8(folded).context("collapsed stacks are not UTF-8")
}

/// An inferno flame graph of folded lines.
pub fn write_flame_graph(folded: &str, title: &str, path: &Path) -> anyhow::Result<()> {
    if folded.trim().is_empty() {
        bail!("no stacks to draw {}", path.display());
    }
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    inferno::flamegraph::from_lines(&mut options, folded.lines(), BufWriter::new(file))
        .with_context(|| format!("cannot draw {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftrace_entries_with_and_without_a_thread_id() {
        let text = "Attaching 1 probe...\n\n\n\
            @[417, \n    spin+38\n    hot_three+14\n    main+140\n    __libc_start_call_main+122\n, \n\
            \x20   irqentry_exit_to_user_mode+276\n]: 3\n\
            @[\n    JS:*fib /srv/a.js:1:1+12\n    0x7f00\n, ]: 2\n";
        let stacks = Stacks::from_bpftrace(text);

        assert_eq!(stacks.0.len(), 2);
        assert_eq!(
            stacks.0[0].frames,
            [
                "__libc_start_call_main",
                "main",
                "hot_three",
                "spin",
                "irqentry_exit_to_user_mode_[k]"
            ]
        );
        assert_eq!(stacks.0[0].count, 3);
        assert_eq!(stacks.0[1].frames, ["0x7f00", "JS:*fib /srv/a.js:1:1_[j]"]);
        assert_eq!(stacks.percent_with("hot_three"), 60.0);
        assert_eq!(stacks.completeness(), (5, 3));
    }

    #[test]
    fn js_functions_named_alike_from_every_tool() {
        for frame in [
            "JS:*pbkdf2Sync node:internal/crypto/pbkdf2:63:20_[j]",
            "LazyCompile:~pbkdf2Sync node:internal/crypto/pbkdf2:63:20_[j]",
            "pbkdf2Sync node:internal/crypto/pbkdf2:63:20_[j]",
        ] {
            assert_eq!(js_function(frame).as_deref(), Some("pbkdf2Sync"), "{frame}");
        }
        assert_eq!(
            js_function("JS:* /srv/app.js:178:43_[j]").as_deref(),
            Some("(anonymous)")
        );
        assert_eq!(js_function("[compiled regexp]_[j]"), None);
        assert_eq!(js_function("pbkdf2Sync"), None);
    }

    #[test]
    fn offsets_come_off_but_operators_stay() {
        assert_eq!(plain("spin+38"), "spin");
        assert_eq!(plain("spin+0x26_[k]"), "spin");
        assert_eq!(plain("operator+"), "operator+");
    }

    #[test]
    fn cpu_profile_samples_inside_the_window() {
        let profile = serde_json::json!({
            "nodes": [
                {"id": 1, "callFrame": {"functionName": "(root)", "url": ""}, "children": [2, 3]},
                {"id": 2, "callFrame": {"functionName": "fib", "url": "file:///a.js",
                    "lineNumber": 10}, "children": []},
                {"id": 3, "callFrame": {"functionName": "(garbage collector)", "url": ""}},
            ],
            "startTime": 1000.0,
            "samples": [2, 2, 3, 2],
            "timeDeltas": [10.0, 10.0, 10.0, 100.0],
        });
        let stacks = Stacks::from_cpu_profile(&profile, 1000.0, 1050.0).unwrap();

        assert_eq!(stacks.samples(), 3);
        let (by_function, with_js) = stacks.innermost_js();
        assert_eq!(by_function["fib"], 2);
        assert_eq!(with_js, 2);
    }
}
