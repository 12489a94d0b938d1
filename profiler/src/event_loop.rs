//! Event-loop blocking: joins the loop iterations traced in the kernel with
//! the CPU samples taken inside them, to say for each stall of a loop what
//! the thread was doing.

use std::collections::{BTreeMap, HashMap};

use profiler_common::{
    HIST_BUCKETS, LoopEvent, LoopThread, SampleKey, hist_bucket_floor_us, loop_event,
};
use serde::Serialize;

use crate::{
    profile::{Profile, TopEntry},
    symbolize::ResolvedStacks,
};

/// An episode is called off-CPU when samples account for less than this
/// share of its duration.
const OFF_CPU_SHARE: f64 = 0.5;

/// Rows of hottest frames kept per episode.
const EPISODE_TOP_ROWS: usize = 5;

/// Loop-iteration statistics and the blocking episodes of one run.
#[derive(Debug, Serialize)]
pub struct LoopReport {
    pub threshold_ms: f64,
    /// What cut the iterations: the epoll-wait probes or the syscall
    /// tracepoints.
    pub probe: &'static str,
    /// All loop threads: those seen waiting in epoll.
    #[serde(flatten)]
    pub all: LoopStats,
    /// The same figures for main threads only (thread id equal to process
    /// id: node's main loop), and for the other loop threads (worker
    /// threads).
    pub main_thread: LoopStats,
    pub other_threads: LoopStats,
    /// Samples taken inside episodes.
    pub episode_samples: u64,
    /// Loop events lost because the ring buffer was full.
    pub events_lost: u64,
    #[serde(skip)]
    pub episodes: Vec<Episode>,
}

/// Iteration statistics of a group of loop threads.
#[derive(Debug, Default, Serialize)]
pub struct LoopStats {
    pub threads: usize,
    pub iterations: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub episode_count: usize,
}

/// One loop iteration that lasted at least the threshold.
#[derive(Debug, Serialize)]
pub struct Episode {
    pub tid: u32,
    pub thread: String,
    /// On the process's main thread, rather than a worker thread.
    pub main_thread: bool,
    /// Seconds from the start of profiling.
    pub start_s: f64,
    /// Wall-clock start, RFC 3339 in UTC.
    pub start_time: String,
    pub duration_ms: f64,
    pub samples: u64,
    /// The part of the duration inside the profile: less than the duration
    /// for an iteration that began before sampling did.
    pub sampled_ms: f64,
    /// CPU time the samples account for.
    pub on_cpu_ms: f64,
    /// The rest of the sampled part of the duration: waiting on disk, a
    /// lock, or the scheduler.
    pub off_cpu_ms: f64,
    /// Most of the episode was spent off the CPU.
    pub off_cpu: bool,
    /// The iteration had not ended when profiling stopped.
    pub in_progress: bool,
    /// Hottest frames by self time.
    pub top_self: Vec<TopEntry>,
    /// JavaScript functions that were running (the innermost JS frame of
    /// each sample), most samples first.
    pub top_js: Vec<TopEntry>,
    #[serde(skip)]
    key: (u32, u64),
}

impl Episode {
    /// The frame that best names the cause: the hottest JS function, else
    /// the hottest frame.
    pub fn culprit(&self) -> Option<&TopEntry> {
        self.top_js.first().or(self.top_self.first())
    }
}

/// Clocks of the run, to turn kernel timestamps into run-relative and wall
/// times.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_MONOTONIC at the start of sampling, in ns.
    pub start_mono_ns: u64,
    /// Unix time at the same moment, in seconds.
    pub start_unix_s: f64,
    /// CLOCK_MONOTONIC when sampling stopped.
    pub stop_mono_ns: u64,
}

/// Inputs gathered from the kernel side.
pub struct LoopData<'a> {
    pub events: &'a [LoopEvent],
    pub histogram: &'a [u64],
    pub threads: &'a [(u32, LoopThread)],
    pub events_lost: u64,
    pub max_ns: u64,
    pub threshold_ns: u64,
    pub probe: &'static str,
}

