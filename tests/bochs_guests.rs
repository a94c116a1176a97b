//! Small hand-made guests on the VT-x hypervisor in Bochs: a guest's misbehaviour
//! and a fault in the hypervisor are diagnosed, 32-bit and PAE guests, timer
//! interrupts in HLT, string port I/O, HLT with interrupts off. Needs Bochs and the
//! GRUB tools (`.ci/install-bochs.sh`); helpers in tests/support/bochs.rs.

mod support;

use support::bochs::*;

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn guest_misbehaviour_stops_the_guest_with_a_diagnosis() {
    let dir = scratch("misbehave");
    // A write far outside the guest's 16 MiB of RAM (inside its identity map).
    #[rustfmt::skip]
    let wild_write = elf64_at_1mib(&[
        0xb8, 0x00, 0x00, 0x00, 0x40,             // mov eax, 0x40000000
        0xc6, 0x00, 0x2a,                         // mov byte [rax], 42
        0xf4,                                     // hlt
    ]);
    // An exception with no IDT: #UD, then #GP delivering it, then a triple fault.
    let triple = elf64_at_1mib(&[0x0f, 0x0b, 0xf4]); // ud2; hlt
    let (a, b) = (dir.join("wild.elf"), dir.join("triple.elf"));
    std::fs::write(&a, wild_write).unwrap();
    std::fs::write(&b, triple).unwrap();
    let jobs: Vec<Job<String>> = vec![
        Box::new(move || run_bochs_failing(&a)),
        Box::new(move || run_bochs_failing(&b)),
    ];
    let r = parallel(jobs);
    assert!(
        r[0].contains("EPT violation") && r[0].contains("0x40000000"),
        "{}",
        r[0]
    );
    assert!(r[0].contains("write"), "{}", r[0]);
    assert!(r[1].contains("triple fault"), "{}", r[1]);
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_32_bit_guest_runs_in_protected_mode_under_unrestricted_guest() {
    let dir = scratch("elf32");
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'3', 0xee,       // mov al, '3'; out dx, al
        0xb0, b'2', 0xee,       // mov al, '2'; out dx, al
        0x31, 0xc0, 0x0f, 0xa2, // xor eax, eax; cpuid
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'\n', 0xee,      // mov al, '\n'; out dx, al
        0x31, 0xc0, 0xe6, 0xf4, // xor eax, eax; out 0xf4, al
        0xf4,                   // hlt
    ];
    let elf = dir.join("g32.elf");
    std::fs::write(&elf, elf32_at_1mib(&code)).unwrap();
    let pre = dir.join("g32.pre.elf");
    link(&elf, &pre);
    let r = off_and_aot_dynamic(&pre);
    assert_eq!(String::from_utf8_lossy(&r[0].console), "32\n");
    assert_eq!(r[1].console, r[0].console);
    assert_eq!(r[0].record["exits_by_reason"]["cpuid"], 1);
    assert!(
        r[1].exits() < r[0].exits(),
        "{} vs {}",
        r[1].exits(),
        r[0].exits()
    );
}

