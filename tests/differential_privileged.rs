//! Differential test of the engine's privileged gap fillers against a guest running
//! them under /dev/kvm: MOV from CR0/CR2/CR3/CR4/CR8 (every destination register,
//! every ModRM `mod` value, which the CPU ignores), INVLPG (several address forms),
//! PAUSE, and the interrupt flag's instructions at CPL 0: CLI, STI (with the
//! instruction in its shadow), POPF loading IF and IOPL, PUSHF with IF set or
//! clear (each case may be a short sequence; a run that ends because interrupts
//! became enabled ends at the sequence's end all the same). XGETBV is checked against this process's CPU instead (it is not
//! privileged): the software KVM on this project's host cannot emulate it
//! (`KVM_EXIT_INTERNAL_ERROR`, see PLATFORM.md), so a guest cannot run it here.
//!
//! One tiny ELF64 guest (built here, booted by the boot ABI) runs every case: it
//! loads random inputs into all GPRs and RFLAGS, executes the instruction, stores
//! all GPRs and RFLAGS into a result table in its RAM, and finally ends through the
//! debug-exit port. Then, on the same vCPU (`KvmGuest`, the backend's `Guest`), each
//! case's instruction is decoded, lowered and run by the engine from the same inputs,
//! and its registers are compared with the guest's.

use avex_core::engine::{self, RunLimits, StopReason};
use avex_core::exit::Mode;
use avex_core::guest::Guest;
use avex_core::ir::{Bitness, Cluster, Insn};
use avex_core::lower;
use avex_kvm::{Config, Vm};
use iced_x86::{Code, Decoder, DecoderOptions, Encoder, Instruction, MemoryOperand, Register};
use std::sync::atomic::AtomicBool;

const CODE: u64 = 0x10_0000;
const RESULTS: u64 = 0x18_0000;
const STACK: u64 = 0x1f_0000;
/// 16 GPRs and RFLAGS per case.
const SLOTS: u64 = 17;
const STATUS: u64 = 0x8d5;
/// DF, IF, IOPL, NT and ID: what POPF loads at CPL 0 beyond the status flags
/// (TF and AC stay clear: a trap and alignment checks are not what is compared).
const SYSTEM_FLAGS: u64 = 0x0020_7600;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Case {
    /// The instruction's bytes.
    bytes: Vec<u8>,
    gpr: [u64; 16],
    rflags: u64,
    /// Flags the instruction leaves undefined (not compared).
    undefined: u64,
    /// Guest address of the instruction (set when the guest is assembled).
    rip: u64,
}

fn gpr64(i: u64) -> Register {
    Register::try_from(Register::RAX as usize + i as usize).unwrap()
}

/// MOV r64, CRn as raw bytes: REX.R selects CR8, REX.B R8-R15, `mod` is ignored.
fn mov_from_cr(cr: u8, reg: u64, md: u8) -> Vec<u8> {
    let rex = 0x40 | if cr == 8 { 4 } else { 0 } | if reg >= 8 { 1 } else { 0 };
    let mut b = Vec::new();
    if rex != 0x40 {
        b.push(rex);
    }
    b.extend([0x0f, 0x20, (md << 6) | ((cr & 7) << 3) | (reg as u8 & 7)]);
    b
}

fn encode(i: Instruction) -> Vec<u8> {
    let mut e = Encoder::new(64);
    e.encode(&i, CODE).expect("encodable");
    e.take_buffer()
}

