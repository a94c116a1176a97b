//! The CPU side: sequences run in this process, in 64-bit mode, in 32-bit
//! compatibility mode (CS 0x23) or in a 16-bit code segment of this process's LDT,
//! with FS/GS bases of our choosing, and with faults caught.
//!
//! A case's bytes are placed at `SEQ_OFF` of an RWX mapping, between a prologue that
//! loads every GPR, RFLAGS and the segment state from a context and an epilogue that
//! stores them back. A SIGSEGV raised by the sequence is caught (on an alternate
//! stack: RSP points into the data buffer) and the handler resumes the epilogue with
//! the registers as they were at the fault, recording where and why it happened.

use super::Mode;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

// Code mapping layout (offsets).
pub const CODE_SIZE: usize = 0x3000;
pub const PRO32_OFF: u64 = 0x100;
/// Sequences cross a page boundary.
pub const SEQ_OFF: u64 = 0xfc0;
pub const EPI_OFF: u64 = 0x2000;
pub const EPI64_OFF: u64 = 0x2400;
/// Far pointers (m16:32): to the 32-bit prologue, back to 64-bit code.
const FAR_OFF: u64 = 0x2700;
/// gpr[16], rflags, host rsp, saved FS base, saved GS base, FS base, GS base.
pub const CTX_OFF: u64 = 0x2800;
const CTX_SLOTS: usize = 22;

// Data region: a 192 KiB reservation, the buffer at its middle so every 16-bit
// offset from a segment based up to 64 KiB below or above it stays inside.
const REGION: usize = 3 << 16;
const BUF_IN_REGION: usize = 1 << 16;
/// Bytes compared after each case: five read/write pages.
pub const BUF_SIZE: usize = 5 * 4096;
/// Page right after the data pages: inaccessible (not mapped in the engine's guest).
pub const GUARD_PAGE: u64 = 5;
/// Read-only page (mapped read-only in the engine's guest).
pub const RO_PAGE: u64 = 6;
/// Pages of the buffer the engine's guest maps (the guard page is left out).
pub const BUF_PAGES: u64 = 7;

pub const USER32_CS: u16 = 0x23;
const USER64_CS: u16 = 0x33;
pub const USER_DS: u16 = 0x2b;

/// Linear bases of the data segments a world's sequences use.
#[derive(Clone, Copy, Debug)]
pub struct Segs {
    /// DS and SS (0 except in 16-bit code, where they are based at the buffer).
    pub ds: u64,
    pub fs: u64,
    pub gs: u64,
    /// LDT selectors (0: none).
    pub cs16_sel: u16,
    pub ds16_sel: u16,
    pub fs_sel: u16,
    pub gs_sel: u16,
}

/// How a native run ended when the sequence faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeFault {
    /// RIP (IP in 16-bit code) of the faulting instruction.
    pub rip: u64,
    /// 12 (#SS), 13 (#GP) or 14 (#PF).
    pub trapno: u64,
    pub err: u64,
    pub cr2: u64,
}

pub struct NativeOut {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub fault: Option<NativeFault>,
}

pub struct Native {
    pub mode: Mode,
    code: *mut u8,
    buf: *mut u8,
    pub segs: Segs,
}

#[repr(C)]
struct UserDesc {
    entry_number: u32,
    base_addr: u32,
    limit: u32,
    /// seg_32bit:1 contents:2 read_exec_only:1 limit_in_pages:1 seg_not_present:1
    /// useable:1 lm:1
    flags: u32,
}

/// Installs LDT entry `n` and returns its selector (TI=1, RPL 3).
fn ldt_entry(n: u32, base: u64, limit: u32, bits32: bool, code: bool, pages: bool) -> u16 {
    assert!(base < 1 << 32, "LDT base above 4G");
    let d = UserDesc {
        entry_number: n,
        base_addr: base as u32,
        limit,
        flags: u32::from(bits32)
            | (if code { 2 << 1 } else { 0 })
            | (u32::from(pages) << 4)
            | (1 << 6),
    };
    // SAFETY: modify_ldt(1, desc, size) reads `d`, which outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_modify_ldt,
            1,
            &d as *const UserDesc,
            core::mem::size_of::<UserDesc>(),
        )
    };
    assert_eq!(
        r,
        0,
        "modify_ldt failed: {}",
        std::io::Error::last_os_error()
    );
    ((n << 3) | 7) as u16
}

