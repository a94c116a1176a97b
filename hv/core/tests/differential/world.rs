//! One world: the native harness of a code size and the engine's `TestGuest` that
//! maps the same linear addresses, page by page, to guest-physical frames that are
//! neither adjacent nor in order (so every access crossing a page boundary crosses
//! physically discontiguous frames). One case runs on both and is compared.

use super::flags::{analyze, layout};
use super::gen::{reg_of, Place};
use super::native::{Native, NativeFault, BUF_PAGES, BUF_SIZE, GUARD_PAGE, RO_PAGE, SEQ_OFF};
use super::{Case, Mode, DF, STATUS};
use avex_core::arch::{pte, rflags};
use avex_core::engine::{self, test_guest::TestGuest, Paging, RunLimits, StopReason};
use avex_core::guest::{Fault, Guest, Segment};
use avex_core::ir::{BackEdge, Bitness, Cluster, Insn, Op, Seg, Target};
use avex_core::lower;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

const CODE_GPA: u64 = 0x10000;
const BUF_GPA: u64 = 0x40000;

pub struct World {
    pub mode: Mode,
    pub native: Native,
    pub guest: TestGuest,
    /// (linear page, guest-physical frame) of every mapped page.
    pages: Vec<(u64, u64)>,
    /// What the last case did: the CPU faulted, back-edges the engine took, runs
    /// resumed after a back-edge cap.
    pub last: Last,
}

#[derive(Clone, Copy, Default)]
pub struct Last {
    pub faulted: bool,
    pub back_edges: u64,
    pub resumes: u64,
}

#[derive(Debug)]
pub enum CaseResult {
    Ok,
    /// lower() refused an instruction, or the case did not lay out.
    Skipped,
    Mismatch(String),
}

fn seg(base: u64, limit: u32, attrs: u32, selector: u16) -> Segment {
    Segment {
        selector,
        base,
        limit,
        attrs,
    }
}

impl World {
    pub fn new(mode: Mode, low: bool, ldt: u32) -> World {
        let native = Native::new(mode, low, ldt);
        let mut guest = match mode {
            Mode::M64 => TestGuest::long_mode(1 << 20),
            _ => TestGuest::protected32(1 << 20, Paging::Bits32 { pse: false }),
        };
        let s = native.segs;
        let st = &mut guest.state;
        match mode {
            Mode::M64 => {
                st.seg[Seg::Fs as usize].base = s.fs;
                st.seg[Seg::Gs as usize].base = s.gs;
            }
            Mode::M32 => {
                st.seg[Seg::Fs as usize] = seg(s.fs, u32::MAX, 0xc093, s.fs_sel);
                st.seg[Seg::Gs as usize] = seg(s.gs, u32::MAX, 0xc093, s.gs_sel);
            }
            Mode::M16 => {
                st.seg[Seg::Cs as usize] = seg(native.base(), 0xffff, 0x9b, s.cs16_sel);
                st.seg[Seg::Ds as usize] = seg(s.ds, 0xffff, 0x93, s.ds16_sel);
                st.seg[Seg::Ss as usize] = seg(s.ds, 0xffff, 0x93, s.ds16_sel);
                st.seg[Seg::Fs as usize] = seg(s.fs, 0xffff, 0x93, s.fs_sel);
                st.seg[Seg::Gs as usize] = seg(s.gs, 0xffff, 0x93, s.gs_sel);
            }
        }
        let nx = if mode == Mode::M64 { pte::NX } else { 0 };
        let mut pages = Vec::new();
        // Code: three pages, out of order, two frames apart.
        for (k, f) in [2u64, 0, 1].iter().enumerate() {
            pages.push((native.base() + 4096 * k as u64, CODE_GPA + f * 0x2000));
        }
        for k in 0..BUF_PAGES {
            // Buffer: descending frames with a gap between each; no guard page.
            if k != GUARD_PAGE {
                pages.push((
                    native.buf_va() + 4096 * k,
                    BUF_GPA + (BUF_PAGES - k) * 0x2000,
                ));
            }
        }
        for &(va, pa) in &pages {
            let buf_page = (va.wrapping_sub(native.buf_va())) / 4096;
            let flags = match va >= native.buf_va() && buf_page < BUF_PAGES {
                true if buf_page == RO_PAGE => pte::P | nx,
                true => pte::P | pte::RW | nx,
                false => pte::P | pte::RW,
            };
            guest.map(va, pa, engine::test_guest::PageSize::K4, flags);
        }
        let mut w = World {
            mode,
            native,
            guest,
            pages,
            last: Last::default(),
        };
        let ro = w.native.ro_page().to_vec();
        w.put(w.native.buf_va() + RO_PAGE * 4096, &ro);
        w
    }

    pub fn place(&self) -> Place {
        Place {
            mode: self.mode,
            buf: self.native.buf_va(),
            seq_ip: self.native.seq_ip(),
            segs: self.native.segs,
        }
    }