fn cases(rng: &mut Rng, xsave: bool) -> Vec<Case> {
    let mut forms: Vec<(Vec<u8>, u64)> = Vec::new();
    for cr in [0u8, 2, 3, 4, 8] {
        for reg in 0..16 {
            if reg != 4 {
                // MOV CR leaves the status flags undefined.
                forms.push((mov_from_cr(cr, reg, rng.below(4) as u8), STATUS));
            }
        }
    }
    if xsave {
        for _ in 0..4 {
            forms.push((vec![0x0f, 0x01, 0xd0], 0));
        }
    }
    let mems = [
        MemoryOperand::with_base(Register::RAX),
        MemoryOperand::with_base_index_scale_displ_size(Register::R12, Register::R13, 8, 0x10, 1),
        MemoryOperand::with_base_displ(Register::RIP, 0x12_3456),
        MemoryOperand::with_displ(0x7000, 8),
        MemoryOperand::new(Register::RBX, Register::None, 1, -8, 1, false, Register::FS),
        MemoryOperand::with_base_displ_size(Register::EDI, 0x40, 1),
    ];
    for m in mems {
        forms.push((encode(Instruction::with1(Code::Invlpg_m, m).unwrap()), 0));
    }
    forms.push((vec![0xf3, 0x90], 0));
    // The interrupt flag's instructions (inputs with IF set or clear, below):
    // cli; sti + inc rbx; pushfq + pop rbx; push rbx + popfq (RBX random flags).
    let if_forms: [&[u8]; 4] = [
        &[0xfa],
        &[0xfb, 0x48, 0xff, 0xc3],
        &[0x9c, 0x5b],
        &[0x53, 0x9d],
    ];
    for _ in 0..4 {
        forms.extend(if_forms.iter().map(|b| (b.to_vec(), 0)));
    }
    forms
        .into_iter()
        .map(|(bytes, undefined)| {
            let if_case = if_forms.contains(&bytes.as_slice());
            let mut gpr = [0u64; 16];
            for g in gpr.iter_mut() {
                *g = rng.next();
            }
            gpr[4] = STACK - 8 * rng.below(16);
            if bytes == [0x0f, 0x01, 0xd0] {
                // XCR0 (ECX = 0); RCX's upper half is not part of the index.
                gpr[1] = rng.next() << 32;
            }
            if bytes == [0x53, 0x9d] {
                gpr[3] = 0x2 | (rng.next() & (STATUS | SYSTEM_FLAGS));
            }
            let if_flag = if if_case { rng.next() & 0x200 } else { 0 };
            Case {
                bytes,
                gpr,
                rflags: 0x2 | (rng.next() & STATUS) | if_flag,
                undefined,
                rip: 0,
            }
        })
        .collect()
}

/// The guest: OSXSAVE on (when the host has XSAVE), CR8 = 5, every case, then
/// `out 0xf4, al` with AL = 0.
fn assemble(cases: &mut [Case], xsave: bool) -> Vec<u8> {
    use Register::*;
    let mut code = Vec::new();
    let push = |code: &mut Vec<u8>, list: &[Instruction]| {
        let mut e = Encoder::new(64);
        let mut ip = CODE + code.len() as u64;
        for i in list {
            ip += e.encode(i, ip).expect("encodable") as u64;
        }
        code.extend(e.take_buffer());
    };
    let mut pre = vec![
        Instruction::with2(Code::Mov_r64_imm64, RAX, 5u64).unwrap(),
        Instruction::with2(Code::Mov_cr_r64, CR8, RAX).unwrap(),
    ];
    if xsave {
        pre.push(Instruction::with2(Code::Mov_r64_cr, RAX, CR4).unwrap());
        pre.push(Instruction::with2(Code::Bts_rm64_imm8, RAX, 18).unwrap());
        pre.push(Instruction::with2(Code::Mov_cr_r64, CR4, RAX).unwrap());
    }
    push(&mut code, &pre);
    for (k, c) in cases.iter_mut().enumerate() {
        let mut l = vec![
            Instruction::with2(Code::Mov_r64_imm64, RSP, STACK).unwrap(),
            Instruction::with2(Code::Mov_r64_imm64, RAX, c.rflags).unwrap(),
            Instruction::with1(Code::Push_r64, RAX).unwrap(),
            Instruction::with(Code::Popfq),
        ];
        for i in 0..16u64 {
            l.push(Instruction::with2(Code::Mov_r64_imm64, gpr64(i), c.gpr[i as usize]).unwrap());
        }
        push(&mut code, &l);
        c.rip = CODE + code.len() as u64;
        code.extend(&c.bytes);
        let slot = |i: u64| {
            let a = RESULTS + (k as u64 * SLOTS + i) * 8;
            MemoryOperand::with_base_displ(Register::RIP, a as i64)
        };
        let mut l: Vec<Instruction> = (0..16u64)
            .map(|i| Instruction::with2(Code::Mov_rm64_r64, slot(i), gpr64(i)).unwrap())
            .collect();
        l.push(Instruction::with2(Code::Mov_r64_imm64, RSP, STACK).unwrap());
        l.push(Instruction::with(Code::Pushfq));
        l.push(Instruction::with1(Code::Pop_r64, RAX).unwrap());
        l.push(Instruction::with2(Code::Mov_rm64_r64, slot(16), RAX).unwrap());
        push(&mut code, &l);
    }
    push(
        &mut code,
        &[
            Instruction::with2(Code::Mov_r32_imm32, EAX, 0).unwrap(),
            Instruction::with2(Code::Out_imm8_AL, 0xf4, AL).unwrap(),
            Instruction::with(Code::Hlt),
        ],
    );
    code
}

