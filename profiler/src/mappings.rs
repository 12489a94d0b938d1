//! Snapshots of a process's executable mappings, taken while it is sampled.
//!
//! The mappings are read again on every refresh, so libraries loaded after
//! attach are seen, and each mapped file is held open, so the profile can
//! still be symbolized after the process exits or the file is deleted or
//! replaced on disk. Files are opened through `/proc/PID/map_files`, which
//! also reaches binaries in another mount namespace.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    sync::Arc,
};

use log::debug;

use crate::procfs::proc_path;

/// One executable mapping of a process.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of the byte mapped at `start`.
    pub file_offset: u64,
    /// Path as `/proc/PID/maps` shows it: a file, or `[vdso]`, `[anon:…]`, empty.
    pub path: String,
    pub inode: u64,
    /// The mapped file, held open; `None` for anonymous memory.
    pub file: Option<Arc<File>>,
}

impl Mapping {
    /// Whether the mapping is backed by a file on disk.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// Whether this is the kernel's vDSO.
    pub fn is_vdso(&self) -> bool {
        self.path == "[vdso]"
    }

    /// Whether both map the same bytes of the same file at the same place.
    fn same_range(&self, other: &Mapping) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.file_offset == other.file_offset
            && self.inode == other.inode
    }

    /// The last component of the path, for frames with no symbol.
    pub fn file_name(&self) -> &str {
        let path = self.path.trim_end_matches(" (deleted)");
        path.rsplit('/').next().unwrap_or(path)
    }

    /// A path through which the mapped file can be read now.
    ///
    /// The path the process sees is preferred, through its root, so that
    /// debug links next to it resolve; the held descriptor is used when that
    /// path no longer names the same file.
    pub fn readable_path(&self, pid: u32) -> Option<PathBuf> {
        let file = self.file.as_ref()?;
        let held = file.metadata().ok()?;
        let original = proc_path(pid, "root").join(self.path.trim_start_matches('/'));
        if let Ok(meta) = fs::metadata(&original)
            && meta.ino() == held.ino()
            && meta.dev() == held.dev()
        {
            return Some(original);
        }
        Some(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
    }
}

/// Parses one line of `/proc/PID/maps`; `None` for lines that are not
/// executable mappings.
pub fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();

    if perms.as_bytes().get(2) != Some(&b'x') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        path: path.to_owned(),
        inode: inode.parse().ok()?,
        file: None,
    })
}

/// Every executable mapping seen in a process since sampling started.
#[derive(Debug)]
pub struct AddressSpace {
    pid: u32,
    /// Newest last; a lookup prefers the newest mapping holding an address,
    /// since an older one at the same place has been unmapped.
    mappings: Vec<Mapping>,
    /// Open files by inode and path, shared between mappings of one file.
    files: HashMap<(u64, String), Arc<File>>,
}

impl AddressSpace {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            mappings: Vec::new(),
            files: HashMap::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads the mappings again and records any that are new; says whether
    /// there were any.
    pub fn refresh(&mut self) -> io::Result<bool> {
        let known_before = self.mappings.len();
        let maps = fs::read_to_string(proc_path(self.pid, "maps"))?;
        for mut mapping in maps.lines().filter_map(parse_maps_line) {
            let known = self.mappings.iter().any(|m| m.same_range(&mapping));
            if known {
                continue;
            }
            if mapping.is_file() {
                mapping.file = self.open_file(&mapping);
            }
            debug!(
                "pid {}: mapping {:#x}-{:#x} {}",
                self.pid, mapping.start, mapping.end, mapping.path
            );
            self.mappings.push(mapping);
        }
        Ok(self.mappings.len() > known_before)
    }

    /// Forgets mappings the process no longer has, and the files only they
    /// held open, so that a long-running process's list stays the size of
    /// its address space. Returns how many were forgotten.
    pub fn forget_unmapped(&mut self) -> io::Result<usize> {
        let maps = fs::read_to_string(proc_path(self.pid, "maps"))?;
        let current: Vec<Mapping> = maps.lines().filter_map(parse_maps_line).collect();
        let before = self.mappings.len();
        self.mappings
            .retain(|m| current.iter().any(|c| c.same_range(m)));
        self.files.retain(|_, file| Arc::strong_count(file) > 1);
        Ok(before - self.mappings.len())
    }

    fn open_file(&mut self, mapping: &Mapping) -> Option<Arc<File>> {
        let key = (mapping.inode, mapping.path.clone());
        if let Some(file) = self.files.get(&key) {
            return Some(file.clone());
        }
        let by_range = proc_path(
            self.pid,
            &format!("map_files/{:x}-{:x}", mapping.start, mapping.end),
        );
        let by_root = proc_path(self.pid, "root").join(mapping.path.trim_start_matches('/'));
        let file = File::open(&by_range)
            .or_else(|_| File::open(&by_root))
            .map_err(|err| debug!("cannot open {}: {err}", mapping.path))
            .ok()?;
        let file = Arc::new(file);
        self.files.insert(key, file.clone());
        Some(file)
    }

    /// Index in [`Self::mappings`] of the newest mapping that holds `addr`.
    pub fn find_index(&self, addr: u64) -> Option<usize> {
        self.mappings
            .iter()
            .rposition(|m| m.start <= addr && addr < m.end)
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_file_mapping_is_parsed() {
        let line = "7f1c2a600000-7f1c2a795000 r-xp 00028000 fd:01 1312 \
                    /usr/lib/x86_64-linux-gnu/libc.so.6";
        let m = parse_maps_line(line).unwrap();
        assert_eq!(m.start, 0x7f1c2a600000);
        assert_eq!(m.end, 0x7f1c2a795000);
        assert_eq!(m.file_offset, 0x28000);
        assert_eq!(m.inode, 1312);
        assert!(m.is_file());
        assert_eq!(m.file_name(), "libc.so.6");
    }

    #[test]
    fn non_executable_mapping_is_skipped() {
        let line = "55d0c3a00000-55d0c3a21000 rw-p 00000000 00:00 0 [heap]";
        assert!(parse_maps_line(line).is_none());
    }

    #[test]
    fn anonymous_jit_mapping_is_kept_but_not_a_file() {
        let line = "3a1f0c040000-3a1f0c07f000 r-xp 00000000 00:00 0 ";
        let m = parse_maps_line(line).unwrap();
        assert!(!m.is_file());
        assert_eq!(m.path, "");
    }

    #[test]
    fn deleted_file_keeps_its_name() {
        let line = "400000-401000 r-xp 00001000 08:01 77 /tmp/app (deleted)";
        let m = parse_maps_line(line).unwrap();
        assert_eq!(m.file_name(), "app");
    }

    #[test]
    fn own_address_space_maps_this_function() {
        let mut space = AddressSpace::new(std::process::id());
        space.refresh().unwrap();
        let addr = own_address_space_maps_this_function as *const () as u64;
        let index = space.find_index(addr).expect("code of this test is mapped");
        let mapping = &space.mappings()[index];
        assert!(mapping.is_file());
        assert!(mapping.readable_path(space.pid()).is_some());
    }
}