    fn gpa(&self, va: u64) -> u64 {
        let page = va & !0xfff;
        let &(_, pa) = self
            .pages
            .iter()
            .find(|p| p.0 == page)
            .expect("address the guest maps");
        pa + (va & 0xfff)
    }

    /// Writes guest memory at linear `va`, page by page.
    pub fn put(&mut self, va: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let a = va + done as u64;
            let n = ((4096 - (a & 0xfff)) as usize).min(data.len() - done);
            let gpa = self.gpa(a);
            self.guest.write_bytes(gpa, &data[done..done + n]);
            done += n;
        }
    }

    /// The engine's copy of the data buffer equals the CPU's.
    fn buffers_differ(&self) -> Option<usize> {
        let nbuf = self.native_buf();
        let base = self.native.buf_va();
        for p in 0..(BUF_SIZE / 4096) {
            let g = self.guest.bytes(self.gpa(base + 4096 * p as u64), 4096);
            let n = &nbuf[p * 4096..(p + 1) * 4096];
            if g != n {
                return Some(p * 4096 + (0..4096).find(|&k| g[k] != n[k]).unwrap());
            }
        }
        None
    }

    fn native_buf(&self) -> &[u8] {
        // SAFETY: a shared view of the buffer while no native run is in progress.
        unsafe { core::slice::from_raw_parts(self.native.buf_va() as *const u8, BUF_SIZE) }
    }

    /// Sets both copies of the data buffer.
    pub fn load_buf(&mut self, data: &[u8]) {
        self.native.buf().copy_from_slice(data);
        let va = self.native.buf_va();
        self.put(va, data);
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.native_buf().to_vec()
    }

    pub fn snapshot_into(&self, out: &mut [u8]) {
        out.copy_from_slice(self.native_buf());
    }

    /// Writes `data` at buffer offset `off` in both copies.
    pub fn poke(&mut self, off: usize, data: &[u8]) {
        self.native.buf()[off..off + data.len()].copy_from_slice(data);
        let va = self.native.buf_va() + off as u64;
        self.put(va, data);
    }

    /// Runs one case on the CPU and in the engine and compares. Both copies of the
    /// buffer must be equal before; they are after a case that matches.
    pub fn run_case(
        &mut self,
        case: &Case,
        gpr0: &[u64; 16],
        fl0: u64,
        report: bool,
    ) -> CaseResult {
        let specs = &case.specs;
        let ip = self.native.seq_ip();
        let bits = self.mode.bits();
        let Some((bytes, rips)) = layout(bits, specs, ip) else {
            return CaseResult::Skipped;
        };
        let Some(incoming) = analyze(specs) else {
            return CaseResult::Skipped;
        };
        // Decode and lower (the production path).
        let end = ip + bytes.len() as u64;
        let mut dec = Decoder::with_ip(bits, &bytes, ip, DecoderOptions::NONE);
        let mut insns = Vec::new();
        while dec.can_decode() {
            let d = dec.decode();
            let Ok(op) = lower::lower(&d) else {
                return CaseResult::Skipped;
            };
            insns.push(Insn {
                rip: d.ip(),
                len: d.len() as u8,
                op,
                exit_class: None,
            });
        }
        for insn in insns.iter_mut() {
            let fix = |t: Target| match t {
                Target::Exit(a) => match rips.iter().position(|&r| r == a) {
                    Some(k) => Target::Insn(k as u16),
                    None => t,
                },
                t => t,
            };
            match &mut insn.op {
                Op::Jmp { target } | Op::Jcc { target, .. } | Op::Loop { target, .. } => {
                    *target = fix(*target)
                }
                _ => {}
            }
        }
        let back_edges = case
            .caps
            .iter()
            .map(|&(insn, cap)| BackEdge {
                insn: insn as u16,
                cap,
            })
            .collect();
        let cluster = Cluster::contiguous(
            match bits {
                64 => Bitness::B64,
                32 => Bitness::B32,
                _ => Bitness::B16,
            },
            ip,
            bytes.clone(),
            insns,
            back_edges,
        );
        // Native run.
        let nat = self.native.run(&bytes, gpr0, fl0);
        // Engine run: resumed after every capped back-edge, as a backend would.
        let code_va = self.native.base() + SEQ_OFF;
        self.put(code_va, &bytes);
        self.guest.state.gpr = *gpr0;
        self.guest.state.rflags = fl0 | rflags::IF | rflags::FIXED;
        self.guest.state.rip = ip;
        let mut start = 0;
        let mut back_edges = 0u64;
        let mut resumes = 0;
        let out = loop {
            let out = engine::run(&cluster, &mut self.guest, start, &RunLimits::default());
            back_edges += out.stats.back_edges as u64;
            match (out.reason, out.index) {
                (StopReason::BackEdgeCap, Some(i)) if resumes < 1000 => {
                    start = i;
                    resumes += 1;
                }
                _ => break out,
            }
        };
        self.last = Last {
            faulted: nat.fault.is_some(),
            back_edges,
            resumes,
        };
        let st = self.guest.state();
        let mut diffs = String::new();
        let stop_index = rips.iter().position(|&r| r == out.rip);
        let undef = match (&nat.fault, stop_index) {
            (Some(_), Some(k)) => incoming[k],
            _ => incoming[specs.len()],
        };
        match nat.fault {
            None => {
                if !matches!(out.reason, StopReason::End | StopReason::ExitBranch) || out.rip != end
                {
                    diffs += &format!(
                        "  stop: {:?} at {:#x}; the CPU ran to the end {:#x}\n",
                        out.reason, out.rip, end
                    );
                }
            }
            Some(f) => {
                if let Some(d) = fault_diff(&f, out.reason, out.rip) {
                    diffs += &d;
                }
            }
        }
        let mask = (STATUS | DF) & !undef;
        let m = self.mode.mask();
        for (i, (&e, &n)) in st
            .gpr
            .iter()
            .zip(nat.gpr.iter())
            .enumerate()
            .take(self.mode.nregs() as usize)
        {
            let (e, n) = (e & m, n & m);
            if e != n {
                let size = if self.mode == Mode::M64 { 8 } else { 4 };
                diffs += &format!(
                    "  {:?}: engine {:#x} cpu {:#x}\n",
                    reg_of(self.mode, size, i as u64),
                    e,
                    n
                );
            }
        }
        if (st.rflags ^ nat.rflags) & mask != 0 {
            diffs += &format!(
                "  rflags (mask {:#x}): engine {:#x} cpu {:#x}\n",
                mask,
                st.rflags & mask,
                nat.rflags & mask
            );
        }
        if let Some(first) = self.buffers_differ() {
            let g = self.gpa(self.native.buf_va() + first as u64);
            let nbuf = self.native_buf();
            let k = (8).min(4096 - (first & 0xfff));
            diffs += &format!(
                "  memory differs first at buf+{:#x}: engine {:02x?} cpu {:02x?}\n",
                first,
                self.guest.bytes(g, k),
                &nbuf[first..first + k]
            );
        }
        if diffs.is_empty() {
            return CaseResult::Ok;
        }
        if !report {
            return CaseResult::Mismatch(String::new());
        }
        let mut s = String::new();
        s += &format!(
            "  bytes: {}\n",
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut f = IntelFormatter::new();
        let dec = Decoder::with_ip(bits, &bytes, ip, DecoderOptions::NONE);
        for (k, d) in dec.into_iter().enumerate() {
            let mut t = String::new();
            f.format(&d, &mut t);
            s += &format!(
                "  [{k}] {:#x}: {t}   => {:?}\n",
                d.ip(),
                cluster.insns.get(k).map(|i| i.op)
            );
        }
        s += &format!(
            "  buffer at {:#x}, code at {:#x}, FS base {:#x}, GS base {:#x}\n",
            self.native.buf_va(),
            self.native.base(),
            self.native.segs.fs,
            self.native.segs.gs
        );
        s += &format!(
            "  engine: {:?} at {:#x}, {} back-edges, {} resumes; cpu fault: {:?}\n",
            out.reason, out.rip, back_edges, resumes, nat.fault
        );
        s += &format!("  inputs: rflags {fl0:#x}, caps {:?}\n", case.caps);
        for (i, v) in gpr0.iter().enumerate().take(self.mode.nregs() as usize) {
            let size = if self.mode == Mode::M64 { 8 } else { 4 };
            s += &format!("    {:?} = {:#x}\n", reg_of(self.mode, size, i as u64), v);
        }
        CaseResult::Mismatch(s + &diffs)
    }
}

/// The CPU faulted: the engine must stop before the same instruction, for the same
/// exception (and, for a page fault, the same address and access kind).
fn fault_diff(f: &NativeFault, reason: StopReason, rip: u64) -> Option<String> {
    let same = match reason {
        StopReason::PageFault { addr, error_code } => {
            f.trapno == 14 && f.cr2 == addr && (f.err ^ error_code as u64) & 2 == 0
        }
        // The engine stops before a segment-limit violation without naming #SS
        // apart from #GP: the guest takes the exact exception when it resumes.
        StopReason::Fault(Fault::GeneralProtection) => matches!(f.trapno, 12 | 13),
        _ => false,
    };
    if same && rip == f.rip {
        return None;
    }
    Some(format!(
        "  stop: engine {reason:?} at {rip:#x}; cpu trap {} (err {:#x}, cr2 {:#x}) at {:#x}\n",
        f.trapno, f.err, f.cr2, f.rip
    ))
}
