//! The daemon's profiles on disk: `DIR/<service>/<UTC start>-<pid>.folded`
//! and `.pb.gz` per process and interval, an `index.json` listing them, and
//! retention by age and total size, oldest first.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::output;

pub const INDEX: &str = "index.json";

/// One interval of one process, as listed in the index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Folder of the process's profiles: its systemd service, or else its
    /// name. Restarts and worker processes of one service share it.
    pub service: String,
    pub name: String,
    pub pid: u32,
    pub cgroup: Option<String>,
    pub start: String,
    pub start_unix_s: f64,
    pub duration_s: f64,
    pub frequency_hz: u64,
    pub samples: u64,
    /// Event-loop iterations over the blocking threshold.
    pub episodes: u64,
    /// Paths relative to the profile folder.
    pub folded: String,
    pub pprof: String,
}

/// The profile folder and its index.
pub struct Store {
    dir: PathBuf,
    entries: Vec<Entry>,
}

/// What one interval of one process writes.
pub struct Interval<'a> {
    pub entry: Entry,
    pub folded: &'a [(String, u64)],
    pub pprof_gz: &'a [u8],
}

impl Store {
    /// Opens the folder, creating it if needed, and reads the index left by
    /// an earlier run. An unreadable index is set aside, not overwritten.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        output::prepare_dir(dir)?;
        let index = dir.join(INDEX);
        let entries = match fs::read(&index) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Entry>>(&bytes) {
                Ok(entries) => entries,
                Err(err) => {
                    let aside = dir.join(format!("{INDEX}.unreadable-{}", unix_now_s() as u64));
                    warn!(
                        "{} is unreadable ({err}); moved to {} and starting a new index",
                        index.display(),
                        aside.display()
                    );
                    fs::rename(&index, &aside)?;
                    Vec::new()
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                return Err(
                    anyhow::Error::new(err).context(format!("cannot read {}", index.display()))
                );
            }
        };
        let mut store = Self {
            dir: dir.to_owned(),
            entries,
        };
        store.entries.retain(|e| store.dir.join(&e.folded).exists());
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one interval's files and adds them to the index. Either both
    /// files are written and listed, or neither is.
    pub fn write(&mut self, interval: Interval<'_>) -> anyhow::Result<()> {
        let mut entry = interval.entry;
        let service_dir = self.dir.join(&entry.service);
        fs::create_dir_all(&service_dir)?;
        let stem = unique_stem(
            &service_dir,
            &format!("{}-{}", compact_utc(entry.start_unix_s), entry.pid),
        );
        let folded_name = format!("{stem}.folded");
        let pprof_name = format!("{stem}.pb.gz");
        let folded = output::write_atomic(&service_dir, &folded_name, |w| {
            Ok(output::folded::write(interval.folded, w)?)
        })?;
        if let Err(err) = output::write_atomic(&service_dir, &pprof_name, |w| {
            w.write_all(interval.pprof_gz)?;
            Ok(())
        }) {
            let _ = fs::remove_file(&folded);
            return Err(err);
        }
        entry.folded = format!("{}/{folded_name}", entry.service);
        entry.pprof = format!("{}/{pprof_name}", entry.service);
        self.entries.push(entry);
        if let Err(err) = self.save_index() {
            self.entries.pop();
            let _ = fs::remove_file(service_dir.join(&folded_name));
            let _ = fs::remove_file(service_dir.join(&pprof_name));
            return Err(err);
        }
        Ok(())
    }

    fn save_index(&self) -> anyhow::Result<()> {
        output::write_json(&self.dir, INDEX, &self.entries)?;
        Ok(())
    }

    /// Removes profiles older than `max_age`, then the oldest ones while all
    /// take more than `max_bytes`. Every profile file in a service folder
    /// counts, listed or not. Returns how many profiles were removed.
    pub fn enforce_retention(&mut self, max_age: Duration, max_bytes: u64) -> usize {
        let mut files = self.profile_files();
        // Oldest first: names start with the UTC start time.
        files.sort_by(|a, b| a.stem.cmp(&b.stem).then(a.path.cmp(&b.path)));
        let now = SystemTime::now();
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        let mut removed = Vec::new();
        for file in &files {
            let too_old = file
                .modified
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > max_age);
            if !too_old && total <= max_bytes {
                continue;
            }
            match fs::remove_file(&file.path) {
                Ok(()) => {
                    total -= file.bytes;
                    removed.push(file.path.clone());
                }
                Err(err) => warn!("cannot remove {}: {err}", file.path.display()),
            }
        }
        if removed.is_empty() {
            return 0;
        }

