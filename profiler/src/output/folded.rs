//! Folded stacks: one `frame;frame;…;frame count` line per distinct stack,
//! root first, as FlameGraph and inferno read them.

use std::io::Write;

pub fn write(lines: &[(String, u64)], out: &mut impl Write) -> std::io::Result<()> {
    for (stack, count) in lines {
        writeln!(out, "{stack} {count}")?;
    }
    Ok(())
}
