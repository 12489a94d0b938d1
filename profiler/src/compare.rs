//! Reading saved profiles back, and the views over them that `profiler
//! report` and `profiler diff` print: hottest frames and the frames whose
//! share changed most between two profiles.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Folded stacks read from a profile folder or a folded file.
#[derive(Debug)]
pub struct Folded {
    pub path: PathBuf,
    pub lines: Vec<(String, u64)>,
    /// From the folder's `summary.json`, when there is one.
    pub frequency_hz: Option<u64>,
    /// Whether each stack's first frame is a thread name (this profiler's
    /// own output) rather than a code frame.
    pub thread_roots: bool,
}

impl Folded {
    pub fn total(&self) -> u64 {
        self.lines.iter().map(|(_, n)| n).sum()
    }
}

/// Loads `path`: a profile folder (its `stacks.folded`, and `summary.json`
/// for the frequency) or a folded file.
pub fn load(path: &Path) -> anyhow::Result<Folded> {
    let meta = fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (file, frequency_hz, thread_roots) = if meta.is_dir() {
        let file = path.join("stacks.folded");
        if !file.exists() {
            bail!(
                "{} is not a profile folder: it has no stacks.folded",
                path.display()
            );
        }
        let frequency_hz = fs::read_to_string(path.join("summary.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|summary| summary["frequency_hz"].as_u64());
        (file, frequency_hz, true)
    } else {
        (path.to_owned(), None, false)
    };
    let text =
        fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let lines =
        parse(&text).map_err(|(line, why)| anyhow::anyhow!("{}:{line}: {why}", file.display()))?;
    Ok(Folded {
        path: path.to_owned(),
        lines,
        frequency_hz,
        thread_roots,
    })
}

/// Parses folded text; on error, the 1-based line number and what is wrong.
pub fn parse(text: &str) -> Result<Vec<(String, u64)>, (usize, String)> {
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let Some((stack, count)) = line.rsplit_once(' ') else {
            return Err((
                i + 1,
                "expected `frame;frame;… COUNT`, found no count".to_owned(),
            ));
        };
        let count = count
            .parse::<u64>()
            .map_err(|_| (i + 1, format!("`{count}` is not a sample count")))?;
        if stack.is_empty() {
            return Err((i + 1, "empty stack".to_owned()));
        }
        lines.push((stack.to_owned(), count));
    }
    Ok(lines)
}

/// Self and total sample counts per frame name.
#[derive(Debug, Default)]
pub struct Shares {
    pub total: u64,
    pub by_frame: HashMap<String, (u64, u64)>,
}

/// Counts each frame's self samples (leaf) and total samples (anywhere in
/// the stack, once per stack). Thread-name roots are not frames.
pub fn shares(folded: &Folded) -> Shares {
    let mut shares = Shares {
        total: folded.total(),
        ..Shares::default()
    };
    let mut seen = HashSet::new();
    for (stack, count) in &folded.lines {
        let mut frames: Vec<&str> = stack.split(';').collect();
        if folded.thread_roots && frames.len() > 1 {
            frames.remove(0);
        }
        if let Some(leaf) = frames.last() {
            shares.by_frame.entry((*leaf).to_owned()).or_default().0 += count;
        }
        seen.clear();
        for frame in frames {
            if seen.insert(frame) {
                shares.by_frame.entry(frame.to_owned()).or_default().1 += count;
            }
        }
    }
    shares
}

/// One row of a hottest-frames table.
#[derive(Debug, Serialize)]
pub struct Hot {
    pub frame: String,
    pub self_percent: f64,
    pub total_percent: f64,
}

/// The `n` hottest frames, by self share or by total share.
pub fn hottest(shares: &Shares, n: usize, by_total: bool) -> Vec<Hot> {
    let percent = |count: u64| round2(100.0 * count as f64 / shares.total.max(1) as f64);
    let mut rows: Vec<(&String, &(u64, u64))> = shares.by_frame.iter().collect();
    rows.sort_by(|a, b| {
        let key = |r: &(&String, &(u64, u64))| if by_total { r.1.1 } else { r.1.0 };
        key(b).cmp(&key(a)).then_with(|| a.0.cmp(b.0))
    });
    rows.into_iter()
        .filter(|(_, (self_count, total))| {
            if by_total {
                *total > 0
            } else {
                *self_count > 0
            }
        })
        .take(n)
        .map(|(frame, (self_count, total))| Hot {
            frame: frame.clone(),
            self_percent: percent(*self_count),
            total_percent: percent(*total),
        })
        .collect()
}

/// What a thread is, from its name and the frames its stacks start with:
/// node's main thread, a `worker_threads` thread, the libuv threadpool, V8's
/// platform threads (garbage collection or other helpers), or other.
pub fn thread_role(thread: &str, frames: &[&str]) -> &'static str {
    const GC_TASKS: [&str; 8] = [
        "Scavenger",
        "ConcurrentMarking",
        "Sweeper",
        "MarkCompact",
        "PageEvacuation",
        "PointersUpdating",
        "Unmapper",
        "ArrayBufferSweeper",
    ];
    match thread {
        "libuv-worker" => return "libuv threadpool",
        name if name.starts_with("V8") || name.starts_with("v8") => return "V8 helper",
        _ => {}
    }
    let has = |needle: &str| frames.iter().any(|f| f.contains(needle));
    if has("node::worker::Worker::") {
        "worker_threads"
    } else if has("node::ThreadPoolWork")
        || frames
            .windows(2)
            .any(|w| w[0] == "start_thread" && w[1] == "worker")
    {
        "libuv threadpool"
    } else if has("PlatformWorkerThread") || has("v8::platform::") {
        if GC_TASKS.iter().any(|task| has(task)) {
            "V8 GC"
        } else {
            "V8 helper"
        }
    } else if has("node::Start(") || has("__libc_start_call_main") || has("__libc_start_main") {
        "main thread"
    } else {
        "other"
    }
}

