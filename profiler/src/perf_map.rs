//! Reads the perf maps that JIT compilers write to name their code.
//!
//! A perf map is `/tmp/perf-PID.map` inside the process's mount namespace,
//! one `START SIZE NAME` line per code object, addresses in hex. V8 writes
//! it when node runs with `--perf-basic-prof` or
//! `--perf-basic-prof-only-functions`. The file is in a world-writable
//! folder, so it is only trusted when the target's user or root owns it and
//! it is not a symlink: anyone else could plant names in the profile.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Read as _, Seek as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::procfs::{ProcessInfo, proc_path};

/// Why a perf map was not used.
#[derive(Debug)]
pub enum PerfMapError {
    /// The path is a symbolic link.
    Symlink(PathBuf),
    /// The owner is neither the target's user nor root.
    WrongOwner {
        path: PathBuf,
        uid: u32,
    },
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for PerfMapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink(path) => {
                write!(f, "{} is a symbolic link; not trusted", path.display())
            }
            Self::WrongOwner { path, uid } => write!(
                f,
                "{} is owned by uid {uid}, not by the target's user or root; not trusted",
                path.display()
            ),
            Self::Io(path, err) => write!(f, "cannot read {}: {err}", path.display()),
        }
    }
}

impl std::error::Error for PerfMapError {}

/// Where the perf map of a process is, as seen from this mount namespace.
pub fn path_for(process: &ProcessInfo) -> PathBuf {
    proc_path(process.pid, "root").join(format!("tmp/perf-{}.map", process.ns_pid))
}

/// An open perf map that keeps growing while the JIT compiles code.
///
/// The file stays open, so it can be read again after the process exits
/// and its `/proc` entry, through which the path was found, is gone.
#[derive(Debug)]
pub struct PerfMapFile {
    path: PathBuf,
    file: File,
}

impl PerfMapFile {
    /// Opens the perf map at `path` if it exists and can be trusted for a
    /// process running as `target_uid`. `Ok(None)` means there is none.
    pub fn open_trusted(path: &Path, target_uid: u32) -> Result<Option<Self>, PerfMapError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(PerfMapError::Io(path.to_owned(), err)),
        };
        check_trust(path, &meta, target_uid)?;

        let file = File::open(path).map_err(|err| PerfMapError::Io(path.to_owned(), err))?;
        // Re-check the opened file, so a swap between the check and the open
        // is caught.
        let opened = file
            .metadata()
            .map_err(|err| PerfMapError::Io(path.to_owned(), err))?;
        if opened.ino() != meta.ino() || opened.dev() != meta.dev() {
            return Err(PerfMapError::Symlink(path.to_owned()));
        }
        Ok(Some(Self {
            path: path.to_owned(),
            file,
        }))
    }

    /// Reads the whole map as it is now.
    pub fn read(&mut self) -> Result<PerfMap, PerfMapError> {
        let mut text = String::new();
        self.file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut text))
            .map_err(|err| PerfMapError::Io(self.path.clone(), err))?;
        Ok(PerfMap::parse(&text))
    }
}

