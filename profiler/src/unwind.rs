//! Compiles the call-frame information of an ELF file (`.eh_frame`, or
//! `.debug_frame` when there is no `.eh_frame`) into compact x86-64 unwind
//! rows: for each address range, how to find the caller's frame from the
//! current one.
//!
//! A row gives the canonical frame address (CFA) as `rsp` or `rbp` plus an
//! offset, and where the caller's `rbp` was saved, if it was. The return
//! address is always at CFA - 8 on x86-64; code whose CFI says otherwise,
//! or computes its CFA with a DWARF expression (PLT stubs, signal
//! trampolines), gets an `Unknown` row, and a walk falls back to frame
//! pointers there.

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, NativeEndian, Register, RegisterRule,
    UnwindContext, UnwindSection,
};
use object::{Object as _, ObjectSection as _};

/// DWARF register numbers of x86-64.
const RSP: Register = Register(7);
const RBP: Register = Register(6);
const RETURN_ADDRESS: Register = Register(16);

/// How to find the canonical frame address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cfa {
    Rsp(i32),
    Rbp(i32),
    /// Loaded from the stack: `*(rsp + offset) + add`. Hand-written
    /// assembly that realigns the stack saves the caller's `rsp` this way
    /// (OpenSSL's SHA-2 and AES code, for instance).
    RspDeref {
        offset: i32,
        add: i32,
    },
    /// `*(rbp + offset) + add`, the same after `rsp` was copied to `rbp`.
    RbpDeref {
        offset: i32,
        add: i32,
    },
    /// Another general register plus an offset (DWARF register number).
    /// Assembly that realigns its stack keeps the entry `rsp` in, say,
    /// `rax` over its prologue and `rsi` over its epilogue.
    Register {
        register: u8,
        offset: i32,
    },
    /// Not expressible in a row; walk by frame pointer.
    Unknown,
}

/// Where the caller's `rbp` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedRbp {
    /// Still in `rbp`.
    Unchanged,
    /// Saved in memory at CFA plus this offset.
    AtCfa(i32),
}

/// One row: applies from `pc` up to the next row's `pc`. Addresses are
/// virtual addresses of the ELF file, before any load bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub pc: u64,
    pub cfa: Cfa,
    pub rbp: SavedRbp,
}

/// Why a file has no unwind table.
#[derive(Debug)]
pub enum UnwindError {
    Elf(object::Error),
    Dwarf(gimli::Error),
    /// Neither `.eh_frame` nor `.debug_frame`.
    NoCfi,
}

impl std::fmt::Display for UnwindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Elf(err) => write!(f, "not a readable ELF file: {err}"),
            Self::Dwarf(err) => write!(f, "malformed call-frame information: {err}"),
            Self::NoCfi => write!(f, "no .eh_frame or .debug_frame"),
        }
    }
}

impl std::error::Error for UnwindError {}

/// A loadable segment of an ELF file: where its bytes are in the file and
/// at which virtual address they are meant to be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
}

/// The loadable segments of an ELF image.
pub fn segments(data: &[u8]) -> Result<Vec<Segment>, UnwindError> {
    use object::ObjectSegment as _;
    let file = object::File::parse(data).map_err(UnwindError::Elf)?;
    Ok(file
        .segments()
        .map(|segment| {
            let (file_offset, file_size) = segment.file_range();
            Segment {
                file_offset,
                vaddr: segment.address(),
                file_size,
            }
        })
        .collect())
}

/// The load bias of a mapping: what to subtract from a runtime address in
/// it to get the file's virtual address. `None` if no segment holds the
/// mapping's file offset.
pub fn load_bias(segments: &[Segment], start: u64, file_offset: u64) -> Option<u64> {
    let segment = segments.iter().find(|s| {
        s.file_offset <= file_offset && file_offset < s.file_offset + s.file_size.max(1)
    })?;
    let vaddr_at_start = segment.vaddr + (file_offset - segment.file_offset);
    Some(start.wrapping_sub(vaddr_at_start))
}

/// Unwind rows of one ELF file, sorted by address.
#[derive(Debug, Default)]
pub struct UnwindTable {
    pub rows: Vec<Row>,
}

