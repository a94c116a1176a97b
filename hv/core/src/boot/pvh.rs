//! Xen PVH boot: how QEMU's `-kernel vmlinux`, Firecracker and cloud-hypervisor
//! boot an uncompressed x86 Linux, and how avex boots one.
//!
//! A *PVH kernel* is an ELF that names a 32-bit entry point in a `Xen` ELF note of
//! type `XEN_ELFNOTE_PHYS32_ENTRY` (18); every x86 Linux built with `CONFIG_PVH`
//! has it, Debian's distribution kernels included. The loader:
//!
//! * copies every `PT_LOAD` segment to its `p_paddr` (vmlinux links them at
//!   0xffffffff81000000 and loads them at 16 MiB);
//! * puts the initrd, if any, page-aligned at the top of guest RAM (below 4 GiB);
//! * writes `hvm_start_info` version 1 at [`START_INFO_ADDR`] (magic 0x336ec578,
//!   the command line, the initrd as module 0, no RSDP, an E820 memory map) in the
//!   boot area, which the map reports reserved;
//! * enters at the note's address in 32-bit flat protected mode, paging off,
//!   interrupts off, with EBX = the start info's address.

use alloc::vec::Vec;

use super::*;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note's descriptor is the 32-bit physical entry.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The `hvm_start_info` version written.
pub const START_INFO_VERSION: u32 = 1;
/// Guest-physical address of `hvm_start_info` (where ELF32 guests get the
/// multiboot block).
pub const START_INFO_ADDR: u64 = MULTIBOOT_INFO_ADDR;
/// The E820 table (`hvm_memmap_table_entry`: addr, size, type, reserved).
pub const MEMMAP_ADDR: u64 = MULTIBOOT_MMAP_ADDR;
/// The module list (`hvm_modlist_entry`: paddr, size, cmdline_paddr, reserved).
pub const MODLIST_ADDR: u64 = 0x2700;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_BYTES: usize = 56;

const PAGE: u64 = 0x1000;
const FOUR_GIB: u64 = 4 << 30;

/// The physical entry of the first `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`]
/// among `notes`, if any. The descriptor is 4 or 8 bytes (Linux writes a pointer);
/// its low 32 bits are the entry.
pub(super) fn phys32_entry(mut notes: crate::elf::Notes<'_>) -> Option<u64> {
    notes
        .find(|n| n.name == b"Xen\0" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY && n.desc.len() >= 4)
        .map(|n| {
            u64::from(u32::from_le_bytes([
                n.desc[0], n.desc[1], n.desc[2], n.desc[3],
            ]))
        })
}

fn page_up(x: u64) -> u64 {
    x.saturating_add(PAGE - 1) & !(PAGE - 1)
}

/// Boot the PVH kernel `img` (entered at `entry`) with `cmdline` and `initrd`.
pub(super) fn load(
    img: &ElfImage,
    entry: u64,
    elf: &[u8],
    ram: &mut [u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<BootImage, BootError> {
    let ram_len = ram.len() as u64;
    let (segments, image_start, image_end) = load_segments(img, elf, ram)?;
    write_boot_area(ram, cmdline);

    // The initrd at the top of RAM below 4 GiB, page-aligned, above the kernel.
    let module = match initrd {
        None => None,
        Some(rd) => {
            let len = rd.len() as u64;
            let floor = image_end.max(0x10_0000);
            let at = ram_len
                .min(FOUR_GIB)
                .checked_sub(len)
                .map(|a| a & !(PAGE - 1))
                .filter(|&a| a >= floor);
            let Some(at) = at else {
                return Err(BootError::RamTooSmall {
                    ram: ram_len,
                    needed: page_up(floor) + page_up(len),
                });
            };
            ram[at as usize..(at + len) as usize].copy_from_slice(rd);
            Some((at, len))
        }
    };

    let map = memory_map(ram_len);
    let mut table = Vec::with_capacity(map.len() * 24);
    for &(base, len, kind) in &map {
        table.extend_from_slice(&base.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&kind.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    put(ram, MEMMAP_ADDR, &table);
    if let Some((at, len)) = module {
        let mut m = [0u8; 32];
        m[0..8].copy_from_slice(&at.to_le_bytes());
        m[8..16].copy_from_slice(&len.to_le_bytes());
        put(ram, MODLIST_ADDR, &m);
    }
    let mut info = [0u8; START_INFO_BYTES];
    info[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info[4..8].copy_from_slice(&START_INFO_VERSION.to_le_bytes());
    // flags (8..12) 0; nr_modules, modlist_paddr.
    info[12..16].copy_from_slice(&u32::from(module.is_some()).to_le_bytes());
    if module.is_some() {
        info[16..24].copy_from_slice(&MODLIST_ADDR.to_le_bytes());
    }
    info[24..32].copy_from_slice(&CMDLINE_ADDR.to_le_bytes());
    // rsdp_paddr (32..40) 0: no ACPI.
    info[40..48].copy_from_slice(&MEMMAP_ADDR.to_le_bytes());
    info[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    put(ram, START_INFO_ADDR, &info);

    let mut state = CpuState {
        rflags: rflags::FIXED,
        ..CpuState::default()
    };
    state.rip = entry;
    state.cr0 = cr0::PE | cr0::ET;
    state.gpr[crate::ir::RBX as usize] = START_INFO_ADDR;
    let data = flat(SEL_DATA, ATTR_DATA);
    state.seg = [data, flat(SEL_CODE32, ATTR_CODE32), data, data, data, data];
    Ok(BootImage {
        mode: EntryMode::Pvh32,
        entry,
        state,
        gdt_base: GDT_ADDR,
        gdt_limit: GDT_LIMIT,
        segments,
        image_start,
        image_end,
    })
}
