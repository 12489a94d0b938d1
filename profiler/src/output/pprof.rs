//! `profile.pb.gz`: the profile as a gzip-compressed pprof protobuf, for
//! `go tool pprof`, Grafana Pyroscope, Parca and speedscope.
//!
//! Each distinct frame is one function and one location (inlined frames are
//! their own locations, so every tool sees them). Samples carry two values,
//! a count and CPU time (count times the sampling period), and the thread's
//! name and id as labels.

use std::{collections::HashMap, io::Write};

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use crate::profile::{FrameKind, Profile};

/// The messages of pprof's `profile.proto` that the profiler writes.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// What the pprof file says about the run besides the samples.
pub struct Meta<'a> {
    pub frequency_hz: u64,
    pub start_unix_ns: i64,
    pub duration_ns: i64,
    pub comment: &'a str,
}

/// Interns strings; index 0 is the empty string, as pprof requires.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut strings = Self::default();
        strings.get("");
        strings
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// Builds the pprof message of a profile.
fn build(profile: &Profile, meta: &Meta<'_>) -> proto::Profile {
    let mut strings = Strings::new();
    let period_ns = 1_000_000_000 / meta.frequency_hz.max(1) as i64;
    let samples_type = proto::ValueType {
        r#type: strings.get("samples"),
        unit: strings.get("count"),
    };
    let cpu_type = proto::ValueType {
        r#type: strings.get("cpu"),
        unit: strings.get("nanoseconds"),
    };

    // One function and one location per frame, ids from 1.
    let mut functions = Vec::with_capacity(profile.frames.len());
    let mut locations = Vec::with_capacity(profile.frames.len());
    for (i, frame) in profile.frames.iter().enumerate() {
        let id = i as u64 + 1;
        let name = strings.get(&frame.folded_name());
        let filename = match (&frame.file, &frame.module, frame.kind) {
            (Some(file), _, _) => strings.get(file),
            (None, Some(module), _) => strings.get(module),
            (None, None, FrameKind::Kernel) => strings.get("[kernel]"),
            (None, None, _) => 0,
        };
        functions.push(proto::Function {
            id,
            name,
            system_name: name,
            filename,
        });
        locations.push(proto::Location {
            id,
            line: vec![proto::Line {
                function_id: id,
                line: frame.line.map_or(0, i64::from),
            }],
        });
    }

    let thread_key = strings.get("thread");
    let tid_key = strings.get("thread_id");
    let samples = profile
        .samples
        .iter()
        .map(|sample| proto::Sample {
            // Leaf first in pprof.
            location_id: sample.stack.iter().rev().map(|&f| f as u64 + 1).collect(),
            value: vec![sample.count as i64, sample.count as i64 * period_ns],
            label: vec![
                proto::Label {
                    key: thread_key,
                    str: strings.get(&sample.thread),
                    num: 0,
                },
                proto::Label {
                    key: tid_key,
                    str: 0,
                    num: i64::from(sample.tid),
                },
            ],
        })
        .collect();
    let comment = vec![strings.get(meta.comment)];

    proto::Profile {
        sample_type: vec![samples_type, cpu_type.clone()],
        sample: samples,
        location: locations,
        function: functions,
        string_table: strings.table,
        time_nanos: meta.start_unix_ns,
        duration_nanos: meta.duration_ns,
        period_type: Some(cpu_type),
        period: period_ns,
        comment,
    }
}

/// Writes the gzip-compressed pprof encoding of a profile.
pub fn write(profile: &Profile, meta: &Meta<'_>, out: &mut impl Write) -> anyhow::Result<()> {
    let bytes = build(profile, meta).encode_to_vec();
    let mut gzip = GzEncoder::new(out, Compression::default());
    gzip.write_all(&bytes)?;
    gzip.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Frame;

    #[test]
    fn samples_reference_their_frames_leaf_first_with_both_values() {
        let mut profile = Profile::default();
        let main = profile.intern(Frame::new("main", FrameKind::Native));
        let hot = profile.intern(Frame::jit("JS:*hot /a.js:1:1"));
        profile.add(7, "node", vec![main, hot], 3);
        profile.add(8, "worker", vec![main], 1);
        let meta = Meta {
            frequency_hz: 100,
            start_unix_ns: 1,
            duration_ns: 2,
            comment: "test",
        };

        let message = build(&profile, &meta);

        assert_eq!(message.string_table[0], "");
        assert_eq!(message.period, 10_000_000);
        assert_eq!(message.sample.len(), 2);
        assert_eq!(
            message.sample[0].location_id,
            [hot as u64 + 1, main as u64 + 1]
        );
        assert_eq!(message.sample[0].value, [3, 30_000_000]);
        let name = |id: u64| {
            let function = &message.function[id as usize - 1];
            message.string_table[function.name as usize].as_str()
        };
        assert_eq!(name(hot as u64 + 1), "hot /a.js:1:1_[j]");
        let total: i64 = message.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 4);
        let decoded = proto::Profile::decode(&*message.encode_to_vec()).unwrap();
        assert_eq!(decoded, message);
    }
}
