//! The boot ABI: load a static ELF guest into guest RAM and produce the initial CPU
//! state a backend applies (shared by the KVM backend and the VT-x hypervisor).
//!
//! * **ELF64** (`EM_X86_64`): every `PT_LOAD` segment is copied to its `p_paddr`
//!   (the rest of `p_memsz` zeroed) and the guest is entered at `e_entry` in 64-bit
//!   mode, CPL 0, with the first 4 GiB identity-mapped by 2 MiB pages, interrupts off
//!   (RFLAGS = 0x2) and no stack promised (RSP = 0).
//! * **ELF32** (`EM_386`): segments are loaded the same way and the guest is entered
//!   at `e_entry` in 32-bit flat protected mode, paging off, EAX = 0x2BADB002 and
//!   EBX = the physical address of a multiboot (v1) information block with the
//!   memory map and the command line.
//! * **PVH kernels** (an ELF with the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note, as every
//!   x86 Linux built with `CONFIG_PVH` has, distribution kernels included): segments
//!   loaded at their `p_paddr`, an optional initrd at the top of RAM, and entry at
//!   the note's physical address by the Xen PVH ABI (see [`pvh`]).
//!
//! The loader's own structures live in guest RAM in the reserved *boot area*
//! [`BOOT_AREA_START`]..[`BOOT_AREA_END`] (below the 1 MiB where the guests link):
//!
//! | address  | what |
//! |----------|------|
//! | `0x1000` | GDT: null, 0x08 64-bit code, 0x10 flat data, 0x18 32-bit code |
//! | `0x2000` | multiboot information block (ELF32), `hvm_start_info` (PVH) |
//! | `0x2100` | multiboot memory map (ELF32), E820 table (PVH) |
//! | `0x2700` | PVH module list (the initrd) |
//! | `0x2800` | command line, NUL-terminated, at most [`MAX_CMDLINE`] bytes |
//! | `0x9000` | PML4 (ELF64 only) |
//! | `0xA000` | PDPT: four entries, one per GiB |
//! | `0xB000`..`0xF000` | four page directories of 512 2 MiB pages |
//!
//! A guest segment that overlaps the boot area, falls outside guest RAM or outside
//! its file is rejected with a [`BootError`] naming it. Everything is bounds-checked:
//! the input is an arbitrary byte string.

use alloc::vec::Vec;
use core::fmt;

use crate::arch::{cr0, cr4, efer, pte, rflags};
use crate::elf::program_header::{PT_DYNAMIC, PT_INTERP, PT_LOAD, PT_NOTE};
use crate::elf::{self, ElfError, ElfFile};
use crate::guest::{CpuState, Segment};

pub mod pvh;

/// First byte of guest RAM the loader reserves for itself.
pub const BOOT_AREA_START: u64 = 0x1000;
/// One past the last reserved byte.
pub const BOOT_AREA_END: u64 = 0x10000;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// GDT limit (4 descriptors).
pub const GDT_LIMIT: u16 = 4 * 8 - 1;
/// Multiboot information block (ELF32 guests).
pub const MULTIBOOT_INFO_ADDR: u64 = 0x2000;
/// Multiboot memory map (ELF32 guests).
pub const MULTIBOOT_MMAP_ADDR: u64 = 0x2100;
/// The command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x2800;
/// Longest command line accepted (without the NUL).
pub const MAX_CMDLINE: usize = 0x7ff;
/// PML4 of the identity map (ELF64 guests).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xA000;
/// First of the four page directories.
pub const PD_ADDR: u64 = 0xB000;
/// The value a multiboot loader leaves in EAX.
pub const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;
/// Top of conventional low memory reported in the memory map.
const LOW_MEM_END: u64 = 0x9_FC00;

/// Selectors of the loader's GDT.
pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;

/// Access rights (VMCS layout) of the loader's segments.
pub const ATTR_CODE64: u32 = 0xA09B;
pub const ATTR_DATA: u32 = 0xC093;
pub const ATTR_CODE32: u32 = 0xC09B;

const GDT: [u64; 4] = [
    0,
    0x00AF_9B00_0000_FFFF, // 64-bit code, DPL 0
    0x00CF_9300_0000_FFFF, // flat 4 GiB data
    0x00CF_9B00_0000_FFFF, // flat 4 GiB 32-bit code
];