/// The samples inside episodes, as a profile, and the report.
pub fn analyze(
    data: &LoopData<'_>,
    clock: Clock,
    frequency_hz: u64,
    resolved: &ResolvedStacks,
    thread_names: &BTreeMap<u32, (u32, String)>,
    proc_names: &BTreeMap<u32, String>,
) -> (LoopReport, Profile) {
    let name_of = |tid: u32| -> String {
        thread_names
            .get(&tid)
            .map(|(_, name)| name.clone())
            .or_else(|| proc_names.get(&tid).cloned())
            .unwrap_or_else(|| format!("[tid {tid}]"))
    };

    // Episodes that ended, then iterations still running at the stop.
    let mut spans: Vec<(u32, u64, u64, u64, bool)> = data
        .events
        .iter()
        .filter(|e| e.kind == loop_event::EPISODE)
        .map(|e| (e.tid, e.iteration, e.start_ns, e.end_ns, false))
        .collect();
    for (tid, state) in data.threads {
        let open_ns = clock.stop_mono_ns.saturating_sub(state.iteration_start_ns);
        if state.in_wait == 0 && state.iteration_start_ns > 0 && open_ns >= data.threshold_ns {
            let already = spans.iter().any(|s| s.0 == *tid && s.1 == state.iteration);
            if !already {
                spans.push((
                    *tid,
                    state.iteration,
                    state.iteration_start_ns,
                    clock.stop_mono_ns,
                    true,
                ));
            }
        }
    }

    // Samples by (thread, iteration).
    let mut samples: HashMap<(u32, u64), Vec<SampleKey>> = HashMap::new();
    for event in data.events.iter().filter(|e| e.kind == loop_event::SAMPLE) {
        samples
            .entry((event.tid, event.iteration))
            .or_default()
            .push(SampleKey {
                pid: event.pid,
                tid: event.tid,
                user_stack_id: event.user_stack_id,
                kernel_stack_id: event.kernel_stack_id,
            });
    }

    let mut all_counts: BTreeMap<SampleKey, u64> = BTreeMap::new();
    let mut episodes = Vec::with_capacity(spans.len());
    for (tid, iteration, start_ns, end_ns, in_progress) in spans {
        let keys = samples
            .get(&(tid, iteration))
            .map_or(&[][..], Vec::as_slice);
        let mut counts: BTreeMap<SampleKey, u64> = BTreeMap::new();
        for key in keys {
            *counts.entry(*key).or_default() += 1;
            *all_counts.entry(*key).or_default() += 1;
        }
        let counts: Vec<(SampleKey, u64)> = counts.into_iter().collect();
        let profile = resolved.profile(&counts, thread_names, proc_names);

        let duration_ms = end_ns.saturating_sub(start_ns) as f64 / 1e6;
        let sample_count = keys.len() as u64;
        // On- and off-CPU time are only known for the part of the episode
        // that was sampled; an iteration may have begun before sampling.
        let sampled_ms = end_ns.saturating_sub(start_ns.max(clock.start_mono_ns)) as f64 / 1e6;
        let on_cpu_ms = (sample_count as f64 * 1000.0 / frequency_hz as f64).min(sampled_ms);
        // Negative for an iteration that began before sampling did.
        let start_offset_s = (start_ns as f64 - clock.start_mono_ns as f64) / 1e9;
        let pid = keys
            .first()
            .map(|key| key.pid)
            .or_else(|| {
                data.threads
                    .iter()
                    .find(|(t, _)| *t == tid)
                    .map(|(_, s)| s.pid)
            })
            .unwrap_or(0);
        episodes.push(Episode {
            tid,
            thread: name_of(tid),
            main_thread: tid == pid,
            start_s: round3(start_offset_s),
            start_time: rfc3339(
                clock.start_unix_s + (start_ns as f64 - clock.start_mono_ns as f64) / 1e9,
            ),
            duration_ms: round3(duration_ms),
            samples: sample_count,
            sampled_ms: round3(sampled_ms),
            on_cpu_ms: round3(on_cpu_ms),
            off_cpu_ms: round3(sampled_ms - on_cpu_ms),
            off_cpu: sampled_ms > 0.0 && on_cpu_ms < sampled_ms * OFF_CPU_SHARE,
            in_progress,
            top_self: profile.top_self(EPISODE_TOP_ROWS),
            top_js: profile.top_js(EPISODE_TOP_ROWS),
            key: (tid, iteration),
        });
    }
    episodes.sort_by(|a, b| {
        b.duration_ms
            .total_cmp(&a.duration_ms)
            .then(a.key.cmp(&b.key))
    });

    let all_counts: Vec<(SampleKey, u64)> = all_counts.into_iter().collect();
    let blocking = resolved.profile(&all_counts, thread_names, proc_names);
    let buckets = HIST_BUCKETS as usize;
    let group = |index: usize| -> &[u64] {
        data.histogram
            .get(index * buckets..(index + 1) * buckets)
            .unwrap_or(&[])
    };
    let all: Vec<u64> = (0..buckets)
        .map(|b| group(0).get(b).copied().unwrap_or(0) + group(1).get(b).copied().unwrap_or(0))
        .collect();
    let stats = |histogram: &[u64], main: bool| -> LoopStats {
        let mine = episodes.iter().filter(|e| e.main_thread == main);
        let longest_episode_ns = mine
            .clone()
            .map(|e| e.duration_ms * 1e6)
            .fold(0.0, f64::max);
        // Exact from episodes when there are any; else the top of the
        // highest non-empty bucket, never above the overall maximum.
        let max_ns = if longest_episode_ns > 0.0 {
            longest_episode_ns as u64
        } else {
            histogram
                .iter()
                .rposition(|&n| n > 0)
                .map_or(0, |b| hist_bucket_floor_us(b as u32 + 1) * 1000)
                .min(data.max_ns)
        };
        LoopStats {
            threads: data
                .threads
                .iter()
                .filter(|(tid, state)| (*tid == state.pid) == main)
                .count(),
            iterations: histogram.iter().sum(),
            p50_ms: percentile_ms(histogram, 0.50, max_ns),
            p90_ms: percentile_ms(histogram, 0.90, max_ns),
            p99_ms: percentile_ms(histogram, 0.99, max_ns),
            max_ms: round3(max_ns as f64 / 1e6),
            episode_count: mine.count(),
        }
    };
    let report = LoopReport {
        threshold_ms: data.threshold_ns as f64 / 1e6,
        probe: data.probe,
        all: LoopStats {
            threads: data.threads.len(),
            iterations: all.iter().sum(),
            p50_ms: percentile_ms(&all, 0.50, data.max_ns),
            p90_ms: percentile_ms(&all, 0.90, data.max_ns),
            p99_ms: percentile_ms(&all, 0.99, data.max_ns),
            max_ms: round3(data.max_ns as f64 / 1e6),
            episode_count: episodes.len(),
        },
        main_thread: stats(group(0), true),
        other_threads: stats(group(1), false),
        episode_samples: blocking.total(),
        events_lost: data.events_lost,
        episodes,
    };
    (report, blocking)
}