fn mmap(len: usize, prot: i32, low: bool) -> *mut u8 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if low { libc::MAP_32BIT } else { 0 };
    // SAFETY: anonymous private mapping with no address hint; checked for failure.
    let p = unsafe { libc::mmap(core::ptr::null_mut(), len, prot, flags, -1, 0) };
    assert!(p != libc::MAP_FAILED, "mmap failed");
    p as *mut u8
}

fn mprotect(p: *mut u8, len: usize, prot: i32) {
    // SAFETY: `p..p+len` lies in a mapping this module made.
    assert_eq!(unsafe { libc::mprotect(p as *mut _, len, prot) }, 0);
}

/// FSGSBASE instructions usable in user mode (AT_HWCAP2 bit 1).
pub fn have_fsgsbase() -> bool {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(26) & 2 != 0 }
}

impl Native {
    /// `ldt`: the first of four LDT entries this world may use.
    pub fn new(mode: Mode, low: bool, ldt: u32) -> Native {
        let low = low || mode != Mode::M64;
        let code = mmap(
            CODE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            low,
        );
        let region = mmap(REGION, libc::PROT_NONE, low);
        // SAFETY: BUF_IN_REGION + 7 pages < REGION.
        let buf = unsafe { region.add(BUF_IN_REGION) };
        mprotect(buf, BUF_SIZE, libc::PROT_READ | libc::PROT_WRITE);
        // SAFETY: as above.
        let ro = unsafe { buf.add(RO_PAGE as usize * 4096) };
        mprotect(ro, 4096, libc::PROT_READ | libc::PROT_WRITE);
        for k in 0..4096 {
            // SAFETY: inside the page just made writable.
            unsafe { *ro.add(k) = (k as u8).wrapping_mul(37) ^ 0x5a };
        }
        mprotect(ro, 4096, libc::PROT_READ);
        let b = buf as u64;
        let segs = match mode {
            Mode::M64 => Segs {
                ds: 0,
                fs: b + 0x2000,
                gs: b.wrapping_sub(0x4000_0000),
                cs16_sel: 0,
                ds16_sel: 0,
                fs_sel: 0,
                gs_sel: 0,
            },
            Mode::M32 => {
                // FS wraps around 4G to reach the buffer; GS serves 16-bit addresses.
                let fs = (b + 0x8000_0000) & 0xffff_ffff;
                let gs = b - 0x8000;
                Segs {
                    ds: 0,
                    fs,
                    gs,
                    cs16_sel: 0,
                    ds16_sel: 0,
                    fs_sel: ldt_entry(ldt, fs, 0xfffff, true, false, true),
                    gs_sel: ldt_entry(ldt + 1, gs, 0xfffff, true, false, true),
                }
            }
            Mode::M16 => {
                let (fs, gs) = (b - 0x8000, b - 0x3000);
                Segs {
                    ds: b,
                    fs,
                    gs,
                    cs16_sel: ldt_entry(ldt, code as u64, 0xffff, false, true, false),
                    ds16_sel: ldt_entry(ldt + 1, b, 0xffff, false, false, false),
                    fs_sel: ldt_entry(ldt + 2, fs, 0xffff, false, false, false),
                    gs_sel: ldt_entry(ldt + 3, gs, 0xffff, false, false, false),
                }
            }
        };
        let mut n = Native {
            mode,
            code,
            buf,
            segs,
        };
        if mode == Mode::M64 {
            n.write_code(0, &n.prologue64());
            n.write_code(EPI_OFF, &n.epilogue64());
        } else {
            assert!(n.base() + CODE_SIZE as u64 <= 1 << 32 && b + (REGION as u64) < 1 << 32);
            n.write_code(0, &n.prologue64());
            n.write_code(PRO32_OFF, &n.prologue32());
            n.write_code(EPI_OFF, &n.epilogue32());
            n.write_code(EPI64_OFF, &n.epilogue64());
            let mut far = Vec::new();
            far.extend(((n.base() + PRO32_OFF) as u32).to_le_bytes());
            far.extend(USER32_CS.to_le_bytes());
            far.extend([0, 0]);
            far.extend(((n.base() + EPI64_OFF) as u32).to_le_bytes());
            far.extend(USER64_CS.to_le_bytes());
            n.write_code(FAR_OFF, &far);
        }
        let (fs, gs) = (n.segs.fs, n.segs.gs);
        let ctx = n.ctx();
        ctx[20] = fs;
        ctx[21] = gs;
        n
    }

