//! `mbloader`: a test tool, not a guest. A multiboot1 kernel (flat binary with the
//! a.out-kludge header, so QEMU's `-kernel` takes it) that implements the guest
//! boot ABI for an ELF64 guest passed as the first multiboot module: it builds page
//! tables identity-mapping the first 4 GiB with 2 MiB pages, enters 64-bit mode,
//! loads the guest's PT_LOAD segments at their physical addresses (zero-filling
//! past `p_filesz`) and jumps to `e_entry` with interrupts off. Silent on success.
//!
//! ```text
//! objcopy -O binary mbloader mbloader.bin
//! qemu-system-x86_64 -kernel mbloader.bin -initrd <guest ELF> -nographic \
//!     -device isa-debug-exit,iobase=0xf4,iosize=0x04
//! ```
#![no_std]
#![no_main]

use rt::{print, print_hex, println};

const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Page-aligned modules, memory info, address fields valid (a.out kludge).
const MULTIBOOT_FLAGS: u32 = 0x0001_0003;

core::arch::global_asm!(
    ".section .multiboot, \"a\"",
    ".balign 4",
    "mb_header:",
    ".long {magic}",
    ".long {flags}",
    ".long -({magic} + {flags})",
    ".long mb_header",
    ".long __load_start",
    ".long __load_end",
    ".long __bss_end",
    ".long _start32",
    ".section .text",
    ".code32",
    ".global _start32",
    "_start32:",
    "    cli",
    "    cld",
    "    mov esp, offset __stack_top",
    "    mov edi, ebx",
    // PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; PD entries: 2 MiB pages.
    "    mov eax, offset __page_tables + 0x1000 + 3",
    "    mov [__page_tables], eax",
    "    mov dword ptr [__page_tables + 4], 0",
    "    xor ecx, ecx",
    "1:  mov eax, ecx",
    "    shl eax, 12",
    "    add eax, offset __page_tables + 0x2000 + 3",
    "    mov [__page_tables + 0x1000 + ecx * 8], eax",
    "    mov dword ptr [__page_tables + 0x1000 + ecx * 8 + 4], 0",
    "    inc ecx",
    "    cmp ecx, 4",
    "    jne 1b",
    "    xor ecx, ecx",
    "2:  mov eax, ecx",
    "    shl eax, 21",
    "    or eax, 0x83",
    "    mov [__page_tables + 0x2000 + ecx * 8], eax",
    "    mov dword ptr [__page_tables + 0x2000 + ecx * 8 + 4], 0",
    "    inc ecx",
    "    cmp ecx, 2048",
    "    jne 2b",
    // PAE, the root, EFER.LME, then paging.
    "    mov eax, cr4",
    "    or eax, 0x20",
    "    mov cr4, eax",
    "    mov eax, offset __page_tables",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080",
    "    rdmsr",
    "    or eax, 0x100",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",
    "    mov cr0, eax",
    "    lgdt [mb_gdt_ptr]",
    // ljmp 0x08:mb_long_entry (ptr16:32), spelled out: assemblers differ on it.
    "    .byte 0xea",
    "    .long mb_long_entry",
    "    .word 0x08",
    ".code64",
    "mb_long_entry:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    mov rsp, offset __stack_top",
    "    mov edi, edi",
    "    call {main}",
    "3:  hlt",
    "    jmp 3b",
    ".section .rodata",
    ".balign 8",
    "mb_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "mb_gdt_ptr:",
    ".word 23",
    ".long mb_gdt",
    ".section .text",
    magic = const MULTIBOOT_MAGIC,
    flags = const MULTIBOOT_FLAGS,
    main = sym loader_main,
);

extern "C" {
    static __load_start: u8;
    static __bss_end: u8;
}

fn fail(what: &str) -> ! {
    print("mbloader: ");
    println(what);
    rt::exit(0xfd)
}

/// Read a little-endian `T`-sized field at `base + off` of physical memory.
///
/// # Safety
/// The range must be readable memory (here: the multiboot structures and module,
/// all below 4 GiB and identity-mapped).
unsafe fn rd<T: Copy>(base: u64, off: u64) -> T {
    // SAFETY: the caller guarantees the range; reads are unaligned-safe.
    unsafe { core::ptr::read_unaligned((base + off) as *const T) }
}

extern "C" fn loader_main(mbi: u32) -> ! {
    let mbi = u64::from(mbi);
    // SAFETY: QEMU's multiboot loader put the information block and the module in
    // RAM below 4 GiB, which is identity-mapped; every offset read below is within
    // the structures the multiboot spec defines or within the module's bounds
    // (checked against its length before use).
    unsafe {
        let flags: u32 = rd(mbi, 0);
        let mods_count: u32 = rd(mbi, 20);
        if flags & (1 << 3) == 0 || mods_count == 0 {
            fail("no module: pass the guest ELF with -initrd");
        }
        let mods: u32 = rd(mbi, 24);
        let start = u64::from(rd::<u32>(u64::from(mods), 0));
        let end = u64::from(rd::<u32>(u64::from(mods), 4));
        let len = end.saturating_sub(start);
        if len < 64 || rd::<u32>(start, 0) != 0x464c_457f || rd::<u8>(start, 4) != 2 {
            fail("module is not an ELF64 file");
        }
        let entry: u64 = rd(start, 24);
        let phoff: u64 = rd(start, 32);
        let phentsize = u64::from(rd::<u16>(start, 54));
        let phnum = u64::from(rd::<u16>(start, 56));
        if phentsize < 56 || phoff + phnum * phentsize > len {
            fail("bad program header table");
        }
        let lo = &raw const __load_start as u64;
        let hi = &raw const __bss_end as u64;
        for i in 0..phnum {
            let ph = start + phoff + i * phentsize;
            if rd::<u32>(ph, 0) != 1 {
                continue;
            }
            let off: u64 = rd(ph, 8);
            let paddr: u64 = rd(ph, 24);
            let filesz: u64 = rd(ph, 32);
            let memsz: u64 = rd(ph, 40);
            if filesz > memsz || off + filesz > len || paddr + memsz > 1 << 32 {
                fail("bad PT_LOAD segment");
            }
            let overlaps = |a: u64, b: u64| paddr < b && a < paddr + memsz;
            if overlaps(lo, hi) || overlaps(start, end) {
                print("mbloader: segment at ");
                print_hex(paddr);
                fail("overlaps the loader or the module");
            }
            core::ptr::copy_nonoverlapping(
                (start + off) as *const u8,
                paddr as *mut u8,
                filesz as usize,
            );
            core::ptr::write_bytes((paddr + filesz) as *mut u8, 0, (memsz - filesz) as usize);
        }
        // SAFETY (jump): the guest is loaded; the boot ABI promises 64-bit mode,
        // the identity map, interrupts off and nothing else.
        core::arch::asm!("cli", "jmp {}", in(reg) entry, options(noreturn));
    }
}