fn check_trust(path: &Path, meta: &fs::Metadata, target_uid: u32) -> Result<(), PerfMapError> {
    if meta.file_type().is_symlink() {
        return Err(PerfMapError::Symlink(path.to_owned()));
    }
    if meta.uid() != target_uid && meta.uid() != 0 {
        return Err(PerfMapError::WrongOwner {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    Ok(())
}

/// Code objects of a perf map, by start address, without overlaps.
#[derive(Debug, Default)]
pub struct PerfMap {
    /// start → (end, name).
    entries: BTreeMap<u64, (u64, String)>,
}

impl PerfMap {
    /// Parses perf-map text. Lines that don't parse are skipped: the last
    /// line may be half-written while the JIT is still running.
    ///
    /// The JIT never logs that code died, only that new code was placed,
    /// so a line overlapping earlier ones means that memory was reused:
    /// the earlier entries are cut back to what the new one leaves free,
    /// and a stale name cannot claim the new code's addresses.
    pub fn parse(text: &str) -> Self {
        let mut map = Self::default();
        for line in text.lines() {
            if let Some((start, size, name)) = parse_line(line)
                && size > 0
            {
                map.insert(start, start.saturating_add(size), name);
            }
        }
        map
    }

    fn insert(&mut self, start: u64, end: u64, name: &str) {
        // Entries that overlap [start, end): the one starting before it, if
        // it reaches in, and every one starting inside it.
        let mut overlapping: Vec<u64> = self
            .entries
            .range(..start)
            .next_back()
            .filter(|(_, (old_end, _))| *old_end > start)
            .map(|(&old_start, _)| old_start)
            .into_iter()
            .collect();
        overlapping.extend(self.entries.range(start..end).map(|(&s, _)| s));
        for old_start in overlapping {
            let Some((old_end, old_name)) = self.entries.remove(&old_start) else {
                continue;
            };
            if old_start < start {
                self.entries.insert(old_start, (start, old_name.clone()));
            }
            if old_end > end {
                self.entries.insert(end, (old_end, old_name));
            }
        }
        self.entries.insert(start, (end, name.to_owned()));
    }

    /// The name of the code object holding `addr`.
    pub fn find(&self, addr: u64) -> Option<&str> {
        let (_, (end, name)) = self.entries.range(..=addr).next_back()?;
        (addr < *end).then_some(name.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.splitn(3, ' ');
    let start = parse_hex(fields.next()?)?;
    let size = parse_hex(fields.next()?)?;
    let name = fields.next()?.trim();
    (!name.is_empty()).then_some((start, size, name))
}

fn parse_hex(field: &str) -> Option<u64> {
    let digits = field.strip_prefix("0x").unwrap_or(field);
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn names_are_found_by_address_inside_the_object() {
        let map = PerfMap::parse(
            "7f0000001000 100 JS:*hashPassword /srv/app.js:10:3\n\
             7f0000001200 0x40 Builtin:ArrayPrototypePush\n",
        );
        assert_eq!(map.len(), 2);
        assert_eq!(
            map.find(0x7f0000001000),
            Some("JS:*hashPassword /srv/app.js:10:3")
        );
        assert_eq!(
            map.find(0x7f00000010ff),
            Some("JS:*hashPassword /srv/app.js:10:3")
        );
        assert_eq!(map.find(0x7f0000001100), None);
        assert_eq!(map.find(0x7f000000123f), Some("Builtin:ArrayPrototypePush"));
        assert_eq!(map.find(0x7f0000000fff), None);
    }

    #[test]
    fn later_entry_at_same_address_wins() {
        let map = PerfMap::parse("1000 10 JS:~old\n1000 10 JS:*new\n");
        assert_eq!(map.find(0x1004), Some("JS:*new"));
    }

    #[test]
    fn new_code_cuts_back_the_stale_entries_it_overlaps() {
        let map = PerfMap::parse(
            "1000 100 JS:~stale /a.js:1:1\n\
             1040 20 JS:*fresh /b.js:2:2\n\
             10f0 20 JS:*spans /c.js:3:3\n",
        );
        assert_eq!(map.find(0x1010), Some("JS:~stale /a.js:1:1"));
        assert_eq!(map.find(0x1045), Some("JS:*fresh /b.js:2:2"));
        // Between the new entries the stale one still holds, as nothing
        // newer claimed that memory.
        assert_eq!(map.find(0x1070), Some("JS:~stale /a.js:1:1"));
        assert_eq!(map.find(0x10f5), Some("JS:*spans /c.js:3:3"));
        assert_eq!(map.find(0x1105), Some("JS:*spans /c.js:3:3"));
        assert_eq!(map.find(0x1110), None);
    }

    #[test]
    fn malformed_and_truncated_lines_are_skipped() {
        let map = PerfMap::parse("zzz 10 bad\n1000 10\n\n2000 20 ok\n3000 1");
        assert_eq!(map.len(), 1);
        assert_eq!(map.find(0x2000), Some("ok"));
    }

    #[test]
    fn names_with_spaces_are_kept_whole() {
        let map = PerfMap::parse("1000 10 JS:*get users /srv/a b.js:1:1\n");
        assert_eq!(map.find(0x1000), Some("JS:*get users /srv/a b.js:1:1"));
    }

    #[test]
    fn symlinked_map_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.map");
        fs::write(&real, "1000 10 x\n").unwrap();
        let link = dir.path().join("perf-1.map");
        symlink(&real, &link).unwrap();
        let uid = fs::metadata(&real).unwrap().uid();
        let err = PerfMapFile::open_trusted(&link, uid).unwrap_err();
        assert!(matches!(err, PerfMapError::Symlink(_)), "{err}");
    }

    #[test]
    fn map_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        fs::write(&path, "1000 10 x\n").unwrap();
        let owner = fs::metadata(&path).unwrap().uid();
        if owner == 0 {
            // Root's files are trusted for every target; make it someone
            // else's to see the refusal.
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        }
        let err = PerfMapFile::open_trusted(&path, 12345).unwrap_err();
        assert!(matches!(err, PerfMapError::WrongOwner { .. }), "{err}");
    }

    #[test]
    fn missing_map_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        assert!(PerfMapFile::open_trusted(&path, 0).unwrap().is_none());
    }

    #[test]
    fn open_map_is_read_again_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        fs::write(&path, "1000 10 first\n").unwrap();
        let uid = fs::metadata(&path).unwrap().uid();
        let mut file = PerfMapFile::open_trusted(&path, uid).unwrap().unwrap();
        assert_eq!(file.read().unwrap().len(), 1);
        fs::write(&path, "1000 10 first\n2000 10 second\n").unwrap();
        assert_eq!(file.read().unwrap().find(0x2000), Some("second"));
    }
}