    /// Linear address of the code mapping (CS base in 16-bit code).
    pub fn base(&self) -> u64 {
        self.code as u64
    }
    /// Linear address of the data buffer.
    pub fn buf_va(&self) -> u64 {
        self.buf as u64
    }
    /// Address of the sequence as the code sees it (an offset in 16-bit code).
    pub fn seq_ip(&self) -> u64 {
        match self.mode {
            Mode::M16 => SEQ_OFF,
            _ => self.base() + SEQ_OFF,
        }
    }

    fn write_code(&self, off: u64, bytes: &[u8]) {
        assert!(off as usize + bytes.len() <= CODE_SIZE);
        // SAFETY: in bounds of the CODE_SIZE mapping (checked above).
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.code.add(off as usize), bytes.len())
        }
    }
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the first BUF_SIZE bytes are read/write, private to this test.
        unsafe { core::slice::from_raw_parts_mut(self.buf, BUF_SIZE) }
    }
    /// The read-only page's bytes.
    pub fn ro_page(&self) -> &[u8] {
        // SAFETY: the page is mapped readable and never changes.
        unsafe { core::slice::from_raw_parts(self.buf.add(RO_PAGE as usize * 4096), 4096) }
    }
    fn ctx(&mut self) -> &mut [u64; CTX_SLOTS] {
        // SAFETY: CTX_OFF + 8*CTX_SLOTS is inside the code mapping, 8-byte aligned;
        // only this single-threaded test touches it.
        unsafe { &mut *(self.code.add(CTX_OFF as usize) as *mut [u64; CTX_SLOTS]) }
    }

    fn enc(bits: u32, ip: u64, list: &[Instruction]) -> Vec<u8> {
        let mut e = Encoder::new(bits);
        let mut ip = ip;
        for i in list {
            ip += e.encode(i, ip).expect("harness encoding") as u64;
        }
        e.take_buffer()
    }

    /// RIP-relative context slot (64-bit code).
    fn ctx_rip(&self, slot: u64) -> MemoryOperand {
        MemoryOperand::with_base_displ(Register::RIP, (self.base() + CTX_OFF + slot * 8) as i64)
    }
    /// Absolute context slot through ES (flat in 32- and 16-bit worlds' 32-bit stubs).
    fn ctx_es(&self, slot: u64) -> MemoryOperand {
        let a = (self.base() + CTX_OFF + slot * 8) as i64;
        MemoryOperand::new(Register::None, Register::None, 1, a, 4, false, Register::ES)
    }

    /// 64-bit entry: saves the host's callee-saved registers, RSP and FS/GS bases,
    /// installs the world's FS/GS bases, then loads the context (64-bit world) or
    /// jumps to the 32-bit prologue.
    fn prologue64(&self) -> Vec<u8> {
        use Register::*;
        let i1 = |c, r| Instruction::with1(c, r).unwrap();
        let mut l = Vec::new();
        for r in [RBX, RBP, R12, R13, R14, R15] {
            l.push(i1(Code::Push_r64, r));
        }
        let m = |s| self.ctx_rip(s);
        l.push(Instruction::with2(Code::Mov_rm64_r64, m(17), RSP).unwrap());
        l.push(i1(Code::Rdfsbase_r64, RAX));
        l.push(Instruction::with2(Code::Mov_rm64_r64, m(18), RAX).unwrap());
        l.push(i1(Code::Rdgsbase_r64, RAX));
        l.push(Instruction::with2(Code::Mov_rm64_r64, m(19), RAX).unwrap());
        if self.mode != Mode::M64 {
            let far = MemoryOperand::with_base_displ(Register::RIP, (self.base() + FAR_OFF) as i64);
            l.push(Instruction::with1(Code::Jmp_m1632, far).unwrap());
            return Self::enc(64, self.base(), &l);
        }
        l.push(Instruction::with2(Code::Mov_r64_rm64, RAX, m(20)).unwrap());
        l.push(i1(Code::Wrfsbase_r64, RAX));
        l.push(Instruction::with2(Code::Mov_r64_rm64, RAX, m(21)).unwrap());
        l.push(i1(Code::Wrgsbase_r64, RAX));
        l.push(Instruction::with2(Code::Lea_r64_m, RSP, m(16)).unwrap());
        l.push(Instruction::with(Code::Popfq));
        for i in 0..16u64 {
            if i != 4 {
                l.push(Instruction::with2(Code::Mov_r64_rm64, gpr64(i), m(i)).unwrap());
            }
        }
        l.push(Instruction::with2(Code::Mov_r64_rm64, RSP, m(4)).unwrap());
        l.push(Instruction::with_branch(Code::Jmp_rel32_64, self.base() + SEQ_OFF).unwrap());
        Self::enc(64, self.base(), &l)
    }

    /// 64-bit exit: stores the context (64-bit world), restores FS/GS and the host.
    fn epilogue64(&self) -> Vec<u8> {
        use Register::*;
        let m = |s| self.ctx_rip(s);
        let mut l = Vec::new();
        let ip = if self.mode == Mode::M64 {
            for i in 0..16u64 {
                l.push(Instruction::with2(Code::Mov_rm64_r64, m(i), gpr64(i)).unwrap());
            }
            l.push(Instruction::with2(Code::Lea_r64_m, RSP, m(17)).unwrap());
            l.push(Instruction::with(Code::Pushfq));
            self.base() + EPI_OFF
        } else {
            // Back from 32-bit code: null FS/GS selectors, then the saved bases.
            l.push(Instruction::with2(Code::Xor_r32_rm32, EAX, EAX).unwrap());
            l.push(Instruction::with2(Code::Mov_Sreg_r32m16, FS, EAX).unwrap());
            l.push(Instruction::with2(Code::Mov_Sreg_r32m16, GS, EAX).unwrap());
            self.base() + EPI64_OFF
        };
        l.push(Instruction::with2(Code::Mov_r64_rm64, RAX, m(18)).unwrap());
        l.push(Instruction::with1(Code::Wrfsbase_r64, RAX).unwrap());
        l.push(Instruction::with2(Code::Mov_r64_rm64, RAX, m(19)).unwrap());
        l.push(Instruction::with1(Code::Wrgsbase_r64, RAX).unwrap());
        l.push(Instruction::with2(Code::Mov_r64_rm64, RSP, m(17)).unwrap());
        for r in [R15, R14, R13, R12, RBP, RBX] {
            l.push(Instruction::with1(Code::Pop_r64, r).unwrap());
        }
        l.push(Instruction::with(Code::Cld));
        l.push(Instruction::with(Code::Retnq));
        Self::enc(64, ip, &l)
    }

    /// 32-bit prologue (compatibility mode): segments, RFLAGS, GPRs, then the
    /// sequence (32-bit world) or a far jump into the 16-bit code segment.
    fn prologue32(&self) -> Vec<u8> {
        use Register::*;
        let sreg = |s, v: u16| {
            [
                Instruction::with2(Code::Mov_r32_imm32, EAX, v as u32).unwrap(),
                Instruction::with2(Code::Mov_Sreg_r32m16, s, EAX).unwrap(),
            ]
        };
        let mut l = Vec::new();
        l.extend(sreg(DS, USER_DS));
        l.extend(sreg(ES, USER_DS));
        let sp = (self.base() + CTX_OFF + 16 * 8) as u32;
        l.push(Instruction::with2(Code::Mov_r32_imm32, ESP, sp).unwrap());
        l.push(Instruction::with(Code::Popfd));
        l.extend(sreg(FS, self.segs.fs_sel));
        l.extend(sreg(GS, self.segs.gs_sel));
        if self.mode == Mode::M16 {
            l.extend(sreg(DS, self.segs.ds16_sel));
            l.extend(sreg(SS, self.segs.ds16_sel));
        }
        for i in 0..8u64 {
            if i != 4 {
                l.push(Instruction::with2(Code::Mov_r32_rm32, gpr(4, i), self.ctx_es(i)).unwrap());
            }
        }
        l.push(Instruction::with2(Code::Mov_r32_rm32, ESP, self.ctx_es(4)).unwrap());
        if self.mode == Mode::M16 {
            let j =
                Instruction::with_far_branch(Code::Jmp_ptr1632, self.segs.cs16_sel, SEQ_OFF as u32);
            l.push(j.unwrap());
        } else {
            l.push(Instruction::with_branch(Code::Jmp_rel32_32, self.base() + SEQ_OFF).unwrap());
        }
        Self::enc(32, self.base() + PRO32_OFF, &l)
    }

    /// 32-bit epilogue: stores the GPRs through ES (flat; DS/SS may be the 16-bit
    /// world's), then RFLAGS on a flat stack, then back to 64-bit code.
    fn epilogue32(&self) -> Vec<u8> {
        use Register::*;
        let mut l = Vec::new();
        for i in 0..8u64 {
            l.push(Instruction::with2(Code::Mov_rm32_r32, self.ctx_es(i), gpr(4, i)).unwrap());
        }
        l.push(Instruction::with2(Code::Mov_r32_imm32, EAX, USER_DS as u32).unwrap());
        l.push(Instruction::with2(Code::Mov_Sreg_r32m16, SS, EAX).unwrap());
        l.push(Instruction::with2(Code::Mov_Sreg_r32m16, DS, EAX).unwrap());
        let sp = (self.base() + CTX_OFF + 16 * 8 + 4) as u32;
        l.push(Instruction::with2(Code::Mov_r32_imm32, ESP, sp).unwrap());
        l.push(Instruction::with(Code::Pushfd));
        let far = MemoryOperand::with_displ(self.base() + FAR_OFF + 8, 4);
        l.push(Instruction::with1(Code::Jmp_m1632, far).unwrap());
        Self::enc(32, self.base() + EPI_OFF, &l)
    }

    /// The jump from the end of a sequence to the epilogue, in the sequence's mode.
    fn exit_jump(&self, at: u64) -> Vec<u8> {
        let i = match self.mode {
            Mode::M64 => Instruction::with_branch(Code::Jmp_rel32_64, self.base() + EPI_OFF),
            Mode::M32 => Instruction::with_branch(Code::Jmp_rel32_32, self.base() + EPI_OFF),
            Mode::M16 => {
                let off = (self.base() + EPI_OFF) as u32;
                Instruction::with_far_branch(Code::Jmp_ptr1632, USER32_CS, off)
            }
        };
        Self::enc(self.mode.bits(), at, &[i.unwrap()])
    }

    /// Runs `seq` (placed at SEQ_OFF, followed by a jump to the epilogue).
    pub fn run(&mut self, seq: &[u8], gpr: &[u64; 16], rflags: u64) -> NativeOut {
        let mut code = seq.to_vec();
        code.extend(self.exit_jump(self.seq_ip() + seq.len() as u64));
        self.write_code(SEQ_OFF, &code);
        let ctx = self.ctx();
        ctx[..16].copy_from_slice(gpr);
        ctx[16] = rflags;
        ctx[17] = 0;
        let cs16 = if self.mode == Mode::M16 {
            self.segs.cs16_sel as u64
        } else {
            0
        };
        ARMED_BASE.store(self.base(), SeqCst);
        ARMED_CS16.store(cs16, SeqCst);
        FAULT_RIP.store(u64::MAX, SeqCst);
        // SAFETY: the mapping holds the prologue (saves callee-saved registers, the
        // host RSP and FS/GS bases, loads the context), the sequence (generated to
        // touch only the data region, to branch only inside itself, and to fault only
        // where the SIGSEGV handler resumes the epilogue) and the epilogue (stores
        // the context, restores the host state, clears DF, returns).
        unsafe {
            let f: extern "sysv64" fn() = core::mem::transmute(self.code);
            f();
        }
        ARMED_BASE.store(0, SeqCst);
        let mode = self.mode;
        let ctx = self.ctx();
        let mut out = [0; 16];
        out.copy_from_slice(&ctx[..16]);
        let mut rflags = ctx[16];
        if mode != Mode::M64 {
            // The 32-bit epilogue stored dwords over the inputs: keep the low halves.
            for v in out.iter_mut() {
                *v &= 0xffff_ffff;
            }
            rflags &= 0xffff_ffff;
        }
        let rip = FAULT_RIP.load(SeqCst);
        let fault = (rip != u64::MAX).then(|| NativeFault {
            rip,
            trapno: FAULT_TRAPNO.load(SeqCst),
            err: FAULT_ERR.load(SeqCst),
            cr2: FAULT_CR2.load(SeqCst),
        });
        NativeOut {
            gpr: out,
            rflags,
            fault,
        }
    }
}