impl UnwindTable {
    /// Compiles the call-frame information of the ELF image `data`.
    pub fn compile(data: &[u8]) -> Result<Self, UnwindError> {
        let file = object::File::parse(data).map_err(UnwindError::Elf)?;
        let section = |name: &str| {
            file.section_by_name(name)
                .and_then(|s| Some((s.address(), s.data().ok()?)))
        };
        let text = file.section_by_name(".text").map_or(0, |s| s.address());

        let mut rows = Vec::new();
        if let Some((address, bytes)) = section(".eh_frame") {
            let mut eh_frame = EhFrame::new(bytes, NativeEndian);
            eh_frame.set_address_size(8);
            let mut bases = BaseAddresses::default()
                .set_eh_frame(address)
                .set_text(text);
            if let Some((hdr, _)) = section(".eh_frame_hdr") {
                bases = bases.set_eh_frame_hdr(hdr);
            }
            collect_rows(&eh_frame, &bases, &mut rows)?;
        } else if let Some((_, bytes)) = section(".debug_frame") {
            let mut debug_frame = DebugFrame::new(bytes, NativeEndian);
            debug_frame.set_address_size(8);
            let bases = BaseAddresses::default().set_text(text);
            collect_rows(&debug_frame, &bases, &mut rows)?;
        } else {
            return Err(UnwindError::NoCfi);
        }

        rows.sort_by_key(|row| row.pc);
        // A later row at the same address wins: it is an FDE's first row
        // after the end marker of the previous one.
        rows.reverse();
        rows.dedup_by_key(|row| row.pc);
        rows.reverse();
        // Consecutive rows with the same rules are one row.
        rows.dedup_by(|next, prev| next.cfa == prev.cfa && next.rbp == prev.rbp);
        Ok(Self { rows })
    }

    /// The rows in the kernel side's form. Rows whose numbers do not fit
    /// become `UNKNOWN`, walked by frame pointer.
    pub fn kernel_rows(&self) -> Vec<profiler_common::UnwindRow> {
        use profiler_common::{UnwindRow, cfa_kind};
        self.rows
            .iter()
            .filter_map(|row| {
                let pc = u32::try_from(row.pc).ok()?;
                let unknown = UnwindRow {
                    pc,
                    ..UnwindRow::default()
                };
                let (kind, offset, add, register) = match row.cfa {
                    Cfa::Rsp(offset) => (cfa_kind::RSP, offset, 0, 0),
                    Cfa::Rbp(offset) => (cfa_kind::RBP, offset, 0, 0),
                    Cfa::RspDeref { offset, add } => (cfa_kind::RSP_DEREF, offset, add, 0),
                    Cfa::RbpDeref { offset, add } => (cfa_kind::RBP_DEREF, offset, add, 0),
                    Cfa::Register { register, offset } => (cfa_kind::REGISTER, offset, 0, register),
                    Cfa::Unknown => return Some(unknown),
                };
                let (rbp_saved, rbp_offset) = match row.rbp {
                    SavedRbp::Unchanged => (0, 0),
                    SavedRbp::AtCfa(offset) => (1, offset),
                };
                let (Ok(deref_add), Ok(rbp_offset)) =
                    (i16::try_from(add), i16::try_from(rbp_offset))
                else {
                    return Some(unknown);
                };
                Some(UnwindRow {
                    pc,
                    cfa_offset: offset,
                    deref_add,
                    rbp_offset,
                    cfa_kind: kind,
                    rbp_saved,
                    cfa_register: register,
                    _pad: 0,
                })
            })
            .collect()
    }

    /// The row that applies at `pc`, a virtual address of the file.
    pub fn find(&self, pc: u64) -> Option<&Row> {
        let index = self.rows.partition_point(|row| row.pc <= pc);
        self.rows.get(index.checked_sub(1)?)
    }
}