/// Where a 64-bit kernel's upper half starts (canonical addresses with bit 63 set).
const HIGH_HALF: u64 = 0xffff_8000_0000_0000;

/// Why a guest image could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The ELF reader refused the file ([`crate::elf`]): the error names the field,
    /// its offset and why.
    Elf(ElfError),
    /// Not `ET_EXEC` (relocatable or position-independent images are not supported).
    NotExecutable {
        e_type: u16,
    },
    /// Machine is not x86-64 (ELF64) or i386 (ELF32).
    WrongMachine {
        machine: u16,
        class_bits: u32,
    },
    /// The image needs a dynamic loader (`PT_INTERP` or `PT_DYNAMIC`).
    NotStatic,
    NoLoadableSegments,
    /// `p_filesz` > `p_memsz`.
    BadSegmentSizes {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    /// The segment does not fit in guest RAM.
    SegmentOutsideRam {
        index: usize,
        paddr: u64,
        memsz: u64,
        ram: u64,
    },
    /// The segment overlaps the loader's reserved boot area.
    SegmentInBootArea {
        index: usize,
        paddr: u64,
        memsz: u64,
    },
    /// The entry point is not inside any loaded segment (by virtual address), or it
    /// is not reachable through the identity map of the first 4 GiB.
    BadEntry {
        entry: u64,
    },
    /// Guest RAM too small for the boot area and the image.
    RamTooSmall {
        ram: u64,
        needed: u64,
    },
    CmdlineTooLong {
        len: usize,
    },
    /// An initrd was given, or the image is linked in the upper half like a
    /// kernel, but it has no PVH entry note.
    NoPvhNote,
}

impl From<ElfError> for BootError {
    fn from(e: ElfError) -> BootError {
        BootError::Elf(e)
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Elf(e) => write!(f, "{e}"),
            BootError::NotExecutable { e_type } => write!(
                f,
                "ELF type {e_type} is not a static executable (ET_EXEC); relocatable and PIE images are not supported"
            ),
            BootError::WrongMachine { machine, class_bits } => write!(
                f,
                "ELF{class_bits} machine {machine} is not {}",
                if *class_bits == 64 { "x86-64 (62)" } else { "i386 (3)" }
            ),
            BootError::NotStatic => write!(f, "the image needs a dynamic loader (PT_INTERP/PT_DYNAMIC); only static images boot"),
            BootError::NoLoadableSegments => write!(f, "the image has no PT_LOAD segment"),
            BootError::BadSegmentSizes { index, filesz, memsz } => write!(
                f,
                "malformed ELF: segment {index} has p_filesz {filesz:#x} > p_memsz {memsz:#x}"
            ),
            BootError::SegmentOutsideRam { index, paddr, memsz, ram } => write!(
                f,
                "segment {index} at {paddr:#x} ({memsz:#x} bytes) does not fit in {ram:#x} bytes of guest RAM"
            ),
            BootError::SegmentInBootArea { index, paddr, memsz } => write!(
                f,
                "segment {index} at {paddr:#x} ({memsz:#x} bytes) overlaps the loader's boot area {BOOT_AREA_START:#x}..{BOOT_AREA_END:#x}"
            ),
            BootError::BadEntry { entry } => write!(
                f,
                "entry point {entry:#x} is not inside a loaded segment reachable through the 4 GiB identity map"
            ),
            BootError::RamTooSmall { ram, needed } => {
                write!(f, "guest RAM of {ram:#x} bytes is too small (need at least {needed:#x})")
            }
            BootError::CmdlineTooLong { len } => {
                write!(f, "command line of {len} bytes is longer than {MAX_CMDLINE}")
            }
            BootError::NoPvhNote => write!(
                f,
                "not a PVH kernel: the ELF has no Xen XEN_ELFNOTE_PHYS32_ENTRY note (type 18), so \
                 there is no 32-bit entry point to boot it with an initrd. A PVH kernel is an \
                 x86 Linux vmlinux built with CONFIG_PVH (Debian's, Ubuntu's and Fedora's \
                 distribution kernels are); give the uncompressed vmlinux, not the bzImage"
            ),
        }
    }
}