pub fn gpr64(i: u64) -> Register {
    gpr(8, i)
}

/// Register `i` of `size` bytes (8-bit 4..=7: SPL..DIL; 8..=15: R8L..R15L).
pub fn gpr(size: u32, i: u64) -> Register {
    let base = match size {
        8 => Register::RAX,
        4 => Register::EAX,
        2 => Register::AX,
        _ => Register::AL,
    };
    if size == 1 && (4..8).contains(&i) {
        return [Register::SPL, Register::BPL, Register::SIL, Register::DIL][i as usize - 4];
    }
    if size == 1 && i >= 8 {
        return Register::try_from(Register::R8L as usize + (i as usize - 8)).unwrap();
    }
    Register::try_from(base as usize + i as usize).unwrap()
}

// ---- SIGSEGV recovery ---------------------------------------------------------------

/// Code mapping of the sequence running now (0: no sequence runs; a SIGSEGV is then
/// not ours and kills the process as it would have).
static ARMED_BASE: AtomicU64 = AtomicU64::new(0);
/// The 16-bit code selector when the sequence is 16-bit code.
static ARMED_CS16: AtomicU64 = AtomicU64::new(0);
static FAULT_RIP: AtomicU64 = AtomicU64::new(u64::MAX);
static FAULT_TRAPNO: AtomicU64 = AtomicU64::new(0);
static FAULT_ERR: AtomicU64 = AtomicU64::new(0);
static FAULT_CR2: AtomicU64 = AtomicU64::new(0);

