//! The flame graph, rendered by inferno from the folded lines.

use std::io::Write;

use inferno::flamegraph::{self, Direction, Options, Palette, color::MultiPalette};

/// The user's choices for flame graphs.
#[derive(Clone, Debug, Default)]
pub struct Look {
    /// Replaces the generated title.
    pub title: Option<String>,
    /// An icicle graph: roots at the top.
    pub inverted: bool,
    /// Frames narrower than this many pixels are left out.
    pub min_width_px: f64,
}

pub fn write(
    lines: &[(String, u64)],
    title: &str,
    subtitle: &str,
    look: &Look,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut options = Options::default();
    options.title = look.title.clone().unwrap_or_else(|| title.to_owned());
    options.subtitle = Some(subtitle.to_owned());
    options.count_name = "samples".to_owned();
    // Kernel (`_[k]`), JIT (`_[j]`, JS) and native frames get different hues.
    options.colors = Palette::Multi(MultiPalette::Js);
    options.deterministic = true;
    options.min_width = look.min_width_px;
    if look.inverted {
        options.direction = Direction::Inverted;
    }

    let text: Vec<String> = lines.iter().map(|(s, n)| format!("{s} {n}")).collect();
    flamegraph::from_lines(&mut options, text.iter().map(String::as_str), out)?;
    Ok(())
}