        let dir = self.dir.clone();
        let before = self.entries.len();
        self.entries
            .retain(|e| dir.join(&e.folded).exists() && dir.join(&e.pprof).exists());
        let dropped = before - self.entries.len();
        if let Err(err) = self.save_index() {
            warn!("cannot update the index after retention: {err:#}");
        }
        for folder in removed.iter().filter_map(|p| p.parent()) {
            // Only succeeds on a folder left empty.
            let _ = fs::remove_dir(folder);
        }
        debug!(
            "retention removed {} files ({dropped} listed intervals)",
            removed.len()
        );
        dropped
    }

    fn profile_files(&self) -> Vec<ProfileFile> {
        let mut files = Vec::new();
        let Ok(services) = fs::read_dir(&self.dir) else {
            return files;
        };
        for service in services.filter_map(Result::ok) {
            if !service.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(entries) = fs::read_dir(service.path()) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(stem) = name
                    .strip_suffix(".folded")
                    .or_else(|| name.strip_suffix(".pb.gz"))
                else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                files.push(ProfileFile {
                    stem: stem.to_owned(),
                    path: entry.path(),
                    bytes: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
        files
    }

    #[cfg(test)]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

struct ProfileFile {
    stem: String,
    path: PathBuf,
    bytes: u64,
    modified: Option<SystemTime>,
}

/// A file stem not used yet in `dir`: `stem`, then `stem.1`, `stem.2`… when
/// an interval of the same process and second exists (a reload cuts one
/// short).
fn unique_stem(dir: &Path, stem: &str) -> String {
    let taken = |stem: &str| dir.join(format!("{stem}.folded")).exists();
    if !taken(stem) {
        return stem.to_owned();
    }
    (1..)
        .map(|n| format!("{stem}.{n}"))
        .find(|stem| !taken(stem))
        .unwrap_or_else(|| stem.to_owned())
}

/// `20261203T184500Z`: sortable, and valid in a file name.
pub fn compact_utc(unix_s: f64) -> String {
    crate::event_loop::rfc3339(unix_s.floor())
        .chars()
        .take(19)
        .filter(|c| *c != '-' && *c != ':')
        .collect::<String>()
        + "Z"
}

/// The service a process belongs to, as a safe folder name: the systemd
/// unit of its cgroup (`/system.slice/api.service` gives `api`), or else
/// the process name.
pub fn service_name(name: &str, cgroup: Option<&str>) -> String {
    let unit = cgroup
        .into_iter()
        .flat_map(|path| path.rsplit('/'))
        .find_map(|part| part.strip_suffix(".service"))
        .filter(|unit| !unit.is_empty());
    let clean: String = unit
        .unwrap_or(name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() {
        "process".to_owned()
    } else {
        clean.to_owned()
    }
}

pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

use std::io::Write as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(service: &str, start_unix_s: f64) -> Entry {
        Entry {
            service: service.to_owned(),
            name: "node".to_owned(),
            pid: 1,
            cgroup: None,
            start: String::new(),
            start_unix_s,
            duration_s: 60.0,
            frequency_hz: 19,
            samples: 3,
            episodes: 0,
            folded: String::new(),
            pprof: String::new(),
        }
    }

    fn write(store: &mut Store, service: &str, start: f64, bytes: usize) {
        let folded = vec![("main;work".to_owned(), 3)];
        store
            .write(Interval {
                entry: entry(service, start),
                folded: &folded,
                pprof_gz: &vec![0u8; bytes],
            })
            .unwrap();
    }

    #[test]
    fn intervals_are_listed_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        write(&mut store, "api", 1_764_787_500.0, 10);
        write(&mut store, "api", 1_764_787_500.4, 10);

        let again = Store::open(dir.path()).unwrap();
        let files: Vec<&str> = again.entries().iter().map(|e| e.folded.as_str()).collect();
        assert_eq!(
            files,
            [
                "api/20251203T184500Z-1.folded",
                "api/20251203T184500Z-1.1.folded"
            ]
        );
        let text = fs::read_to_string(dir.path().join(files[0])).unwrap();
        assert_eq!(text, "main;work 3\n");
    }

    #[test]
    fn size_limit_removes_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        write(&mut store, "b", 2000.0, 1000);
        write(&mut store, "a", 1000.0, 1000);
        write(&mut store, "a", 3000.0, 1000);

        let removed = store.enforce_retention(Duration::from_secs(3600), 2100);

        assert_eq!(removed, 1);
        let left: Vec<f64> = store.entries().iter().map(|e| e.start_unix_s).collect();
        assert_eq!(left, [2000.0, 3000.0]);
        assert!(!dir.path().join("a/19700101T001640Z-1.folded").exists());
    }

    #[test]
    fn age_limit_removes_stale_folders() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        write(&mut store, "gone", 1000.0, 10);
        std::thread::sleep(Duration::from_millis(20));

        store.enforce_retention(Duration::from_millis(1), u64::MAX);

        assert!(store.entries().is_empty());
        assert!(!dir.path().join("gone").exists());
    }

    #[test]
    fn unreadable_index_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INDEX), "{not json").unwrap();

        let store = Store::open(dir.path()).unwrap();

        assert!(store.entries().is_empty());
        let aside = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("index.json.unreadable-")
            });
        assert!(aside);
    }

    #[test]
    fn service_names_are_safe_folder_names() {
        assert_eq!(service_name("node", None), "node");
        assert_eq!(service_name("kworker/0:1", Some("/")), "kworker_0_1");
        assert_eq!(service_name("..", None), "process");
    }

    #[test]
    fn service_is_the_systemd_unit_when_there_is_one() {
        assert_eq!(
            service_name("node", Some("/system.slice/api.service")),
            "api"
        );
        // A unit's own sub-cgroups still belong to it.
        assert_eq!(
            service_name("node", Some("/system.slice/api.service/workers")),
            "api"
        );
        assert_eq!(
            service_name("node", Some("/system.slice/worker@2.service")),
            "worker@2"
        );
        assert_eq!(
            service_name("node", Some("/user.slice/user-0.slice/session-3.scope")),
            "node"
        );
    }
}