/// A static ELF64 with one loadable segment at `CODE` (results and stack zeroed).
fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(62u16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes());
    e.extend(CODE.to_le_bytes()); // entry
    e.extend(64u64.to_le_bytes()); // phoff
    e.extend(0u64.to_le_bytes()); // shoff
    e.extend(0u32.to_le_bytes());
    e.extend(
        [64u16, 56, 1, 64, 0, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes()),
    );
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(7u32.to_le_bytes()); // RWX
    e.extend(0x1000u64.to_le_bytes());
    e.extend(CODE.to_le_bytes());
    e.extend(CODE.to_le_bytes());
    e.extend((code.len() as u64).to_le_bytes());
    e.extend((STACK + 0x1000 - CODE).to_le_bytes());
    e.extend(0x1000u64.to_le_bytes());
    e.resize(0x1000, 0);
    e.extend(code);
    e
}

#[test]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn privileged_gap_fillers_match_a_kvm_guest() {
    let xsave = core::arch::x86_64::__cpuid(1).ecx & (1 << 26) != 0;
    let mut rng = Rng(0x9e1f_0a5e);
    let mut all = Vec::new();
    for _ in 0..4 {
        all.extend(cases(&mut rng, false));
    }
    let code = assemble(&mut all, xsave);
    let image = elf(&code);
    let config = Config {
        mode: Mode::Off,
        ..Config::default()
    };
    let mut vm = Vm::new(&image, &config).expect("create the VM");
    let report = vm
        .run(&mut |_| {}, &AtomicBool::new(false), 60.0)
        .expect("run the guest");
    assert_eq!(report.status, 0, "guest status");
    let guest = vm.guest_mut();
    // The guest ended by writing the debug-exit port; the engine refuses to run
    // for a guest that asked to stop, so take the request back for the cases.
    guest
        .bus_mut()
        .device_mut::<avex_core::devices::DebugExit>()
        .expect("the standard board has a debug-exit device")
        .reset();
    let results = guest.ram().as_slice()[RESULTS as usize..][..all.len() * SLOTS as usize * 8]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect::<Vec<_>>();
    let base = guest.state();
    assert_eq!(base.cr8, 5, "the guest set CR8");
    let (mut compared, mut mismatches) = (0, Vec::new());
    for (k, c) in all.iter().enumerate() {
        let cpu = &results[k * SLOTS as usize..][..SLOTS as usize];
        let insns: Vec<Insn> = Decoder::with_ip(64, &c.bytes, c.rip, DecoderOptions::NONE)
            .into_iter()
            .map(|d| Insn {
                rip: d.ip(),
                len: d.len() as u8,
                op: lower::lower(&d).unwrap_or_else(|e| panic!("lower {:02x?}: {e:?}", c.bytes)),
                exit_class: None,
            })
            .collect();
        let d = Decoder::with_ip(64, &c.bytes, c.rip, DecoderOptions::NONE).decode();
        let cluster = Cluster::contiguous(Bitness::B64, c.rip, c.bytes.clone(), insns, Vec::new());
        let mut st = base.clone();
        st.gpr = c.gpr;
        st.rflags = c.rflags;
        st.rip = c.rip;
        guest.set_state(&st);
        let out = engine::run(&cluster, guest, 0, &RunLimits::default());
        let after = guest.state();
        let mut diff = String::new();
        let ended = matches!(out.reason, StopReason::End | StopReason::InterruptWindow);
        if !ended || out.rip != cluster.highest_end() {
            diff += &format!(" stop {:?} at {:#x};", out.reason, out.rip);
        }
        for (i, (&e, &n)) in after.gpr.iter().zip(cpu).enumerate() {
            if e != n {
                diff += &format!(" {:?}: engine {e:#x} cpu {n:#x};", gpr64(i as u64));
            }
        }
        let mask = !c.undefined & 0xffff_ffff;
        if (after.rflags ^ cpu[16]) & mask != 0 {
            diff += &format!(" rflags: engine {:#x} cpu {:#x};", after.rflags, cpu[16]);
        }
        compared += 1;
        if !diff.is_empty() {
            mismatches.push(format!("{:02x?} ({d}):{diff}", c.bytes));
        }
    }
    println!(
        "differential_privileged: {compared} cases, {} mismatches",
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "engine and KVM guest disagree:\n{}",
        mismatches.join("\n")
    );
}

