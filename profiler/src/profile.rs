//! The symbolized profile: samples as stacks of frames, and the views the
//! outputs are made from (folded lines, hottest frames).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

/// Where a frame's code lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameKind {
    /// Compiled code from an ELF file: the runtime, libraries, the app.
    Native,
    /// Code generated at run time and named by a perf map (V8's JS).
    Jit,
    Kernel,
    /// An address with no symbol.
    Unknown,
}

/// One frame of a stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub name: String,
    pub kind: FrameKind,
    /// File name of the mapping the code is in.
    pub module: Option<String>,
    /// Source file and line, where debug info has them.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Inlined into the frame below it.
    pub inlined: bool,
}

impl Frame {
    pub fn new(name: &str, kind: FrameKind) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            module: None,
            file: None,
            line: None,
            inlined: false,
        }
    }

    /// A frame named by a perf-map entry. V8's `JS:` prefix and its tier
    /// mark (`*` optimized, `~` interpreted, `^` baseline, `+` Maglev) are
    /// dropped, so one JS function is one frame whichever tier ran it.
    pub fn jit(perf_map_name: &str) -> Self {
        let name = match perf_map_name.strip_prefix("JS:") {
            Some(rest) => rest.trim_start_matches(['*', '~', '^', '+']),
            None => perf_map_name
                .strip_prefix("LazyCompile:")
                .map_or(perf_map_name, |rest| {
                    rest.trim_start_matches(['*', '~', '^', '+'])
                }),
        };
        // An anonymous function has only its location after the mark.
        if name.starts_with(' ') {
            return Self::new(&format!("(anonymous){name}"), FrameKind::Jit);
        }
        Self::new(name, FrameKind::Jit)
    }

    /// Whether the frame is a JavaScript function, rather than native code,
    /// one of V8's own code objects (`Builtin:ArrayPush`) or code named by
    /// the profiler (`[compiled regexp]`).
    pub fn is_js(&self) -> bool {
        self.kind == FrameKind::Jit
            && !self.name.starts_with('[')
            && !self
                .name
                .split_whitespace()
                .next()
                .is_some_and(|first| first.contains(':'))
    }

    pub fn set_location(&mut self, file: &str, line: Option<u32>) {
        self.file = Some(file.to_owned());
        self.line = line;
    }

    /// The name as it appears in folded stacks and flame graphs: kernel and
    /// JIT frames carry FlameGraph's `_[k]` and `_[j]` marks, which color
    /// them apart, and `;` is replaced since it separates frames.
    pub fn folded_name(&self) -> String {
        let mut name = self.name.replace([';', '\n'], ":");
        match self.kind {
            FrameKind::Kernel => name.push_str("_[k]"),
            FrameKind::Jit => name.push_str("_[j]"),
            FrameKind::Native | FrameKind::Unknown => {}
        }
        name
    }
}

/// Samples that share a thread and a stack.
#[derive(Clone, Debug)]
pub struct Sample {
    pub tid: u32,
    pub thread: String,
    /// Indexes into [`Profile::frames`], root first.
    pub stack: Vec<usize>,
    pub count: u64,
}

/// A symbolized profile.
#[derive(Debug, Default)]
pub struct Profile {
    pub frames: Vec<Frame>,
    index: HashMap<Frame, usize>,
    pub samples: Vec<Sample>,
}

/// One row of a hottest-frames table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopEntry {
    pub frame: String,
    pub kind: FrameKind,
    pub samples: u64,
    pub percent: f64,
}

impl Profile {
    /// Interns a frame and returns its index.
    pub fn intern(&mut self, frame: Frame) -> usize {
        if let Some(&index) = self.index.get(&frame) {
            return index;
        }
        let index = self.frames.len();
        self.frames.push(frame.clone());
        self.index.insert(frame, index);
        index
    }

    pub fn add(&mut self, tid: u32, thread: &str, stack: Vec<usize>, count: u64) {
        self.samples.push(Sample {
            tid,
            thread: thread.to_owned(),
            stack,
            count,
        });
    }

    pub fn total(&self) -> u64 {
        self.samples.iter().map(|s| s.count).sum()
    }