/// A 64-bit guest that takes timer interrupts: it programs the PIC (IRQ0 at vector
/// 0x20, others masked) and PIT channel 0 (mode 2, about 1 ms), then waits with
/// `sti; hlt` until its handler has counted 5 ticks, and prints `K`.
fn interrupt_guest() -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const HANDLER: u64 = BASE + 75;
    #[rustfmt::skip]
    let code: [u8; 90] = [
        0x48, 0xc7, 0xc4, 0x00, 0x00, 0x18, 0x00,       //  0: mov rsp, 0x180000
        0x0f, 0x01, 0x1c, 0x25, 0x10, 0x04, 0x10, 0x00, //  7: lidt [0x100410]
        0xb0, 0x11, 0xe6, 0x20,                         // 15: PIC ICW1
        0xb0, 0x20, 0xe6, 0x21,                         // 19: ICW2: vectors 0x20..
        0xb0, 0x04, 0xe6, 0x21,                         // 23: ICW3
        0xb0, 0x01, 0xe6, 0x21,                         // 27: ICW4
        0xb0, 0xfe, 0xe6, 0x21,                         // 31: mask all but IRQ0
        0xb0, 0x34, 0xe6, 0x43,                         // 35: PIT ch0, lo/hi, mode 2
        0xb0, 0xa9, 0xe6, 0x40,                         // 39: count 0x04a9 (1 ms)
        0xb0, 0x04, 0xe6, 0x40,                         // 43
        0xfb,                                           // 47: wait: sti
        0xf4,                                           // 48: hlt
        0x83, 0x3c, 0x25, 0x00, 0x04, 0x10, 0x00, 0x05, // 49: cmp dword [0x100400], 5
        0x72, 0xf4,                                     // 57: jb wait
        0xfa,                                           // 59: cli
        0x66, 0xba, 0xf8, 0x03,                         // 60: mov dx, 0x3f8
        0xb0, b'K', 0xee,                               // 64: out 'K'
        0xb0, b'\n', 0xee,                              // 67: out '\n'
        0x31, 0xc0, 0xe6, 0xf4,                         // 70: exit 0
        0xf4,                                           // 74: hlt
        0x50,                                           // 75: handler: push rax
        0xff, 0x04, 0x25, 0x00, 0x04, 0x10, 0x00,       // 76: inc dword [0x100400]
        0xb0, 0x20, 0xe6, 0x20,                         // 83: EOI
        0x58,                                           // 87: pop rax
        0x48, 0xcf,                                     // 88: iretq
    ];
    let mut seg = vec![0u8; 0x420];
    seg[..code.len()].copy_from_slice(&code);
    // IDT at BASE + 0x100; the gate for vector 0x20 (64-bit interrupt gate, CS 0x08).
    let gate =
        (HANDLER & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((HANDLER >> 16) & 0xffff) << 48);
    let at = 0x100 + 0x20 * 16;
    seg[at..at + 8].copy_from_slice(&gate.to_le_bytes());
    seg[at + 8..at + 16].copy_from_slice(&(HANDLER >> 32).to_le_bytes());
    // IDTR at BASE + 0x410.
    seg[0x410..0x412].copy_from_slice(&(0x21u16 * 16 - 1).to_le_bytes());
    seg[0x412..0x41a].copy_from_slice(&(BASE + 0x100).to_le_bytes());
    elf64_at_1mib(&seg)
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_guest_waiting_in_hlt_gets_its_timer_interrupts() {
    let dir = scratch("irq");
    let elf = dir.join("irq.elf");
    std::fs::write(&elf, interrupt_guest()).unwrap();
    let pre = dir.join("irq.pre.elf");
    link(&elf, &pre);
    let r = off_and_aot_dynamic(&pre);
    for run in &r {
        assert_eq!(
            String::from_utf8_lossy(&run.console),
            "K\n",
            "{}",
            run.record
        );
        assert_eq!(
            run.record["backend_stats"]["interrupts"], 5,
            "{}",
            run.record
        );
        assert!(run.record["exits_by_reason"]["hlt"].as_u64().unwrap() >= 1);
    }
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_fault_in_the_hypervisor_itself_is_diagnosed_by_its_exception_stubs() {
    let dir = scratch("selftest");
    let elf = dir.join("smc.elf");
    std::fs::write(&elf, self_modifying_guest()).unwrap();
    let err = run_bochs_failing_with(&elf, &[("AVEX_VMX_OPTIONS", "selftest=ud2")]);
    assert!(
        err.contains("hypervisor exception 6 (invalid opcode)"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn string_port_io_is_completed_by_the_hypervisor() {
    let dir = scratch("stringio");
    #[rustfmt::skip]
    let mut code = vec![
        0x48, 0x8d, 0x35, 0x39, 0x00, 0x00, 0x00, //  0: lea rsi, [rip + msg]
        0xb9, 0x06, 0x00, 0x00, 0x00,             //  7: mov ecx, 6
        0x66, 0xba, 0xf8, 0x03,                   // 12: mov dx, 0x3f8
        0xf3, 0x6e,                               // 16: rep outsb
        0x48, 0x8d, 0x3d, 0x37, 0x00, 0x00, 0x00, // 18: lea rdi, [rip + buf]
        0xb9, 0x02, 0x00, 0x00, 0x00,             // 25: mov ecx, 2
        0x66, 0xba, 0xfd, 0x03,                   // 30: mov dx, 0x3fd (LSR)
        0xf3, 0x6c,                               // 34: rep insb
        0x48, 0x8d, 0x35, 0x25, 0x00, 0x00, 0x00, // 36: lea rsi, [rip + buf]
        0xb9, 0x02, 0x00, 0x00, 0x00,             // 43: mov ecx, 2
        0x66, 0xba, 0xf8, 0x03,                   // 48: mov dx, 0x3f8
        0xf3, 0x6e,                               // 52: rep outsb
        0xb0, b'\n', 0xee,                        // 54: out '\n'
        0x31, 0xc0, 0xe6, 0xf4,                   // 57: exit 0
        0xf4,                                     // 61: hlt
    ];
    code.resize(96, 0);
    code[64..70].copy_from_slice(b"hello\n"); // msg; buf at 80
    let elf = dir.join("sio.elf");
    std::fs::write(&elf, elf64_at_1mib(&code)).unwrap();
    let pre = dir.join("sio.pre.elf");
    link(&elf, &pre);
    let r = off_and_aot_dynamic(&pre);
    // The LSR reads back THR-empty | transmitter-empty (0x60, a backquote) twice.
    assert_eq!(String::from_utf8_lossy(&r[0].console), "hello\n``\n");
    assert_eq!(r[1].console, r[0].console);
    assert_eq!(r[0].record["exits_by_reason"]["outs"], 2, "{}", r[0].record);
    assert_eq!(r[0].record["exits_by_reason"]["ins"], 1, "{}", r[0].record);
}

/// A 32-bit guest that turns on PAE paging and reads through it (see its source).
const PAE_GUEST: &str = include_str!("shapes/vmx_pae32.S");

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_32_bit_pae_guest_runs_with_the_pdptes_of_its_last_cr3_write() {
    let dir = scratch("pae");
    let elf = assemble32(&dir, "pae", PAE_GUEST);
    let pre = dir.join("pae.pre.elf");
    link(&elf, &pre);
    let runs = runs_in_modes(&pre, &MODES);
    let diffs = differences_from_off("pae", &MODES, &runs);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let off = runs[0].as_ref().unwrap();
    assert_eq!(String::from_utf8_lossy(&off.console), "pae:ABAB\n");
    assert_eq!(off.record["status"], 0);
}

/// A 32-bit guest that prints a line, then halts with interrupts off.
const HALT_GUEST: &str = include_str!("shapes/vmx_halt.S");

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn hlt_with_interrupts_off_ends_the_run_with_status_0_halted() {
    let dir = scratch("halt");
    let elf = assemble32(&dir, "halt", HALT_GUEST);
    let r = try_run_bochs(&elf, "off").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(String::from_utf8_lossy(&r.console), "halting\n");
    assert_eq!(r.record["status"], 0, "{}", r.record);
    assert_eq!(r.record["backend_stats"]["halted"], 1, "{}", r.record);
}
