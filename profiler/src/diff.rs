//! `profiler diff` and `profiler report`: views over saved profiles.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use inferno::flamegraph::{self, Options};
use log::warn;

use crate::{
    cli::{DiffArgs, Format, Grouping, ReportArgs},
    compare::{self, Folded},
    output,
};

pub fn run_diff(args: &DiffArgs) -> anyhow::Result<i32> {
    let before = compare::load(&args.before)?;
    let after = compare::load(&args.after)?;
    if before.total() == 0 || after.total() == 0 {
        anyhow::bail!("one of the profiles has no samples; there is nothing to compare");
    }
    let note = frequency_note(&before, &after);
    if let Some(note) = &note {
        warn!("{note}");
    }
    let rows = compare::changes(
        &compare::shares(&before),
        &compare::shares(&after),
        args.top,
    );

    let dir = args.output.clone().unwrap_or_else(|| PathBuf::from("diff"));
    output::prepare_dir(&dir)?;
    let svg = output::write_atomic(&dir, "diff.svg", |w| differential(&before, &after, w))?;
    let title = format!("{} → {}", before.path.display(), after.path.display());
    let md = output::write_atomic(&dir, "diff.md", |w| {
        writeln!(w, "# {title}\n")?;
        writeln!(
            w,
            "Shares are percentages of each profile's own samples ({} before, {} after); \
             changes are in percentage points.\n",
            before.total(),
            after.total()
        )?;
        if let Some(note) = &note {
            writeln!(w, "{note}\n")?;
        }
        w.write_all(compare::changes_markdown(&rows).as_bytes())?;
        Ok(())
    })?;
    let json = output::write_json(
        &dir,
        "diff.json",
        &serde_json::json!({
            "before": before.path,
            "after": after.path,
            "before_samples": before.total(),
            "after_samples": after.total(),
            "note": note,
            "changes": rows,
        }),
    )?;

    let mut out = format!(
        "{title}: {} samples before, {} after\n\n{:>9} {:>9}  frame\n",
        before.total(),
        after.total(),
        "self Δ",
        "total Δ"
    );
    for row in &rows {
        out.push_str(&format!(
            "{:>+9.2} {:>+9.2}  {}\n",
            row.self_change, row.total_change, row.frame
        ));
    }
    out.push_str(&format!(
        "\nwrote:\n  {}\n  {}\n  {}\n",
        svg.display(),
        md.display(),
        json.display()
    ));
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(0)
}

/// Writes a loaded profile as pprof, next to nothing else: the file is
/// complete or absent.
fn write_pprof(folded: &Folded, path: &std::path::Path) -> anyhow::Result<()> {
    let profile = crate::profile::Profile::from_folded(&folded.lines, folded.thread_roots);
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("--pprof needs a file name")?;
    // Without a known rate, each sample is worth one period of 10 ms.
    let meta = output::pprof::Meta {
        frequency_hz: folded.frequency_hz.unwrap_or(100),
        start_unix_ns: 0,
        duration_ns: 0,
        comment: &format!("from {}", folded.path.display()),
    };
    output::write_atomic(&dir, name, |w| output::pprof::write(&profile, &meta, w))?;
    Ok(())
}

/// Says so when the two profiles were sampled at different frequencies:
/// the shares compare, the raw counts do not.
fn frequency_note(before: &Folded, after: &Folded) -> Option<String> {
    match (before.frequency_hz, after.frequency_hz) {
        (Some(b), Some(a)) if a != b => Some(format!(
            "the profiles were sampled at different frequencies ({b} Hz and {a} Hz); \
             counts are normalized and shares compared"
        )),
        _ => None,
    }
}

/// A differential flame graph, normalized: red where AFTER spends a larger
/// share, blue where it spends less.
fn differential(
    before: &Folded,
    after: &Folded,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let text = |folded: &Folded| -> String {
        folded
            .lines
            .iter()
            .map(|(stack, n)| format!("{stack} {n}\n"))
            .collect()
    };
    let mut diffed = Vec::new();
    let options = inferno::differential::Options {
        normalize: true,
        ..Default::default()
    };
    inferno::differential::from_readers(
        options,
        text(before).as_bytes(),
        text(after).as_bytes(),
        &mut diffed,
    )
    .context("cannot diff the folded stacks")?;
    let mut options = Options::default();
    options.title = "Differential flame graph (normalized)".to_owned();
    options.subtitle = Some(format!(
        "{} → {}: red grew, blue shrank",
        before.path.display(),
        after.path.display()
    ));
    options.count_name = "samples".to_owned();
    flamegraph::from_reader(&mut options, &diffed[..], out)?;
    Ok(())
}

pub fn run_report(args: &ReportArgs) -> anyhow::Result<i32> {
    let folded = compare::load(&args.profile)?;
    if let Some(path) = &args.pprof {
        write_pprof(&folded, path)?;
        eprintln!("wrote {}", path.display());
    }
    if args.by == Some(Grouping::ThreadRole) {
        let rows = compare::by_thread_role(&folded);
        let out = match args.format {
            Format::Json => serde_json::to_string_pretty(&rows)? + "\n",
            Format::Md => {
                let mut md = String::from(
                    "| thread role | samples | share | hottest frame |\n| --- | ---: | ---: | --- |\n",
                );
                for row in &rows {
                    md.push_str(&format!(
                        "| {} | {} | {:.2}% | `{}` |\n",
                        row.role,
                        row.samples,
                        row.percent,
                        row.hottest.as_deref().unwrap_or("").replace('|', "\\|")
                    ));
                }
                md
            }
            Format::Text => rows
                .iter()
                .map(|row| {
                    format!(
                        "  {:>6.2}%  {:<18} {}\n",
                        row.percent,
                        row.role,
                        row.hottest.as_deref().unwrap_or("")
                    )
                })
                .collect(),
        };
        let _ = std::io::stdout().lock().write_all(out.as_bytes());
        return Ok(0);
    }
    let shares = compare::shares(&folded);
    let by_self = compare::hottest(&shares, args.top, false);
    let by_total = compare::hottest(&shares, args.top, true);
    let out = match args.format {
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({
                "profile": folded.path,
                "samples": folded.total(),
                "top_self": by_self,
                "top_total": by_total,
            }))? + "\n"
        }
        Format::Md => format!(
            "# {}\n\n{} samples.\n\n## Hottest frames by self time\n\n{}\n## Hottest frames by total time\n\n{}",
            folded.path.display(),
            folded.total(),
            compare::hottest_markdown(&by_self),
            compare::hottest_markdown(&by_total)
        ),
        Format::Text => {
            let table = |rows: &[compare::Hot], by_total: bool| -> String {
                rows.iter()
                    .map(|row| {
                        let share = if by_total {
                            row.total_percent
                        } else {
                            row.self_percent
                        };
                        format!("  {share:>6.2}%  {}\n", row.frame)
                    })
                    .collect()
            };
            format!(
                "{}: {} samples\n\nhottest frames by self time:\n{}\nhottest frames by total time:\n{}",
                folded.path.display(),
                folded.total(),
                table(&by_self, false),
                table(&by_total, true)
            )
        }
    };
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(0)
}
