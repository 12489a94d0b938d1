//! Turns sampled addresses into frames: ELF symbols (demangled, with
//! inlined functions and source lines where DWARF has them) for native
//! code, kallsyms for the kernel, and the perf map for JIT code.

use std::collections::HashMap;

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Symbolized, Symbolizer as Blaze,
        source::{Elf, Kernel, Source},
    },
};
use log::{debug, warn};

use std::collections::BTreeMap;

use profiler_common::{NO_STACK, SampleKey};

use crate::{
    mappings::AddressSpace,
    perf_map::PerfMap,
    profile::{Frame, FrameKind, Profile},
};

/// Symbolizes addresses of one profile; caches parsed files between calls.
pub struct Symbolizer {
    blaze: Blaze,
    kernel_warned: std::cell::Cell<bool>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let blaze = Blaze::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Self {
            blaze,
            kernel_warned: std::cell::Cell::new(false),
        }
    }

    /// Frames for kernel addresses, one list per address, outermost first.
    pub fn kernel(&self, addrs: &[u64]) -> HashMap<u64, Vec<Frame>> {
        let src = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Default::default()
        });
        let results = match self.blaze.symbolize(&src, Input::AbsAddr(addrs)) {
            Ok(results) => results,
            Err(err) => {
                if !self.kernel_warned.replace(true) {
                    warn!("cannot symbolize kernel frames: {err}; ignoring");
                }
                Vec::new()
            }
        };
        addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => vec![Frame::new(&sym.name, FrameKind::Kernel)],
                    _ => vec![Frame::new("[unknown]", FrameKind::Kernel)],
                };
                (addr, frames)
            })
            .collect()
    }

    /// Frames for user addresses of one process, one list per address,
    /// outermost first (a function before the functions inlined into it).
    pub fn user(
        &self,
        space: &AddressSpace,
        perf_map: Option<&PerfMap>,
        addrs: &[u64],
    ) -> HashMap<u64, Vec<Frame>> {
        let mut out = HashMap::with_capacity(addrs.len());
        // Addresses grouped by the mapping that holds them.
        let mut by_mapping: HashMap<usize, Vec<u64>> = HashMap::new();

        for &addr in addrs {
            let mapping = space.find_index(addr);
            match mapping {
                Some(index)
                    if space.mappings()[index].is_file() || space.mappings()[index].is_vdso() =>
                {
                    by_mapping.entry(index).or_default().push(addr);
                }
                _ => {
                    let frame = match perf_map.and_then(|map| map.find(addr)) {
                        Some(name) => Frame::jit(name),
                        None => match mapping {
                            Some(index) => unknown_in(space.mappings()[index].path.as_str()),
                            None => Frame::new("[unknown]", FrameKind::Unknown),
                        },
                    };
                    out.insert(addr, vec![frame]);
                }
            }
        }

        for (index, addrs) in by_mapping {
            let mapping = &space.mappings()[index];
            let offsets: Vec<u64> = addrs
                .iter()
                .map(|addr| addr - mapping.start + mapping.file_offset)
                .collect();
            let path = if mapping.is_vdso() {
                vdso_image()
            } else {
                mapping.readable_path(space.pid())
            };
            let results = path.and_then(|path| {
                let mut elf = Elf::new(path);
                elf.debug_syms = true;
                self.blaze
                    .symbolize(&Source::Elf(elf), Input::FileOffset(&offsets))
                    .map_err(|err| debug!("cannot symbolize in {}: {err}", mapping.path))
                    .ok()
            });
            for (i, addr) in addrs.into_iter().enumerate() {
                let frames = match results.as_ref().and_then(|r| r.get(i)) {
                    Some(Symbolized::Sym(sym)) => {
                        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                        let mut outer = Frame::new(&sym.name, FrameKind::Native);
                        if let Some(info) = &sym.code_info {
                            outer.set_location(&info.file.to_string_lossy(), info.line);
                        }
                        outer.module = Some(mapping.file_name().to_owned());
                        frames.push(outer);
                        for inlined in &sym.inlined {
                            let mut frame = Frame::new(&inlined.name, FrameKind::Native);
                            if let Some(info) = &inlined.code_info {
                                frame.set_location(&info.file.to_string_lossy(), info.line);
                            }
                            frame.inlined = true;
                            frame.module = Some(mapping.file_name().to_owned());
                            frames.push(frame);
                        }
                        frames
                    }
                    _ => match perf_map.and_then(|map| map.find(addr)) {
                        Some(name) => vec![Frame::jit(name)],
                        None => vec![unknown_in(mapping.file_name())],
                    },
                };
                out.insert(addr, frames);
            }
        }
        out
    }
}

