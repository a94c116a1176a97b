//! The loader's tests on synthetic ELFs.

use super::*;
use crate::elf::header::ET_EXEC;
use crate::elf::{EM_386, EM_X86_64};
use alloc::string::ToString;
use alloc::vec;

/// A minimal ELF with one PT_LOAD of `code` at `paddr` (= vaddr) entered at its start.
fn elf(is64: bool, paddr: u64, code: &[u8], memsz_extra: u64) -> Vec<u8> {
    let mut e = vec![0u8; if is64 { 64 + 56 } else { 52 + 32 }];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = if is64 { 2 } else { 1 };
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    let off = e.len() as u64;
    if is64 {
        e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let p = 64;
        e[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes());
        e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        e[p + 16..p + 24].copy_from_slice(&paddr.to_le_bytes());
        e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
        e[p + 32..p + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[p + 40..p + 48].copy_from_slice(&(code.len() as u64 + memsz_extra).to_le_bytes());
    } else {
        e[18..20].copy_from_slice(&EM_386.to_le_bytes());
        e[24..28].copy_from_slice(&(paddr as u32).to_le_bytes());
        e[28..32].copy_from_slice(&52u32.to_le_bytes());
        e[42..44].copy_from_slice(&32u16.to_le_bytes());
        e[44..46].copy_from_slice(&1u16.to_le_bytes());
        let p = 52;
        e[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[p + 4..p + 8].copy_from_slice(&(off as u32).to_le_bytes());
        e[p + 8..p + 12].copy_from_slice(&(paddr as u32).to_le_bytes());
        e[p + 12..p + 16].copy_from_slice(&(paddr as u32).to_le_bytes());
        e[p + 16..p + 20].copy_from_slice(&(code.len() as u32).to_le_bytes());
        e[p + 20..p + 24]
            .copy_from_slice(&((code.len() as u64 + memsz_extra) as u32).to_le_bytes());
        e[p + 24..p + 28].copy_from_slice(&5u32.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

fn rd64(ram: &[u8], a: u64) -> u64 {
    u64::from_le_bytes(ram[a as usize..a as usize + 8].try_into().unwrap())
}
fn rd32(ram: &[u8], a: u64) -> u32 {
    u32::from_le_bytes(ram[a as usize..a as usize + 4].try_into().unwrap())
}

/// Walk the loader's page tables the way the MMU would.
fn walk(ram: &[u8], cr3: u64, va: u64) -> Option<u64> {
    let pml4e = rd64(ram, (cr3 & !0xfff) + ((va >> 39) & 511) * 8);
    if pml4e & pte::P == 0 {
        return None;
    }
    let pdpte = rd64(
        ram,
        (pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 511) * 8,
    );
    if pdpte & pte::P == 0 {
        return None;
    }
    let pde = rd64(
        ram,
        (pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 511) * 8,
    );
    if pde & pte::P == 0 || pde & pte::PS == 0 {
        return None;
    }
    Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
}

#[test]
fn elf64_loads_and_maps_4gib_identity() {
    let code = [0xf4u8, 0x90, 0x90];
    let image = elf(true, 0x10_0000, &code, 0x100);
    let mut ram = vec![0xAAu8; 4 << 20];
    let b = load(&image, &mut ram, "x").unwrap();
    assert_eq!(b.mode, EntryMode::Long64);
    assert_eq!(b.state.rip, 0x10_0000);
    assert_eq!(&ram[0x10_0000..0x10_0003], &code);
    // memsz beyond filesz is zeroed
    assert!(ram[0x10_0003..0x10_0103].iter().all(|&x| x == 0));
    assert_eq!(ram[0x10_0103], 0xAA);
    assert_eq!(b.state.cr3, PML4_ADDR);
    assert_ne!(b.state.cr0 & cr0::PG, 0);
    assert_eq!(b.state.efer, efer::LME | efer::LMA);
    assert!(b.state.segment(crate::ir::Seg::Cs).long());
    assert_eq!(b.state.rflags & rflags::IF, 0, "interrupts off");
    for va in [0u64, 0x10_0000, 0x1234_5678, 0xffff_f123, 0x8000_0000] {
        assert_eq!(walk(&ram, b.state.cr3, va), Some(va), "va {va:#x}");
    }
    assert_eq!(walk(&ram, b.state.cr3, 4 << 30), None);
    // GDT at its documented place matches the selectors' attributes
    assert_eq!(
        rd64(&ram, GDT_ADDR + u64::from(SEL_CODE64)),
        0x00AF_9B00_0000_FFFF
    );
    assert_eq!(b.gdt_base, GDT_ADDR);
    assert_eq!(
        &ram[CMDLINE_ADDR as usize..CMDLINE_ADDR as usize + 2],
        b"x\0"
    );
}

#[test]
fn elf32_gets_multiboot_registers_and_info() {
    let image = elf(false, 0x20_0000, &[0xf4], 0);
    let mut ram = vec![0u8; 8 << 20];
    let b = load(&image, &mut ram, "console=ttyS0").unwrap();
    assert_eq!(b.mode, EntryMode::Protected32);
    assert_eq!(b.state.gpr[0], 0x2BAD_B002);
    assert_eq!(b.state.gpr[3], MULTIBOOT_INFO_ADDR);
    assert_eq!(b.state.cr0 & cr0::PG, 0);
    assert_eq!(b.state.cr0 & cr0::PE, 1);
    assert!(b.state.segment(crate::ir::Seg::Cs).db());
    let info = MULTIBOOT_INFO_ADDR;
    assert_eq!(rd32(&ram, info) & 0x45, 0x45);
    assert_eq!(rd32(&ram, info + 8), (8 << 20) / 1024 - 1024);
    let cmd = rd32(&ram, info + 16) as usize;
    assert_eq!(&ram[cmd..cmd + 14], b"console=ttyS0\0");
    let (len, addr) = (rd32(&ram, info + 44) as u64, rd32(&ram, info + 48) as u64);
    let mut entries = vec![];
    let mut a = addr;
    while a < addr + len {
        let size = rd32(&ram, a);
        assert_eq!(size, 20);
        entries.push((rd64(&ram, a + 4), rd64(&ram, a + 12), rd32(&ram, a + 20)));
        a += 4 + u64::from(size);
    }
    assert!(entries.contains(&(0x10_0000, (8 << 20) - 0x10_0000, 1)));
    assert!(entries.contains(&(BOOT_AREA_START, BOOT_AREA_END - BOOT_AREA_START, 2)));
}

#[test]
fn rejects_malformed_images() {
    let good = elf(true, 0x10_0000, &[0xf4; 16], 0);
    let mut ram = vec![0u8; 2 << 20];
    assert!(matches!(
        load(b"MZ\x90\x00", &mut ram, ""),
        Err(BootError::Elf(ElfError::NotElf { len: 4, .. }))
    ));
    // Truncated in the program header table.
    assert!(matches!(
        load(&good[..80], &mut ram, ""),
        Err(BootError::Elf(ElfError::TablePastEnd {
            what: "program header table",
            field_offset: 32,
            ..
        }))
    ));
    // Truncated in the ELF header.
    let e = load(&good[..40], &mut ram, "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "truncated: ELF header needs 64 bytes at offset 0x0, the file has 40"
    );
    // Segment file bytes past the end of file.
    let mut bad = good.clone();
    bad.truncate(good.len() - 4);
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::Elf(ElfError::SegmentPastEnd { index: 0, .. }))
    ));
    // Huge p_offset must not overflow.
    let mut bad = good.clone();
    bad[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::Elf(ElfError::SegmentPastEnd { index: 0, .. }))
    ));
    // Huge phoff.
    let mut bad = good.clone();
    bad[32..40].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::Elf(ElfError::TablePastEnd { .. }))
    ));
    // Segment beyond RAM.
    let big = elf(true, 0x10_0000, &[0xf4], 4 << 20);
    assert!(matches!(
        load(&big, &mut ram, ""),
        Err(BootError::SegmentOutsideRam { .. })
    ));
    // Overlapping the boot area.
    let low = elf(true, 0x8000, &[0xf4], 0);
    assert!(matches!(
        load(&low, &mut ram, ""),
        Err(BootError::SegmentInBootArea { .. })
    ));
    // Wrong machine.
    let mut bad = good.clone();
    bad[18] = 40;
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::WrongMachine { .. })
    ));
    // PIE.
    let mut bad = good.clone();
    bad[16] = 3;
    assert_eq!(
        load(&bad, &mut ram, ""),
        Err(BootError::NotExecutable { e_type: 3 })
    );
    // Entry outside the segment.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::BadEntry { .. })
    ));
    // filesz > memsz
    let mut bad = good.clone();
    bad[64 + 40..64 + 48].copy_from_slice(&1u64.to_le_bytes());
    assert!(matches!(
        load(&bad, &mut ram, ""),
        Err(BootError::BadSegmentSizes { .. })
    ));
    // Too little RAM.
    assert!(matches!(
        load(&good, &mut [0u8; 0x100], ""),
        Err(BootError::RamTooSmall { .. })
    ));
    // The good one still loads.
    assert!(load(&good, &mut ram, "").is_ok());
}