    /// Folded stacks, `thread;root;…;leaf` with counts, merged and sorted;
    /// without the thread-name root when `thread_roots` is false.
    pub fn folded(&self, thread_roots: bool) -> Vec<(String, u64)> {
        let mut merged: BTreeMap<String, u64> = BTreeMap::new();
        for sample in &self.samples {
            let mut line = String::new();
            if thread_roots {
                line = sample.thread.replace([';', '\n', ' '], "_");
                if line.is_empty() {
                    line = format!("[tid {}]", sample.tid);
                }
            }
            for &frame in &sample.stack {
                if !line.is_empty() {
                    line.push(';');
                }
                line.push_str(&self.frames[frame].folded_name());
            }
            if line.is_empty() {
                continue;
            }
            *merged.entry(line).or_default() += sample.count;
        }
        merged.into_iter().collect()
    }

    /// The `n` frames with the most samples at the top of the stack.
    pub fn top_self(&self, n: usize) -> Vec<TopEntry> {
        let mut by_frame: HashMap<(&str, FrameKind), u64> = HashMap::new();
        for sample in &self.samples {
            if let Some(&leaf) = sample.stack.last() {
                let frame = &self.frames[leaf];
                *by_frame.entry((&frame.name, frame.kind)).or_default() += sample.count;
            }
        }
        self.rank(by_frame, n)
    }

    /// The `n` frames present in the most samples anywhere in the stack.
    pub fn top_total(&self, n: usize) -> Vec<TopEntry> {
        let mut by_frame: HashMap<(&str, FrameKind), u64> = HashMap::new();
        let mut seen = HashSet::new();
        for sample in &self.samples {
            seen.clear();
            for &index in &sample.stack {
                let frame = &self.frames[index];
                // A recursive function counts once per sample.
                if seen.insert((&frame.name, frame.kind)) {
                    *by_frame.entry((&frame.name, frame.kind)).or_default() += sample.count;
                }
            }
        }
        self.rank(by_frame, n)
    }

    fn rank(&self, by_frame: HashMap<(&str, FrameKind), u64>, n: usize) -> Vec<TopEntry> {
        let total = self.total().max(1) as f64;
        let mut rows: Vec<TopEntry> = by_frame
            .into_iter()
            .map(|((name, kind), samples)| TopEntry {
                frame: name.to_owned(),
                kind,
                samples,
                percent: round2(samples as f64 * 100.0 / total),
            })
            .collect();
        rows.sort_by(|a, b| {
            b.samples
                .cmp(&a.samples)
                .then_with(|| a.frame.cmp(&b.frame))
        });
        rows.truncate(n);
        rows
    }

    /// The `n` JavaScript functions that were running most often: the
    /// innermost JS frame of each sample. V8's own code objects in a perf
    /// map (`Builtin:`, `Stub:`, `BytecodeHandler:`…) are not JS functions.
    pub fn top_js(&self, n: usize) -> Vec<TopEntry> {
        let mut by_frame: HashMap<(&str, FrameKind), u64> = HashMap::new();
        for sample in &self.samples {
            let innermost = sample
                .stack
                .iter()
                .rev()
                .map(|&index| &self.frames[index])
                .find(|frame| frame.is_js());
            if let Some(frame) = innermost {
                *by_frame.entry((&frame.name, frame.kind)).or_default() += sample.count;
            }
        }
        self.rank(by_frame, n)
    }

    /// A profile from folded lines, as `profiler report` reads them back.
    /// Frame kinds come from the `_[k]` and `_[j]` marks; with
    /// `thread_roots`, each line's first frame is its thread's name.
    pub fn from_folded(lines: &[(String, u64)], thread_roots: bool) -> Self {
        let mut profile = Self::default();
        for (stack, count) in lines {
            let mut frames: Vec<&str> = stack.split(';').collect();
            let thread = if thread_roots && frames.len() > 1 {
                frames.remove(0)
            } else {
                ""
            };
            let stack = frames
                .into_iter()
                .map(|name| {
                    let frame = if let Some(name) = name.strip_suffix("_[k]") {
                        Frame::new(name, FrameKind::Kernel)
                    } else if let Some(name) = name.strip_suffix("_[j]") {
                        Frame::new(name, FrameKind::Jit)
                    } else {
                        Frame::new(name, FrameKind::Native)
                    };
                    profile.intern(frame)
                })
                .collect();
            profile.add(0, thread, stack, *count);
        }
        profile
    }