/// Which entry convention the guest got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, identity-mapped, paging on.
    Long64,
    /// 32-bit flat protected mode, paging off, multiboot registers.
    Protected32,
    /// 32-bit flat protected mode, paging off, EBX = `hvm_start_info` (Xen PVH).
    Pvh32,
}

/// One segment as loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedSegment {
    pub paddr: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    /// ELF `p_flags` (1 = X, 2 = W, 4 = R).
    pub flags: u32,
}

/// The result of loading: what the backend applies before the first run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootImage {
    pub mode: EntryMode,
    pub entry: u64,
    /// Registers, control registers, EFER and segments.
    pub state: CpuState,
    /// GDTR (base, limit). The IDTR is left empty (base 0, limit 0): interrupts are off.
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub segments: Vec<LoadedSegment>,
    /// Lowest and one-past-highest guest-physical byte the image occupies.
    pub image_start: u64,
    pub image_end: u64,
}

/// A parsed, validated static ELF image (no guest RAM touched yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    pub class_bits: u32,
    pub entry: u64,
    pub segments: Vec<ElfSegment>,
    /// The physical entry point of the `XEN_ELFNOTE_PHYS32_ENTRY` note (PVH kernels).
    pub pvh_entry: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfSegment {
    pub offset: u64,
    pub paddr: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub flags: u32,
}

/// Parse and validate a static ELF32/ELF64 x86 image.
pub fn parse_elf(bytes: &[u8]) -> Result<ElfImage, BootError> {
    let elf = ElfFile::parse(bytes)?;
    let class_bits = elf.bits;
    let machine = elf.header.e_machine;
    let want_machine = if class_bits == 64 {
        elf::EM_X86_64
    } else {
        elf::EM_386
    };
    if machine != want_machine {
        return Err(BootError::WrongMachine {
            machine,
            class_bits,
        });
    }
    let e_type = elf.header.e_type;
    if e_type != elf::header::ET_EXEC {
        return Err(BootError::NotExecutable { e_type });
    }
    let entry = elf.header.e_entry;
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for ph in elf.program_headers()? {
        match ph.p_type {
            PT_INTERP | PT_DYNAMIC => return Err(BootError::NotStatic),
            PT_LOAD => {}
            PT_NOTE => {
                pvh_entry = pvh_entry.or_else(|| pvh::phys32_entry(elf.notes(&ph)));
                continue;
            }
            _ => continue,
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(BootError::BadSegmentSizes {
                index: segments.len(),
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
            });
        }
        // The reader checked that a PT_LOAD's file bytes lie in the file.
        if ph.p_memsz > 0 {
            segments.push(ElfSegment {
                offset: ph.p_offset,
                paddr: ph.p_paddr,
                vaddr: ph.p_vaddr,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
                flags: ph.p_flags,
            });
        }
    }
    if segments.is_empty() {
        return Err(BootError::NoLoadableSegments);
    }
    // The entry must be in a loaded segment, and reachable through the identity map;
    // a PVH kernel is entered at its note's physical address instead (its e_entry
    // and segments are linked high, e.g. 0xffffffff81000000).
    let inside = |at: u64, by_paddr: bool| {
        at < (4u64 << 30)
            && segments.iter().any(|s| {
                let base = if by_paddr { s.paddr } else { s.vaddr };
                at >= base && at - base < s.memsz && base.checked_add(s.memsz).is_some()
            })
    };
    match pvh_entry {
        Some(p) if !inside(p, true) => return Err(BootError::BadEntry { entry: p }),
        Some(_) => {}
        // Linked in the upper half with no entry the identity map reaches: a
        // kernel (vmlinux-like) without the PVH note.
        None if !inside(entry, false) && segments.iter().any(|s| s.vaddr >= HIGH_HALF) => {
            return Err(BootError::NoPvhNote)
        }
        None if !inside(entry, false) => return Err(BootError::BadEntry { entry }),
        None => {}
    }
    Ok(ElfImage {
        class_bits,
        entry,
        segments,
        pvh_entry,
    })
}

fn ram_range(ram: &[u8], gpa: u64, len: u64) -> Option<core::ops::Range<usize>> {
    let end = gpa.checked_add(len)?;
    if end > ram.len() as u64 {
        return None;
    }
    Some(gpa as usize..end as usize)
}