#[test]
fn never_panics_on_truncations_or_byte_flips() {
    let good = elf(true, 0x10_0000, &[0xf4; 32], 64);
    let mut ram = vec![0u8; 2 << 20];
    for n in 0..good.len() {
        let _ = load(&good[..n], &mut ram, "");
    }
    for i in 0..good.len() {
        for v in [0u8, 0xff, 0x80, 1] {
            let mut b = good.clone();
            b[i] = v;
            let _ = load(&b, &mut ram, "");
        }
    }
}

/// A vmlinux-like PVH kernel: one PT_LOAD of `code` linked at 0xffffffff81000000
/// and loaded at `paddr`, and a PT_NOTE with a GNU note then a `Xen` note of
/// `kind` whose descriptor is `desc`. e_entry is the physical `paddr`, as vmlinux's.
fn pvh_elf(paddr: u64, code: &[u8], memsz: u64, kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut notes = Vec::new();
    let mut note = |name: &[u8], kind: u32, desc: &[u8]| {
        notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        notes.extend_from_slice(&kind.to_le_bytes());
        notes.extend_from_slice(name);
        notes.resize((notes.len() + 3) & !3, 0);
        notes.extend_from_slice(desc);
        notes.resize((notes.len() + 3) & !3, 0);
    };
    note(b"GNU\0", 3, &[0xab; 20]);
    note(b"Xen\0", kind, desc);
    let mut e = vec![0u8; 64 + 2 * 56];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&2u16.to_le_bytes());
    let code_off = e.len() as u64;
    let notes_off = code_off + code.len() as u64;
    let high = 0xffff_ffff_8100_0000u64;
    let mut ph =
        |p: usize, kind: u32, off: u64, vaddr: u64, paddr: u64, filesz: u64, memsz: u64| {
            e[p..p + 4].copy_from_slice(&kind.to_le_bytes());
            e[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes());
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 16..p + 24].copy_from_slice(&vaddr.to_le_bytes());
            e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        };
    ph(64, PT_LOAD, code_off, high, paddr, code.len() as u64, memsz);
    let n = notes.len() as u64;
    ph(
        64 + 56,
        PT_NOTE,
        notes_off,
        high + 0x100,
        paddr + 0x100,
        n,
        n,
    );
    e.extend_from_slice(code);
    e.extend_from_slice(&notes);
    e
}