fn collect_rows<R, S>(
    section: &S,
    bases: &BaseAddresses,
    rows: &mut Vec<Row>,
) -> Result<(), UnwindError>
where
    R: gimli::Reader,
    S: UnwindSection<R>,
{
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().map_err(UnwindError::Dwarf)? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // A bad FDE is skipped; the rest of the file still unwinds.
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            continue;
        };
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            continue;
        };
        while let Ok(Some(row)) = table.next_row() {
            rows.push(Row {
                pc: row.start_address(),
                cfa: cfa_of(row, section),
                rbp: match row.register(RBP) {
                    Some(RegisterRule::Offset(offset)) => SavedRbp::AtCfa(offset as i32),
                    _ => SavedRbp::Unchanged,
                },
            });
        }
        // Past the end of the function, nothing is known until the next
        // FDE starts.
        rows.push(Row {
            pc: fde.end_address(),
            cfa: Cfa::Unknown,
            rbp: SavedRbp::Unchanged,
        });
    }
    Ok(())
}

fn cfa_of<R, S, C>(row: &gimli::UnwindTableRow<R::Offset, C>, section: &S) -> Cfa
where
    R: gimli::Reader,
    S: UnwindSection<R>,
    C: gimli::UnwindContextStorage<R::Offset>,
{
    let return_address_at_cfa_minus_8 = matches!(
        row.register(RETURN_ADDRESS),
        None | Some(RegisterRule::Offset(-8))
    );
    match row.cfa() {
        _ if !return_address_at_cfa_minus_8 => Cfa::Unknown,
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = i32::try_from(*offset) else {
                return Cfa::Unknown;
            };
            match *register {
                RSP => Cfa::Rsp(offset),
                RBP => Cfa::Rbp(offset),
                Register(number @ 0..=15) => Cfa::Register {
                    register: number as u8,
                    offset,
                },
                _ => Cfa::Unknown,
            }
        }
        CfaRule::Expression(expression) => expression
            .get(section)
            .ok()
            .and_then(|expression| expression.0.to_slice().ok().map(|b| b.into_owned()))
            .and_then(|bytes| deref_expression(&bytes))
            .unwrap_or(Cfa::Unknown),
    }
}

/// Recognizes `DW_OP_breg7 (rsp) N; DW_OP_deref; DW_OP_plus_uconst M`,
/// and the same with `DW_OP_breg6 (rbp)`.
fn deref_expression(bytes: &[u8]) -> Option<Cfa> {
    const DW_OP_BREG6: u8 = 0x76;
    const DW_OP_BREG7: u8 = 0x77;
    const DW_OP_DEREF: u8 = 0x06;
    const DW_OP_PLUS_UCONST: u8 = 0x23;

    let (&base, rest) = bytes.split_first()?;
    if base != DW_OP_BREG6 && base != DW_OP_BREG7 {
        return None;
    }
    let (offset, rest) = leb128(rest, true)?;
    let (&op, rest) = rest.split_first()?;
    if op != DW_OP_DEREF {
        return None;
    }
    let (add, rest) = match rest.split_first() {
        Some((&DW_OP_PLUS_UCONST, rest)) => leb128(rest, false)?,
        None => (0, rest),
        Some(_) => return None,
    };
    if !rest.is_empty() {
        return None;
    }
    let (offset, add) = (i32::try_from(offset).ok()?, i32::try_from(add).ok()?);
    Some(if base == DW_OP_BREG7 {
        Cfa::RspDeref { offset, add }
    } else {
        Cfa::RbpDeref { offset, add }
    })
}