/// XGETBV(0) with random inputs, natively in this process and in the engine on a
/// `TestGuest` whose XCR0 is this CPU's: EDX:EAX, zero-extended, RCX untouched.
#[test]
fn xgetbv_matches_the_cpu() {
    use avex_core::engine::test_guest::TestGuest;
    if core::arch::x86_64::__cpuid(1).ecx & (1 << 27) == 0 {
        panic!("the host has no OSXSAVE: XGETBV cannot be compared");
    }
    let mut rng = Rng(0x8e7b_0001);
    let bytes = [0x0f, 0x01, 0xd0];
    let rip = 0x1000u64;
    let d = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE).decode();
    let op = lower::lower(&d).expect("XGETBV lowers");
    let cluster = Cluster::contiguous(
        Bitness::B64,
        rip,
        bytes.to_vec(),
        vec![Insn {
            rip,
            len: 3,
            op,
            exit_class: None,
        }],
        Vec::new(),
    );
    let mut g = TestGuest::long_mode(1 << 20);
    g.map_range(0x1000, 0x1000, 0x1000, 3);
    g.write_bytes(0x1000, &bytes);
    for _ in 0..1000 {
        let (rax, rcx, rdx) = (rng.next(), rng.next() << 32, rng.next());
        let (mut a, mut c, mut dd) = (rax, rcx, rdx);
        // SAFETY: XGETBV with ECX = 0 reads XCR0 (OSXSAVE is on, checked above).
        unsafe {
            core::arch::asm!("xgetbv", inout("rax") a, inout("rcx") c, inout("rdx") dd);
        }
        g.xcr0 = (a & 0xffff_ffff) | (dd << 32);
        g.state.gpr[0] = rax;
        g.state.gpr[1] = rcx;
        g.state.gpr[2] = rdx;
        g.state.rip = rip;
        let out = engine::run(&cluster, &mut g, 0, &RunLimits::default());
        assert_eq!(out.reason, StopReason::End);
        let e = &g.state.gpr;
        assert_eq!(
            (e[0], e[1], e[2]),
            (a, c, dd),
            "inputs rax {rax:#x} rcx {rcx:#x} rdx {rdx:#x}"
        );
    }
}