/// A percentile of the histogram, in ms: the middle of the bucket it falls
/// in, never above the largest value seen.
fn percentile_ms(histogram: &[u64], quantile: f64, max_ns: u64) -> f64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = ((total as f64) * quantile).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let low = hist_bucket_floor_us(bucket as u32) as f64;
            let high = hist_bucket_floor_us(bucket as u32 + 1) as f64;
            let mid_ms = (low + high) / 2.0 / 1000.0;
            return round3(mid_ms.min(max_ns as f64 / 1e6));
        }
    }
    round3(max_ns as f64 / 1e6)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Formats Unix time as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(unix_s: f64) -> String {
    let millis = (unix_s * 1000.0).round() as i64;
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use profiler_common::hist_bucket;

    use super::*;

    #[test]
    fn wall_clock_is_formatted_in_utc() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400.5), "2000-02-29T00:00:00.500Z");
        assert_eq!(rfc3339(1_796_314_904.038), "2026-12-03T16:21:44.038Z");
    }

    #[test]
    fn percentiles_fall_in_the_right_bucket() {
        let mut histogram = vec![0u64; profiler_common::HIST_BUCKETS as usize];
        // 98 iterations of 100 µs, one of 10 ms, one of 200 ms.
        histogram[hist_bucket(100) as usize] += 98;
        histogram[hist_bucket(10_000) as usize] += 1;
        histogram[hist_bucket(200_000) as usize] += 1;
        let p50 = percentile_ms(&histogram, 0.5, 200_000_000);
        assert!((0.09..0.11).contains(&p50), "{p50}");
        let p99 = percentile_ms(&histogram, 0.99, 200_000_000);
        assert!((9.0..11.0).contains(&p99), "{p99}");
        assert_eq!(percentile_ms(&histogram, 1.0, 200_000_000), 200.0);
        assert_eq!(percentile_ms(&[0; 4], 0.5, 0), 0.0);
    }

    fn event(kind: u32, tid: u32, iteration: u64, start_ns: u64, end_ns: u64) -> LoopEvent {
        LoopEvent {
            kind,
            pid: 1,
            tid,
            _pad: 0,
            user_stack_id: profiler_common::NO_STACK,
            kernel_stack_id: profiler_common::NO_STACK,
            iteration,
            start_ns,
            end_ns,
        }
    }

    #[test]
    fn samples_join_their_episode_and_open_iterations_count() {
        let ms = 1_000_000;
        let events = [
            event(loop_event::EPISODE, 7, 3, 1000 * ms, 1200 * ms),
            event(loop_event::SAMPLE, 7, 3, 1100 * ms, 1100 * ms),
            event(loop_event::SAMPLE, 7, 3, 1110 * ms, 1110 * ms),
            // A sample of a short iteration stays out.
            event(loop_event::SAMPLE, 7, 4, 1300 * ms, 1300 * ms),
        ];
        let threads = [(
            8,
            LoopThread {
                iteration_start_ns: 1500 * ms,
                iteration: 9,
                pid: 1,
                in_wait: 0,
            },
        )];
        let data = LoopData {
            events: &events,
            histogram: &[],
            threads: &threads,
            events_lost: 0,
            max_ns: 200 * ms,
            threshold_ns: 50 * ms,
            probe: "test",
        };
        let clock = Clock {
            start_mono_ns: 900 * ms,
            start_unix_s: 0.0,
            stop_mono_ns: 1600 * ms,
        };
        let (report, blocking) = analyze(
            &data,
            clock,
            100,
            &ResolvedStacks::default(),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(report.all.episode_count, 2);
        let first = &report.episodes[0];
        assert_eq!((first.tid, first.duration_ms, first.samples), (7, 200.0, 2));
        assert!((first.start_s - 0.1).abs() < 1e-9);
        assert!(first.off_cpu, "2 samples at 100 Hz cover 20 of 200 ms");
        assert!(!first.in_progress);
        let open = &report.episodes[1];
        assert_eq!(
            (open.tid, open.duration_ms, open.in_progress),
            (8, 100.0, true)
        );
        assert_eq!(blocking.total(), 2);
    }
}