/// Samples per thread role, with each role's hottest frame by self time.
#[derive(Debug, Serialize)]
pub struct RoleShare {
    pub role: &'static str,
    pub samples: u64,
    pub percent: f64,
    pub hottest: Option<String>,
}

pub fn by_thread_role(folded: &Folded) -> Vec<RoleShare> {
    let mut roles: HashMap<&'static str, (u64, HashMap<&str, u64>)> = HashMap::new();
    for (stack, count) in &folded.lines {
        let mut frames: Vec<&str> = stack.split(';').collect();
        let thread = if folded.thread_roots && frames.len() > 1 {
            frames.remove(0)
        } else {
            ""
        };
        let entry = roles.entry(thread_role(thread, &frames)).or_default();
        entry.0 += count;
        if let Some(leaf) = frames.last() {
            *entry.1.entry(leaf).or_default() += count;
        }
    }
    let total = folded.total().max(1) as f64;
    let mut rows: Vec<RoleShare> = roles
        .into_iter()
        .map(|(role, (samples, leaves))| RoleShare {
            role,
            samples,
            percent: round2(100.0 * samples as f64 / total),
            hottest: leaves
                .into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(frame, _)| frame.to_owned()),
        })
        .collect();
    rows.sort_by(|a, b| b.samples.cmp(&a.samples).then_with(|| a.role.cmp(b.role)));
    rows
}

/// How one frame's shares moved between two profiles, in percentage points.
#[derive(Debug, Serialize)]
pub struct Change {
    pub frame: String,
    pub before_self_percent: f64,
    pub after_self_percent: f64,
    pub self_change: f64,
    pub before_total_percent: f64,
    pub after_total_percent: f64,
    pub total_change: f64,
}

/// The `n` frames whose self or total share changed most. Shares are
/// fractions of each profile's own samples, so profiles of different
/// lengths or frequencies compare.
pub fn changes(before: &Shares, after: &Shares, n: usize) -> Vec<Change> {
    let percent = |count: u64, total: u64| 100.0 * count as f64 / total.max(1) as f64;
    let frames: HashSet<&String> = before
        .by_frame
        .keys()
        .chain(after.by_frame.keys())
        .collect();
    let mut rows: Vec<Change> = frames
        .into_iter()
        .map(|frame| {
            let (bs, bt) = before.by_frame.get(frame).copied().unwrap_or_default();
            let (a_s, at) = after.by_frame.get(frame).copied().unwrap_or_default();
            let (bs, bt) = (percent(bs, before.total), percent(bt, before.total));
            let (a_s, at) = (percent(a_s, after.total), percent(at, after.total));
            Change {
                frame: frame.clone(),
                before_self_percent: round2(bs),
                after_self_percent: round2(a_s),
                self_change: round2(a_s - bs),
                before_total_percent: round2(bt),
                after_total_percent: round2(at),
                total_change: round2(at - bt),
            }
        })
        .collect();
    let weight = |c: &Change| c.self_change.abs().max(c.total_change.abs());
    rows.sort_by(|a, b| {
        weight(b)
            .total_cmp(&weight(a))
            .then_with(|| a.frame.cmp(&b.frame))
    });
    rows.retain(|c| weight(c) > 0.0);
    rows.truncate(n);
    rows
}

