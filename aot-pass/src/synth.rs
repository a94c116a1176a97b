//! Small synthetic x86 ELF images (ET_EXEC, ELF32 or ELF64) for tests, benchmarks and
//! fuzz seeds: a `.text` of driver-like functions (UART polling, MSR and CR3 access,
//! CPUID, RDTSC) among plain ones, with or without a symbol table.

type Shdr = (u32, u32, u64, u64, usize, usize, u32, u32, u64);

/// One driver-like function: port polling loop, OUT, RDMSR/WRMSR, CPUID, CR3, RDTSC.
/// `rex`: 64-bit code (REX.W on the register move).
fn exiting_function(rex: bool) -> Vec<u8> {
    let mut f = vec![
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
        0xec, // in al, dx
        0xa8, 0x20, // test al, 0x20
        0x74, 0xfb, // jz -5 (back to in)
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x88, 0xd8, // mov al, bl
        0xee, // out dx, al
        0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000080
        0x0f, 0x32, // rdmsr
        0x0d, 0x00, 0x01, 0x00, 0x00, // or eax, 0x100
        0x0f, 0x30, // wrmsr
        0x31, 0xc0, // xor eax, eax
        0x0f, 0xa2, // cpuid
        0x0f, 0x20, 0xd8, // mov (r/e)ax, cr3
        0x0f, 0x22, 0xd8, // mov cr3, (r/e)ax
    ];
    if rex {
        f.push(0x48);
    }
    f.extend_from_slice(&[0x89, 0xc3, 0x0f, 0x31, 0xc3]); // mov ebx, eax; rdtsc; ret
    f
}

/// A plain function: arithmetic, a forward branch, a call-free body.
fn plain_function(rex: bool, k: u8) -> Vec<u8> {
    let mut f = Vec::new();
    for i in 0..8u8 {
        if rex {
            f.push(0x48);
        }
        f.extend_from_slice(&[0x01, 0xd8]); // add (r/e)ax, (r/e)bx
        f.extend_from_slice(&[0x83, 0xc1, i ^ k]); // add ecx, imm8
        f.extend_from_slice(&[0x85, 0xc9, 0x74, 0x02, 0x31, 0xd2]); // test; jz +2; xor edx, edx
    }
    f.push(0xc3);
    f
}

