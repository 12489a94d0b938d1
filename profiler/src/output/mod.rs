//! Writes the files of a profile. Each one is written to a temporary name
//! in the output folder and renamed into place, so a file is either
//! complete or absent.

pub mod flamegraph;
pub mod folded;
pub mod pprof;
pub mod summary;

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Creates the output folder if needed and checks that files can be
/// written in it, before any sampling is done.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    let probe = dir.join(format!(".profiler-probe-{}", std::process::id()));
    fs::write(&probe, b"")
        .with_context(|| format!("cannot write in the output folder {}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    give_to_invoking_user(dir);
    Ok(())
}

/// Writes `name` in `dir` through a temporary file and a rename.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = fs::File::create(&tmp)?;
        let mut writer = io::BufWriter::new(file);
        write(&mut writer)?;
        writer.flush()?;
        writer.get_ref().sync_all()?;
        fs::rename(&tmp, &path)?;
        anyhow::Ok(())
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err.context(format!("cannot write {}", path.display())));
    }
    give_to_invoking_user(&path);
    Ok(path)
}

/// Writes `value` as pretty JSON to `name` in `dir`, atomically.
pub fn write_json(
    dir: &Path,
    name: &str,
    value: &impl serde::Serialize,
) -> anyhow::Result<PathBuf> {
    write_atomic(dir, name, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        writeln!(w)?;
        Ok(())
    })
}

/// Writes folded stacks to `folded_name` and, when there are any, their
/// flame graph to `svg_name`; returns the files written.
pub fn write_stacks(
    dir: &Path,
    (folded_name, svg_name): (&str, &str),
    folded: &[(String, u64)],
    (title, subtitle): (&str, &str),
    look: &flamegraph::Look,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = vec![write_atomic(dir, folded_name, |w| {
        Ok(self::folded::write(folded, w)?)
    })?];
    if !folded.is_empty() {
        written.push(write_atomic(dir, svg_name, |w| {
            flamegraph::write(folded, title, subtitle, look, w)
        })?);
    }
    Ok(written)
}

/// Under sudo, hands a written file to the user who ran sudo, so that the
/// profile can be opened, moved and deleted without root.
fn give_to_invoking_user(path: &Path) {
    let id = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    if let (Some(uid), Some(gid)) = (id("SUDO_UID"), id("SUDO_GID"))
        && let Err(err) = std::os::unix::fs::chown(path, Some(uid), Some(gid))
    {
        log::debug!("cannot hand {} to uid {uid}: {err}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(dir.path(), "out.txt", |w| {
            w.write_all(b"half")?;
            anyhow::bail!("renderer failed")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("renderer failed"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unwritable_folder_is_reported_before_sampling() {
        let err = prepare_dir(Path::new("/proc/profiler-cannot-be-here")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot create the output folder"));
    }
}