/// A Markdown table of changes.
pub fn changes_markdown(rows: &[Change]) -> String {
    let mut md = String::from(
        "| frame | self before | self after | self change | total before | total after | total change |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        md.push_str(&format!(
            "| `{}` | {:.2}% | {:.2}% | {:+.2} | {:.2}% | {:.2}% | {:+.2} |\n",
            escape_md(&row.frame),
            row.before_self_percent,
            row.after_self_percent,
            row.self_change,
            row.before_total_percent,
            row.after_total_percent,
            row.total_change
        ));
    }
    md
}

/// A Markdown table of hottest frames.
pub fn hottest_markdown(rows: &[Hot]) -> String {
    let mut md = String::from("| frame | self | total |\n| --- | ---: | ---: |\n");
    for row in rows {
        md.push_str(&format!(
            "| `{}` | {:.2}% | {:.2}% |\n",
            escape_md(&row.frame),
            row.self_percent,
            row.total_percent
        ));
    }
    md
}

/// Keeps a frame name from breaking a Markdown table cell.
fn escape_md(text: &str) -> String {
    text.replace('|', "\\|").replace('`', "'")
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(text: &str) -> Folded {
        Folded {
            path: PathBuf::from("t"),
            lines: parse(text).unwrap(),
            frequency_hz: None,
            thread_roots: false,
        }
    }

    #[test]
    fn malformed_line_is_named() {
        assert_eq!(parse("a;b 3\n\na;c x\n").unwrap_err().0, 3);
        assert_eq!(parse("no-count-here\n").unwrap_err().0, 1);
        assert_eq!(parse("a;b 3\nc 4\n").unwrap().len(), 2);
    }

    #[test]
    fn removed_function_is_the_largest_negative_change() {
        let before = shares(&folded("main;hot;spin 75\nmain;cold;spin 25\n"));
        let after = shares(&folded("main;cold;spin 40\n"));
        let rows = changes(&before, &after, 10);
        let most_negative = rows
            .iter()
            .min_by(|a, b| a.total_change.total_cmp(&b.total_change))
            .unwrap();
        assert_eq!(most_negative.frame, "hot");
        assert_eq!(most_negative.total_change, -75.0);
        assert!(
            rows.iter().all(|r| r.frame != "main" && r.frame != "spin"),
            "unchanged frames drop out"
        );
    }

    #[test]
    fn thread_roles_come_from_names_and_stack_entries() {
        let main = [
            "_start",
            "__libc_start_call_main",
            "node::Start(int, char**)",
            "uv_run",
        ];
        assert_eq!(thread_role("node", &main), "main thread");
        let pool = [
            "clone3",
            "start_thread",
            "worker",
            "node::ThreadPoolWork::ScheduleWork()",
        ];
        assert_eq!(thread_role("node", &pool), "libuv threadpool");
        let worker = ["clone3", "start_thread", "node::worker::Worker::Run()"];
        assert_eq!(thread_role("node", &worker), "worker_threads");
        let gc = [
            "start_thread",
            "node::(anonymous namespace)::PlatformWorkerThread(void*)",
            "v8::internal::ScavengerCollector::JobTask::Run(v8::JobDelegate*)",
        ];
        assert_eq!(thread_role("node", &gc), "V8 GC");
        assert_eq!(
            thread_role("libuv-worker", &["start_thread"]),
            "libuv threadpool"
        );
        assert_eq!(thread_role("node", &["start_thread", "mystery"]), "other");
    }

    #[test]
    fn thread_roots_are_not_frames() {
        let mut profile = folded("node;main;work 3\n");
        profile.thread_roots = true;
        let shares = shares(&profile);
        assert!(!shares.by_frame.contains_key("node"));
        assert_eq!(shares.by_frame["work"], (3, 3));
    }

    #[test]
    fn markdown_table_has_one_cell_per_column_on_every_row() {
        let before = shares(&folded("a;b|c 2\n"));
        let after = shares(&folded("a;d 2\n"));
        let md = changes_markdown(&changes(&before, &after, 10));
        let cells = |line: &str| line.matches('|').count() - line.matches("\\|").count();
        let header = cells(md.lines().next().unwrap());
        assert!(md.lines().all(|line| cells(line) == header), "{md}");
        assert!(md.contains("b\\|c"), "{md}");
    }
}