fn put(ram: &mut [u8], gpa: u64, bytes: &[u8]) {
    // Callers only write inside the boot area, whose presence `load` checked.
    if let Some(r) = ram_range(ram, gpa, bytes.len() as u64) {
        ram[r].copy_from_slice(bytes);
    }
}

fn flat(selector: u16, attrs: u32) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xFFFF_FFFF,
        attrs,
    }
}

/// Load `elf` into `ram` (guest-physical address 0 = `ram[0]`) by the boot ABI and
/// return the initial state. `cmdline` goes into the multiboot block (ELF32) and to
/// [`CMDLINE_ADDR`] for either class. A PVH kernel is booted by [`pvh`] without an
/// initrd (see [`load_kernel`]).
pub fn load(elf: &[u8], ram: &mut [u8], cmdline: &str) -> Result<BootImage, BootError> {
    load_kernel(elf, ram, cmdline, None)
}

/// [`load`], with an initrd: the image must then be a PVH kernel ([`pvh`]), which
/// gets the initrd as module 0 of its start info.
pub fn load_kernel(
    elf: &[u8],
    ram: &mut [u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<BootImage, BootError> {
    let img = parse_elf(elf)?;
    let ram_len = ram.len() as u64;
    if ram_len < BOOT_AREA_END {
        return Err(BootError::RamTooSmall {
            ram: ram_len,
            needed: BOOT_AREA_END,
        });
    }
    if cmdline.len() > MAX_CMDLINE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    match (img.pvh_entry, initrd) {
        (Some(entry), _) => return pvh::load(&img, entry, elf, ram, cmdline, initrd),
        (None, Some(_)) => return Err(BootError::NoPvhNote),
        (None, None) => {}
    }
    let (loaded, image_start, image_end) = load_segments(&img, elf, ram)?;
    write_boot_area(ram, cmdline);
    let mut state = CpuState {
        rflags: rflags::FIXED,
        ..CpuState::default()
    };
    state.rip = img.entry;
    let mode = if img.class_bits == 64 {
        // Identity map of the first 4 GiB with 2 MiB pages (P, RW, PS).
        put(
            ram,
            PML4_ADDR,
            &(PDPT_ADDR | pte::P | pte::RW).to_le_bytes(),
        );
        for gib in 0..4u64 {
            let pd = PD_ADDR + gib * 0x1000;
            put(
                ram,
                PDPT_ADDR + gib * 8,
                &(pd | pte::P | pte::RW).to_le_bytes(),
            );
            for i in 0..512u64 {
                let page = (gib << 30) | (i << 21);
                put(
                    ram,
                    pd + i * 8,
                    &(page | pte::P | pte::RW | pte::PS).to_le_bytes(),
                );
            }
        }
        state.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
        state.cr3 = PML4_ADDR;
        state.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
        state.efer = efer::LME | efer::LMA;
        let data = flat(SEL_DATA, ATTR_DATA);
        state.seg = [data, flat(SEL_CODE64, ATTR_CODE64), data, data, data, data];
        EntryMode::Long64
    } else {
        let info = multiboot_info(ram_len, cmdline.len());
        put(ram, MULTIBOOT_INFO_ADDR, &info);
        let mut mmap = Vec::new();
        for (base, len, kind) in memory_map(ram_len) {
            mmap.extend_from_slice(&20u32.to_le_bytes());
            mmap.extend_from_slice(&base.to_le_bytes());
            mmap.extend_from_slice(&len.to_le_bytes());
            mmap.extend_from_slice(&kind.to_le_bytes());
        }
        put(ram, MULTIBOOT_MMAP_ADDR, &mmap);
        state.cr0 = cr0::PE | cr0::ET;
        state.gpr[crate::ir::RAX as usize] = u64::from(MULTIBOOT_MAGIC);
        state.gpr[crate::ir::RBX as usize] = MULTIBOOT_INFO_ADDR;
        let data = flat(SEL_DATA, ATTR_DATA);
        state.seg = [data, flat(SEL_CODE32, ATTR_CODE32), data, data, data, data];
        EntryMode::Protected32
    };
    Ok(BootImage {
        mode,
        entry: img.entry,
        state,
        gdt_base: GDT_ADDR,
        gdt_limit: GDT_LIMIT,
        segments: loaded,
        image_start,
        image_end,
    })
}

/// Copy every segment of `img` to its `p_paddr` (the rest of `p_memsz` zeroed):
/// what was loaded, and the lowest and one-past-highest byte it occupies.
fn load_segments(
    img: &ElfImage,
    elf: &[u8],
    ram: &mut [u8],
) -> Result<(Vec<LoadedSegment>, u64, u64), BootError> {
    let ram_len = ram.len() as u64;
    let mut loaded = Vec::with_capacity(img.segments.len());
    let (mut image_start, mut image_end) = (u64::MAX, 0u64);
    for (index, s) in img.segments.iter().enumerate() {
        let Some(dst) = ram_range(ram, s.paddr, s.memsz) else {
            return Err(BootError::SegmentOutsideRam {
                index,
                paddr: s.paddr,
                memsz: s.memsz,
                ram: ram_len,
            });
        };
        if s.paddr < BOOT_AREA_END && s.paddr + s.memsz > BOOT_AREA_START {
            return Err(BootError::SegmentInBootArea {
                index,
                paddr: s.paddr,
                memsz: s.memsz,
            });
        }
        // Checked by parse_elf: offset + filesz <= elf.len(), filesz <= memsz.
        let src = &elf[s.offset as usize..(s.offset + s.filesz) as usize];
        let dst = &mut ram[dst];
        dst[..src.len()].copy_from_slice(src);
        dst[src.len()..].fill(0);
        image_start = image_start.min(s.paddr);
        image_end = image_end.max(s.paddr + s.memsz);
        loaded.push(LoadedSegment {
            paddr: s.paddr,
            vaddr: s.vaddr,
            filesz: s.filesz,
            memsz: s.memsz,
            flags: s.flags,
        });
    }
    Ok((loaded, image_start, image_end))
}

/// The boot area for any entry convention: zeroed, the GDT, the command line.
fn write_boot_area(ram: &mut [u8], cmdline: &str) {
    ram[BOOT_AREA_START as usize..BOOT_AREA_END as usize].fill(0);
    for (i, d) in GDT.iter().enumerate() {
        put(ram, GDT_ADDR + 8 * i as u64, &d.to_le_bytes());
    }
    put(ram, CMDLINE_ADDR, cmdline.as_bytes());
}

/// The memory map reported to ELF32 guests: (base, length, type) with type 1 =
/// available, 2 = reserved.
pub fn memory_map(ram_len: u64) -> Vec<(u64, u64, u32)> {
    let mut m = Vec::new();
    m.push((0, BOOT_AREA_START, 1));
    m.push((BOOT_AREA_START, BOOT_AREA_END - BOOT_AREA_START, 2));
    let low_end = LOW_MEM_END.min(ram_len);
    if low_end > BOOT_AREA_END {
        m.push((BOOT_AREA_END, low_end - BOOT_AREA_END, 1));
    }
    if ram_len > 0x10_0000 {
        m.push((LOW_MEM_END, 0x10_0000 - LOW_MEM_END, 2));
        m.push((0x10_0000, ram_len - 0x10_0000, 1));
    }
    m
}

const MMAP_ENTRY_BYTES: u32 = 24;

fn multiboot_info(ram_len: u64, cmdline_len: usize) -> [u8; 88] {
    let mut b = [0u8; 88];
    let mut w = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    // flags: mem_lower/upper (bit 0), cmdline (bit 2), mmap (bit 6).
    w(0, 1 | (1 << 2) | (1 << 6));
    w(4, (LOW_MEM_END.min(ram_len) / 1024) as u32);
    w(
        8,
        (ram_len.saturating_sub(0x10_0000) / 1024).min(u64::from(u32::MAX)) as u32,
    );
    w(16, CMDLINE_ADDR as u32);
    let _ = cmdline_len;
    w(44, memory_map(ram_len).len() as u32 * MMAP_ENTRY_BYTES);
    w(48, MULTIBOOT_MMAP_ADDR as u32);
    b
}

#[cfg(test)]
mod tests;