#[test]
fn pvh_kernel_gets_start_info_memmap_cmdline_and_initrd() {
    let entry = 0x10_0010u64;
    // Linux writes the entry as a pointer (8 bytes).
    let image = pvh_elf(0x10_0000, &[0xf4; 32], 0x2000, 18, &entry.to_le_bytes());
    assert_eq!(parse_elf(&image).unwrap().pvh_entry, Some(entry));
    let mut ram = vec![0xAAu8; 8 << 20];
    let initrd = [0x5au8; 5000];
    let b = load_kernel(&image, &mut ram, "console=ttyS0", Some(&initrd)).unwrap();
    assert_eq!(b.mode, EntryMode::Pvh32);
    assert_eq!(b.state.rip, entry);
    assert_eq!(b.state.gpr[crate::ir::RBX as usize], pvh::START_INFO_ADDR);
    assert_eq!(b.state.cr0 & cr0::PG, 0);
    assert_eq!(b.state.cr0 & cr0::PE, cr0::PE);
    assert!(b.state.segment(crate::ir::Seg::Cs).db());
    assert_eq!(b.state.rflags & rflags::IF, 0);
    assert_eq!(&ram[0x10_0000..0x10_0020], &[0xf4; 32]);
    assert!(ram[0x10_0020..0x10_2000].iter().all(|&x| x == 0));

    let si = pvh::START_INFO_ADDR;
    assert_eq!(rd32(&ram, si), 0x336e_c578);
    assert_eq!(rd32(&ram, si + 4), 1, "version");
    assert_eq!(rd32(&ram, si + 12), 1, "nr_modules");
    let cmd = rd64(&ram, si + 24) as usize;
    assert_eq!(&ram[cmd..cmd + 14], b"console=ttyS0\0");
    assert_eq!(rd64(&ram, si + 32), 0, "no RSDP");
    // The initrd is module 0, page-aligned at the top of RAM.
    let modlist = rd64(&ram, si + 16);
    let (at, len) = (rd64(&ram, modlist), rd64(&ram, modlist + 8));
    assert_eq!(len, 5000);
    assert_eq!(at % 0x1000, 0);
    assert!(at + len <= 8 << 20 && at + len > (8 << 20) - 0x1000);
    assert!(ram[at as usize..(at + len) as usize]
        .iter()
        .all(|&x| x == 0x5a));
    // E820: RAM above 1 MiB, the boot area reserved.
    let (map, n) = (rd64(&ram, si + 40), rd32(&ram, si + 48));
    let entries: Vec<(u64, u64, u32)> = (0..u64::from(n))
        .map(|i| {
            let e = map + 24 * i;
            (rd64(&ram, e), rd64(&ram, e + 8), rd32(&ram, e + 16))
        })
        .collect();
    assert!(entries.contains(&(0x10_0000, (8 << 20) - 0x10_0000, 1)));
    assert!(entries.contains(&(BOOT_AREA_START, BOOT_AREA_END - BOOT_AREA_START, 2)));
    // Without an initrd: no module.
    let b = load(&image, &mut ram, "").unwrap();
    assert_eq!(b.mode, EntryMode::Pvh32);
    assert_eq!(rd32(&ram, si + 12), 0);
}