/// Runs on the alternate stack with the FS base the sequence set: touches only
/// atomics (no thread-locals).
extern "C" fn on_segv(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler.
    let g = unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_mcontext.gregs };
    let base = ARMED_BASE.load(SeqCst);
    let rip = g[libc::REG_RIP as usize] as u64;
    let cs = g[libc::REG_CSGSFS as usize] as u64 & 0xffff;
    let cs16 = ARMED_CS16.load(SeqCst);
    let ours = base != 0
        && if cs16 != 0 && cs == cs16 {
            rip < CODE_SIZE as u64
        } else {
            (base..base + CODE_SIZE as u64).contains(&rip)
        };
    if !ours {
        // Not a sequence's fault: let it kill the process as it would have.
        // SAFETY: resetting a signal disposition is async-signal-safe.
        unsafe { libc::signal(_sig, libc::SIG_DFL) };
        return;
    }
    FAULT_RIP.store(rip, SeqCst);
    FAULT_TRAPNO.store(g[libc::REG_TRAPNO as usize] as u64, SeqCst);
    FAULT_ERR.store(g[libc::REG_ERR as usize] as u64, SeqCst);
    FAULT_CR2.store(g[libc::REG_CR2 as usize] as u64, SeqCst);
    g[libc::REG_RIP as usize] = (base + EPI_OFF) as i64;
    if cs != USER64_CS as u64 {
        // Resume the 32-bit epilogue in CS 0x23 with a flat SS.
        let v = g[libc::REG_CSGSFS as usize] as u64;
        let v = (v & !0xffff & !(0xffff << 48)) | USER32_CS as u64 | (USER_DS as u64) << 48;
        g[libc::REG_CSGSFS as usize] = v as i64;
    }
}

