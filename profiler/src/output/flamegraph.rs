//! The flame graph, rendered by inferno from the folded lines.

use std::io::Write;

use inferno::flamegraph::{self, Options, Palette, color::MultiPalette};

pub fn write(
    lines: &[(String, u64)],
    title: &str,
    subtitle: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut options = Options::default();
    options.title = title.to_owned();
    options.subtitle = Some(subtitle.to_owned());
    options.count_name = "samples".to_owned();
    // Kernel, JIT (JS) and native frames get different hues.
    options.colors = Palette::Multi(MultiPalette::Js);
    options.deterministic = true;

    let text: Vec<String> = lines.iter().map(|(s, n)| format!("{s} {n}")).collect();
    flamegraph::from_lines(&mut options, text.iter().map(String::as_str), out)?;
    Ok(())
}