/// A copy of the kernel's vDSO as a file, for `[vdso]` frames (the clock
/// reads behind `Date.now()` and `process.hrtime()`, for instance).
///
/// The vDSO is not a file on disk; it is the same image in every 64-bit
/// process of a kernel, so this process's own copy is read from its memory
/// into an anonymous memory file once, and kept for the life of the process.
fn vdso_image() -> Option<std::path::PathBuf> {
    static IMAGE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| match copy_own_vdso() {
            Ok(path) => Some(path),
            Err(err) => {
                debug!("cannot copy the vDSO: {err}; [vdso] frames stay unnamed");
                None
            }
        })
        .clone()
}

fn copy_own_vdso() -> std::io::Result<std::path::PathBuf> {
    use std::{
        fs::File,
        io::{Error, ErrorKind, Read as _, Seek as _, SeekFrom, Write as _},
        os::fd::{FromRawFd as _, IntoRawFd as _},
    };

    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let (start, end) = maps
        .lines()
        .find(|line| line.ends_with("[vdso]"))
        .and_then(|line| line.split_whitespace().next()?.split_once('-'))
        .and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .ok_or_else(|| Error::new(ErrorKind::NotFound, "no [vdso] mapping"))?;
    let mut image = vec![0u8; (end - start) as usize];
    let mut mem = File::open("/proc/self/mem")?;
    mem.seek(SeekFrom::Start(start))?;
    mem.read_exact(&mut image)?;

    // SAFETY: memfd_create takes a NUL-terminated name and flags; the fd
    // it returns is owned by the `File` made from it just below.
    let fd = unsafe { libc::memfd_create(c"vdso".as_ptr(), 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(&image)?;
    // Kept open for good: blazesym reads it through its /proc path.
    let fd = file.into_raw_fd();
    Ok(std::path::PathBuf::from(format!("/proc/self/fd/{fd}")))
}

/// Names the code V8 compiles regular expressions to.
///
/// That code is only entered from V8's `Builtins_RegExp…` builtins, and a
/// perf map written with `--perf-basic-prof-only-functions` does not list
/// it, so its addresses are unnamed or, worse, fall under the stale name of
/// a function that used the same memory before. A JIT or unnamed frame
/// called by a RegExp builtin is therefore the compiled pattern.
fn name_regexp_code(stack: &mut [Frame]) {
    for i in 1..stack.len() {
        let called_by_regexp = stack[i - 1].kind == FrameKind::Native
            && stack[i - 1].name.starts_with("Builtins_RegExp");
        let opaque = matches!(stack[i].kind, FrameKind::Jit | FrameKind::Unknown)
            && !stack[i].name.starts_with("RegExp:");
        if called_by_regexp && opaque {
            stack[i] = Frame::new("[compiled regexp]", FrameKind::Jit);
        }
    }
}

/// A frame in a known mapping that has no symbol for the address.
fn unknown_in(module: &str) -> Frame {
    let name = module.trim_end_matches(" (deleted)");
    let name = name.rsplit('/').next().unwrap_or(name);
    if name.is_empty() {
        Frame::new("[anon]", FrameKind::Unknown)
    } else if name.starts_with('[') {
        Frame::new(name, FrameKind::Unknown)
    } else {
        Frame::new(&format!("[{name}]"), FrameKind::Unknown)
    }
}

/// Where the frames of one process come from.
pub struct ProcessSymbols<'a> {
    pub space: &'a AddressSpace,
    pub perf_map: Option<&'a PerfMap>,
}

/// The stacks of a profile as frames, root first, by stack id.
#[derive(Debug, Default)]
pub struct ResolvedStacks {
    stacks: HashMap<u64, Vec<Frame>>,
}

impl ResolvedStacks {
    /// Symbolizes every stack the counts refer to.
    ///
    /// Every address but the leaf of a stack is a return address: it points
    /// after the call, possibly into the next line or function, so the
    /// address one byte before it is looked up instead.
    pub fn resolve(
        symbolizer: &Symbolizer,
        raw: &crate::sampler::RawProfile,
        process: &ProcessSymbols<'_>,
    ) -> Self {
        let lookup_addrs = |frames: &[u64]| -> Vec<u64> {
            frames
                .iter()
                .enumerate()
                .map(|(i, &ip)| if i == 0 { ip } else { ip.saturating_sub(1) })
                .collect()
        };
        let mut kernel_ids = std::collections::BTreeSet::new();
        let mut user_addrs = std::collections::BTreeSet::new();
        let mut kernel_addrs = std::collections::BTreeSet::new();
        for (key, _) in &raw.counts {
            if let Some(frames) = raw.stacks.get(&key.user_stack_id) {
                user_addrs.extend(lookup_addrs(frames));
            }
            if let Some(frames) = raw.stacks.get(&key.kernel_stack_id) {
                kernel_ids.insert(key.kernel_stack_id);
                kernel_addrs.extend(lookup_addrs(frames));
            }
        }
        let user_addrs: Vec<u64> = user_addrs.into_iter().collect();
        let kernel_addrs: Vec<u64> = kernel_addrs.into_iter().collect();
        let user = symbolizer.user(process.space, process.perf_map, &user_addrs);
        let kernel = symbolizer.kernel(&kernel_addrs);

        let stacks = raw
            .stacks
            .iter()
            .map(|(&id, frames)| {
                let by_addr = if kernel_ids.contains(&id) {
                    &kernel
                } else {
                    &user
                };
                // Leaf first in the map; root first here.
                let mut resolved: Vec<Frame> = lookup_addrs(frames)
                    .into_iter()
                    .rev()
                    .flat_map(|addr| by_addr.get(&addr).into_iter().flatten().cloned())
                    .collect();
                name_regexp_code(&mut resolved);
                (id, resolved)
            })
            .collect();
        Self { stacks }
    }

    /// How many samples have a user stack, and how many of those reach the
    /// thread's entry point: `__libc_start_call_main` (or `_start`) for a
    /// main thread, `start_thread` or `clone3` for the others. A stack that
    /// stops short was cut by code the walk could not cross.
    pub fn user_completeness(&self, counts: &[(SampleKey, u64)]) -> (u64, u64) {
        const ENTRIES: [&str; 9] = [
            "_start",
            "__libc_start_main",
            "__libc_start_main_impl",
            "__libc_start_call_main",
            "start_thread",
            "clone",
            "clone3",
            "__clone",
            "__clone3",
        ];
        let (mut with_user, mut complete) = (0, 0);
        for (key, count) in counts {
            if key.user_stack_id == NO_STACK {
                continue;
            }
            with_user += count;
            let root = self
                .stacks
                .get(&key.user_stack_id)
                .and_then(|frames| frames.first());
            if root.is_some_and(|frame| ENTRIES.contains(&frame.name.as_str())) {
                complete += count;
            }
        }
        (with_user, complete)
    }

    /// Builds a profile from counts whose stacks were resolved here.
    pub fn profile(
        &self,
        counts: &[(SampleKey, u64)],
        threads: &BTreeMap<u32, (u32, String)>,
        thread_names: &BTreeMap<u32, String>,
    ) -> Profile {
        let mut profile = Profile::default();
        let lost = Frame::new("[stack lost]", FrameKind::Unknown);
        for (key, count) in counts {
            let mut stack = Vec::new();
            for id in [key.user_stack_id, key.kernel_stack_id] {
                match self.stacks.get(&id) {
                    _ if id == NO_STACK => {}
                    Some(frames) => {
                        for frame in frames {
                            stack.push(profile.intern(frame.clone()));
                        }
                    }
                    None => stack.push(profile.intern(lost.clone())),
                }
            }
            let thread = threads
                .get(&key.tid)
                .map(|(_, name)| name.as_str())
                .or_else(|| thread_names.get(&key.tid).map(String::as_str))
                .unwrap_or("");
            profile.add(key.tid, thread, stack, *count);
        }
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn a_function_with_a_distinct_name() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn own_function_is_named() {
        let pid = std::process::id();
        let mut space = AddressSpace::new(pid);
        space.refresh().unwrap();
        let addr = a_function_with_a_distinct_name as *const () as u64;
        assert_eq!(a_function_with_a_distinct_name(), 7);

        let frames = Symbolizer::new().user(&space, None, &[addr]);
        let names: Vec<&str> = frames[&addr].iter().map(|f| f.name.as_str()).collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("a_function_with_a_distinct_name")),
            "{names:?}"
        );
    }

    #[test]
    fn anonymous_address_uses_the_perf_map() {
        let space = AddressSpace::new(std::process::id());
        let map = PerfMap::parse("1000 100 JS:*render /srv/view.js:3:9\n");
        let frames = Symbolizer::new().user(&space, Some(&map), &[0x1010, 0x9000]);
        assert_eq!(frames[&0x1010][0].kind, FrameKind::Jit);
        assert_eq!(frames[&0x1010][0].name, "render /srv/view.js:3:9");
        assert_eq!(frames[&0x9000][0].name, "[unknown]");
    }

    #[test]
    fn code_called_by_a_regexp_builtin_is_the_compiled_pattern() {
        let mut stack = vec![
            Frame::jit("JS:*searchEvents /a.js:1:1"),
            Frame::new("Builtins_RegExpPrototypeTestFast", FrameKind::Native),
            Frame::jit("JS:~ stale /old.js:1:1"),
        ];
        name_regexp_code(&mut stack);
        assert_eq!(stack[2].name, "[compiled regexp]");
        assert_eq!(stack[0].name, "searchEvents /a.js:1:1");

        let mut unnamed = vec![
            Frame::new("Builtins_RegExpExec", FrameKind::Native),
            Frame::new("[anon]", FrameKind::Unknown),
        ];
        name_regexp_code(&mut unnamed);
        assert_eq!(unnamed[1].name, "[compiled regexp]");
    }

    #[test]
    fn vdso_clock_read_is_named() {
        let mut space = AddressSpace::new(std::process::id());
        space.refresh().unwrap();
        let Some(vdso) = space.mappings().iter().find(|m| m.is_vdso()) else {
            eprintln!("skipping: this process maps no vDSO");
            return;
        };
        // Somewhere in the vDSO's text: any address inside names a symbol
        // or stays unknown, but never the whole mapping's name.
        let names: Vec<String> = (vdso.start..vdso.end)
            .step_by(64)
            .flat_map(|addr| Symbolizer::new().user(&space, None, &[addr]).remove(&addr))
            .flatten()
            .map(|frame| frame.name)
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.contains("clock_gettime") || n.contains("gettimeofday")),
            "{names:?}"
        );
    }

    #[test]
    fn unknown_frames_name_their_module() {
        assert_eq!(unknown_in("/usr/lib/libfoo.so.1").name, "[libfoo.so.1]");
        assert_eq!(unknown_in("[vdso]").name, "[vdso]");
        assert_eq!(unknown_in("").name, "[anon]");
    }
}