/// The SIGSEGV/SIGBUS handler (#SS is a SIGBUS) and alternate stack, installed for
/// the test's lifetime.
pub struct FaultCatcher {
    old_action: libc::sigaction,
    old_bus: libc::sigaction,
    old_stack: libc::stack_t,
    _stack: Vec<u8>,
}

impl FaultCatcher {
    pub fn install() -> FaultCatcher {
        let mut stack = vec![0u8; 1 << 16];
        // SAFETY: plain sigaltstack/sigaction calls with valid, live arguments; the
        // alternate stack lives as long as the catcher, which restores both on drop.
        unsafe {
            let ss = libc::stack_t {
                ss_sp: stack.as_mut_ptr() as *mut _,
                ss_flags: 0,
                ss_size: stack.len(),
            };
            let mut old_stack: libc::stack_t = core::mem::zeroed();
            assert_eq!(libc::sigaltstack(&ss, &mut old_stack), 0);
            let mut sa: libc::sigaction = core::mem::zeroed();
            sa.sa_sigaction = on_segv as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old_action: libc::sigaction = core::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGSEGV, &sa, &mut old_action), 0);
            let mut old_bus: libc::sigaction = core::mem::zeroed();
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, &mut old_bus), 0);
            FaultCatcher {
                old_action,
                old_bus,
                old_stack,
                _stack: stack,
            }
        }
    }
}

impl Drop for FaultCatcher {
    fn drop(&mut self) {
        // SAFETY: restores what `install` replaced.
        unsafe {
            libc::sigaction(libc::SIGSEGV, &self.old_action, core::ptr::null_mut());
            libc::sigaction(libc::SIGBUS, &self.old_bus, core::ptr::null_mut());
            libc::sigaltstack(&self.old_stack, core::ptr::null_mut());
        }
    }
}