/// Builds an ELF with about `code_bytes` of code; every `exit_every`-th function
/// exits. `bits`: 32 or 64. `symbols`: emit `.symtab` with one FUNC per function.
pub fn elf(bits: u32, code_bytes: usize, exit_every: usize, symbols: bool) -> Vec<u8> {
    let rex = bits == 64;
    let base: u64 = 0x40_0000;
    let mut text = Vec::new();
    let mut funcs = Vec::new();
    let mut n = 0usize;
    while text.len() < code_bytes.max(1) {
        let f = if exit_every > 0 && n.is_multiple_of(exit_every) {
            exiting_function(rex)
        } else {
            plain_function(rex, n as u8)
        };
        funcs.push((text.len(), f.len()));
        text.extend_from_slice(&f);
        while !text.len().is_multiple_of(16) {
            text.push(0xcc);
        }
        n += 1;
    }
    let is64 = bits == 64;
    let (ehsize, phsize, shsize, symsize) = if is64 {
        (64usize, 56usize, 64usize, 24usize)
    } else {
        (52, 32, 40, 16)
    };
    let text_off = 0x1000usize;
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; symsize];
    if symbols {
        for (i, (off, len)) in funcs.iter().enumerate() {
            let name_off = strtab.len() as u32;
            strtab.extend_from_slice(format!("f{i}\0").as_bytes());
            let value = base + (text_off + off) as u64;
            let mut s = Vec::new();
            s.extend_from_slice(&name_off.to_le_bytes());
            if is64 {
                s.push(0x12); // GLOBAL FUNC
                s.push(0);
                s.extend_from_slice(&1u16.to_le_bytes()); // .text
                s.extend_from_slice(&value.to_le_bytes());
                s.extend_from_slice(&(*len as u64).to_le_bytes());
            } else {
                s.extend_from_slice(&(value as u32).to_le_bytes());
                s.extend_from_slice(&(*len as u32).to_le_bytes());
                s.push(0x12);
                s.push(0);
                s.extend_from_slice(&1u16.to_le_bytes());
            }
            symtab.extend_from_slice(&s);
        }
    }
    let shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0".to_vec();
    let mut out = vec![0u8; text_off];
    out.extend_from_slice(&text);
    let symtab_off = out.len();
    out.extend_from_slice(&symtab);
    let strtab_off = out.len();
    out.extend_from_slice(&strtab);
    let shstr_off = out.len();
    out.extend_from_slice(&shstrtab);
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let shoff = out.len();
    // Section headers: null, .text, .symtab, .strtab, .shstrtab.
    // (name, type, flags, addr, offset, size, link, info, entsize)
    let sections: [Shdr; 5] = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0),
        (
            1,
            1,
            6,
            base + text_off as u64,
            text_off,
            text.len(),
            0,
            0,
            0,
        ),
        (7, 2, 0, 0, symtab_off, symtab.len(), 3, 1, symsize as u64),
        (15, 3, 0, 0, strtab_off, strtab.len(), 0, 0, 0),
        (23, 3, 0, 0, shstr_off, shstrtab.len(), 0, 0, 0),
    ];
    for (name, ty, flags, addr, off, size, link, info, entsize) in sections {
        let w = |v: u64, o: &mut Vec<u8>| {
            if is64 {
                o.extend_from_slice(&v.to_le_bytes())
            } else {
                o.extend_from_slice(&(v as u32).to_le_bytes())
            }
        };
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        w(flags, &mut out);
        w(addr, &mut out);
        w(off as u64, &mut out);
        w(size as u64, &mut out);
        out.extend_from_slice(&link.to_le_bytes());
        out.extend_from_slice(&info.to_le_bytes());
        w(if ty == 1 { 16 } else { 8 }, &mut out);
        w(entsize, &mut out);
    }
    let _ = shsize;
    // ELF header.
    let mut h = Vec::new();
    h.extend_from_slice(b"\x7fELF");
    h.extend_from_slice(&[if is64 { 2 } else { 1 }, 1, 1, 0]);
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h.extend_from_slice(&(if is64 { 62u16 } else { 3 }).to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    let entry = base + text_off as u64;
    let w = |v: u64, o: &mut Vec<u8>| {
        if is64 {
            o.extend_from_slice(&v.to_le_bytes())
        } else {
            o.extend_from_slice(&(v as u32).to_le_bytes())
        }
    };
    w(entry, &mut h);
    w(ehsize as u64, &mut h); // phoff
    w(shoff as u64, &mut h);
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&(ehsize as u16).to_le_bytes());
    h.extend_from_slice(&(phsize as u16).to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&(if is64 { 64u16 } else { 40 }).to_le_bytes());
    h.extend_from_slice(&5u16.to_le_bytes());
    h.extend_from_slice(&4u16.to_le_bytes());
    // Program header: one PT_LOAD R+X over the code.
    let (poff, psize) = (text_off as u64, text.len() as u64);
    if is64 {
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&5u32.to_le_bytes());
        for v in [poff, base + poff, base + poff, psize, psize, 0x1000] {
            h.extend_from_slice(&v.to_le_bytes());
        }
    } else {
        h.extend_from_slice(&1u32.to_le_bytes());
        for v in [poff, base + poff, base + poff, psize, psize] {
            h.extend_from_slice(&(v as u32).to_le_bytes());
        }
        h.extend_from_slice(&5u32.to_le_bytes());
        h.extend_from_slice(&0x1000u32.to_le_bytes());
    }
    out[..h.len()].copy_from_slice(&h);
    out
}

/// Exiting instructions per exiting function (IN, OUT, RDMSR, WRMSR, CPUID, two CR3
/// moves, RDTSC) and functions in an image made by [`elf`].
pub const EXITS_PER_FUNCTION: usize = 8;