/// Reads an LEB128 number, signed or not.
fn leb128(bytes: &[u8], signed: bool) -> Option<(i64, &[u8])> {
    let (mut value, mut shift) = (0i64, 0u32);
    for (i, &byte) in bytes.iter().enumerate() {
        if shift >= 64 {
            return None;
        }
        value |= i64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            if signed && shift < 64 && byte & 0x40 != 0 {
                value |= -1i64 << shift;
            }
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use object::ObjectSymbol as _;

    use super::*;

    fn symbol_address(data: &[u8], name: &str) -> u64 {
        let file = object::File::parse(data).unwrap();
        file.symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("no symbol {name}"))
            .address()
    }

    #[test]
    fn own_binary_has_rows_for_this_function() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let table = UnwindTable::compile(&exe).unwrap();
        assert!(table.rows.len() > 1000, "{} rows", table.rows.len());
        assert!(table.rows.windows(2).all(|w| w[0].pc < w[1].pc));
    }

    #[test]
    fn libc_entry_of_a_function_has_cfa_at_rsp_plus_8() {
        // At the first instruction of any function, before it pushes
        // anything, the return address is on top of the stack.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .iter()
        .find(|p| Path::new(p).exists());
        let Some(libc) = libc else {
            eprintln!("skipping: no libc at the usual paths");
            return;
        };
        let data = std::fs::read(libc).unwrap();
        let table = UnwindTable::compile(&data).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let mut checked = 0;
        for symbol in file
            .dynamic_symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text)
        {
            if ["qsort", "fopen", "malloc", "strtol"].contains(&symbol.name().unwrap_or("")) {
                let row = table
                    .find(symbol.address())
                    .expect("a row at a function entry");
                assert_eq!(row.cfa, Cfa::Rsp(8), "{:?}", symbol.name());
                checked += 1;
            }
        }
        assert!(checked >= 3, "checked {checked} functions");
    }

    #[test]
    fn node_openssl_assembly_has_cfi_where_frame_pointers_fail() {
        let Ok(node) = std::fs::canonicalize("/usr/bin/node") else {
            eprintln!("skipping: no node");
            return;
        };
        let data = std::fs::read(&node).unwrap();
        let started = std::time::Instant::now();
        let table = UnwindTable::compile(&data).unwrap();
        eprintln!(
            "{}: {} rows in {:?}",
            node.display(),
            table.rows.len(),
            started.elapsed()
        );
        assert!(table.rows.len() > 100_000);
        // OpenSSL's SHA-512 uses rbp as a data register, so a frame-pointer
        // walk from it fails; its CFI still says where the caller is.
        let entry = symbol_address(&data, "sha512_block_data_order_avx2");
        assert_eq!(table.find(entry).map(|row| row.cfa), Some(Cfa::Rsp(8)));
        let inside = table
            .find(entry + 0x100)
            .expect("a row inside the function");
        assert!(
            matches!(inside.cfa, Cfa::RspDeref { add: 8, .. }),
            "{inside:?}"
        );
        let unknown = table.rows.iter().filter(|r| r.cfa == Cfa::Unknown).count();
        eprintln!("{unknown} rows without a usable rule (gaps between functions, PLT)");
    }

    #[test]
    fn stack_realigning_expression_is_understood() {
        // DW_OP_breg7 152; DW_OP_deref; DW_OP_plus_uconst 8
        let bytes = [0x77, 0x98, 0x01, 0x06, 0x23, 0x08];
        assert_eq!(
            deref_expression(&bytes),
            Some(Cfa::RspDeref {
                offset: 152,
                add: 8
            })
        );
        // DW_OP_breg7 -8; DW_OP_deref; DW_OP_plus_uconst 8
        let bytes = [0x77, 0x78, 0x06, 0x23, 0x08];
        assert_eq!(
            deref_expression(&bytes),
            Some(Cfa::RspDeref { offset: -8, add: 8 })
        );
        // DW_OP_breg6 152; DW_OP_deref; DW_OP_plus_uconst 8
        let bytes = [0x76, 0x98, 0x01, 0x06, 0x23, 0x08];
        assert_eq!(
            deref_expression(&bytes),
            Some(Cfa::RbpDeref {
                offset: 152,
                add: 8
            })
        );
        // A PLT-style expression with more operations is not.
        assert_eq!(deref_expression(&[0x77, 0x08, 0x80, 0x00, 0x22]), None);
        // Nor is one based on another register.
        assert_eq!(deref_expression(&[0x70, 0x08, 0x06]), None);
    }

    #[test]
    fn bias_maps_runtime_addresses_to_file_addresses() {
        let segments = [
            Segment {
                file_offset: 0,
                vaddr: 0,
                file_size: 0x1000,
            },
            Segment {
                file_offset: 0x1000,
                vaddr: 0x401000,
                file_size: 0x5000,
            },
        ];
        // A PIE-like text mapping at 0x7f0000001000 of file offset 0x1000.
        let bias = load_bias(&segments, 0x7f00_0000_1000, 0x1000).unwrap();
        assert_eq!(0x7f00_0000_1234u64.wrapping_sub(bias), 0x401234);
        assert_eq!(load_bias(&segments, 0x1000, 0x9000), None);
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        let err = UnwindTable::compile(b"definitely not ELF").unwrap_err();
        assert!(matches!(err, UnwindError::Elf(_)), "{err}");
    }
}