#[test]
fn pvh_note_with_a_32_bit_descriptor() {
    let image = pvh_elf(0x20_0000, &[0x90; 16], 16, 18, &0x20_0004u32.to_le_bytes());
    let mut ram = vec![0u8; 4 << 20];
    assert_eq!(load(&image, &mut ram, "").unwrap().state.rip, 0x20_0004);
}

#[test]
fn initrd_needs_a_pvh_kernel_and_room() {
    // A high-linked kernel with another Xen note but no PHYS32_ENTRY: not a PVH
    // kernel, said so (its e_entry is not inside a segment by virtual address).
    let no_note = pvh_elf(0x10_0000, &[0xf4; 16], 16, 17, &[1, 0, 0, 0]);
    let mut ram = vec![0u8; 4 << 20];
    assert_eq!(load(&no_note, &mut ram, ""), Err(BootError::NoPvhNote));
    // A plain guest given an initrd: not a PVH kernel, said so.
    let plain = elf(true, 0x10_0000, &[0xf4], 0);
    let e = load_kernel(&plain, &mut ram, "", Some(&[1, 2, 3])).unwrap_err();
    assert_eq!(e, BootError::NoPvhNote);
    let msg = alloc::format!("{e}");
    assert!(
        msg.contains("PVH") && msg.contains("distribution kernels"),
        "{msg}"
    );
    // Kernel plus initrd larger than RAM.
    let image = pvh_elf(
        0x10_0000,
        &[0xf4; 16],
        0x20_0000,
        18,
        &0x10_0000u32.to_le_bytes(),
    );
    let big = vec![0u8; 3 << 20];
    assert_eq!(
        load_kernel(&image, &mut ram, "", Some(&big)),
        Err(BootError::RamTooSmall {
            ram: 4 << 20,
            needed: (3 << 20) + (3 << 20)
        })
    );
    // An entry outside every segment (by physical address).
    let bad = pvh_elf(0x10_0000, &[0xf4; 16], 16, 18, &0x30_0000u32.to_le_bytes());
    assert_eq!(
        load(&bad, &mut ram, ""),
        Err(BootError::BadEntry { entry: 0x30_0000 })
    );
}

#[test]
fn pvh_notes_never_panic_on_truncations_or_byte_flips() {
    let good = pvh_elf(0x10_0000, &[0xf4; 16], 64, 18, &0x10_0000u64.to_le_bytes());
    let mut ram = vec![0u8; 2 << 20];
    for n in 0..good.len() {
        let _ = load_kernel(&good[..n], &mut ram, "", Some(&[1]));
    }
    for i in 0..good.len() {
        for v in [0u8, 0xff, 0x80, 1, 0x7f] {
            let mut b = good.clone();
            b[i] = v;
            let _ = load_kernel(&b, &mut ram, "", Some(&[1]));
        }
    }
}