    /// Samples per thread name, most first.
    pub fn by_thread(&self) -> Vec<(String, u64)> {
        let mut by_thread: HashMap<&str, u64> = HashMap::new();
        for sample in &self.samples {
            *by_thread.entry(&sample.thread).or_default() += sample.count;
        }
        let mut rows: Vec<(String, u64)> = by_thread
            .into_iter()
            .map(|(t, n)| (t.to_owned(), n))
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    type Stack<'a> = (&'a str, &'a [(&'a str, FrameKind)], u64);

    fn profile_of(stacks: &[Stack<'_>]) -> Profile {
        let mut profile = Profile::default();
        for (i, (thread, frames, count)) in stacks.iter().enumerate() {
            let stack = frames
                .iter()
                .map(|(name, kind)| profile.intern(Frame::new(name, *kind)))
                .collect();
            profile.add(i as u32, thread, stack, *count);
        }
        profile
    }

    use FrameKind::{Jit, Kernel, Native};

    #[test]
    fn folded_lines_merge_equal_stacks_and_mark_kinds() {
        let profile = profile_of(&[
            ("node", &[("main", Native), ("handler /a.js:1:1", Jit)], 3),
            ("node", &[("main", Native), ("handler /a.js:1:1", Jit)], 2),
            (
                "node",
                &[("main", Native), ("read", Native), ("vfs_read", Kernel)],
                1,
            ),
        ]);
        assert_eq!(
            profile.folded(true),
            [
                ("node;main;handler /a.js:1:1_[j]".to_owned(), 5),
                ("node;main;read;vfs_read_[k]".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn folded_lines_read_back_to_the_same_lines() {
        let lines = vec![
            ("node;main;handler /a.js:1:1_[j]".to_owned(), 5),
            ("node;main;read;vfs_read_[k]".to_owned(), 1),
        ];
        let profile = Profile::from_folded(&lines, true);
        assert_eq!(profile.folded(true), lines);
        assert_eq!(profile.total(), 6);
    }

    #[test]
    fn separators_in_names_cannot_split_frames() {
        let profile = profile_of(&[("my thread", &[("a;b", Native)], 1)]);
        assert_eq!(profile.folded(true), [("my_thread;a:b".to_owned(), 1)]);
        assert_eq!(profile.folded(false), [("a:b".to_owned(), 1)]);
    }

    #[test]
    fn self_and_total_shares() {
        let profile = profile_of(&[
            ("t", &[("main", Native), ("hot", Native)], 3),
            ("t", &[("main", Native), ("cold", Native)], 1),
        ]);
        let top_self = profile.top_self(10);
        assert_eq!(top_self[0].frame, "hot");
        assert_eq!(top_self[0].percent, 75.0);
        assert_eq!(top_self[1].frame, "cold");
        let top_total = profile.top_total(1);
        assert_eq!(top_total[0].frame, "main");
        assert_eq!(top_total[0].percent, 100.0);
    }

    #[test]
    fn innermost_js_frame_names_the_running_function() {
        let profile = profile_of(&[
            (
                "t",
                &[
                    ("main", Native),
                    ("outer", Jit),
                    ("inner", Jit),
                    ("memcpy", Native),
                ],
                3,
            ),
            ("t", &[("main", Native), ("outer", Jit)], 1),
            ("t", &[("main", Native)], 1),
            ("t", &[("outer", Jit), ("Builtin:ArrayPush", Jit)], 0),
            ("t", &[("outer", Jit), ("[compiled regexp]", Jit)], 0),
        ]);
        let top = profile.top_js(5);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].frame.as_str(), top[0].samples), ("inner", 3));
        assert_eq!((top[1].frame.as_str(), top[1].samples), ("outer", 1));
        assert_eq!(top[0].percent, 60.0);
    }

    #[test]
    fn recursion_counts_once_in_total() {
        let profile = profile_of(&[("t", &[("fib", Jit), ("fib", Jit), ("fib", Jit)], 4)]);
        assert_eq!(profile.top_total(1)[0].samples, 4);
    }

    #[test]
    fn v8_tier_marks_are_dropped() {
        assert_eq!(Frame::jit("JS:*fib /x.js:1:1").name, "fib /x.js:1:1");
        assert_eq!(Frame::jit("JS:~fib /x.js:1:1").name, "fib /x.js:1:1");
        assert_eq!(Frame::jit("LazyCompile:*fib /x.js").name, "fib /x.js");
        assert_eq!(Frame::jit("Builtin:JsonParse").name, "Builtin:JsonParse");
        assert_eq!(Frame::jit("JS:* /x.js:2:7").name, "(anonymous) /x.js:2:7");
    }
}
