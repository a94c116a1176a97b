//! A guest in memory for tests (the engine's, and backends'): RAM as a `Vec`,
//! page-table builders for every paging mode, recorded port I/O, MSR writes and
//! TLB invalidations, scripted port reads and interrupts. Alloc-only, always built.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

use super::mmu::Paging;
use crate::arch::{cr0, cr4, efer, pte};
use crate::guest::{CpuCaps, CpuState, Fault, Guest, NotRam, Segment};
use crate::ir::{Bitness, Cluster, Insn, Op, Seg};
use crate::policy::ExitClass;

/// Builds a cluster of `ops` from `start`, each instruction `INSN_LEN` bytes of
/// filler code (`0x90`); load its bytes with [`TestGuest::load_code`]. Branch
/// targets are given as `Target::Insn` directly. For engine and backend tests that
/// need IR without an encoder.
pub fn fake_cluster(start: u64, bitness: Bitness, ops: &[(Op, Option<ExitClass>)]) -> Cluster {
    let insns: Vec<Insn> = ops
        .iter()
        .enumerate()
        .map(|(i, (op, class))| Insn {
            rip: start + (i as u64) * INSN_LEN as u64,
            len: INSN_LEN,
            op: *op,
            exit_class: *class,
        })
        .collect();
    let n = insns.len() as u64 * INSN_LEN as u64;
    Cluster::contiguous(bitness, start, vec![0x90; n as usize], insns, Vec::new())
}

/// Length of every instruction of a [`fake_cluster`].
pub const INSN_LEN: u8 = 4;

/// Page sizes the builders can map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    K4,
    /// 2M (PAE, 4-level) or 4M (32-bit paging with PSE).
    Large,
    /// 1G (4-level only).
    G1,
}

/// One recorded port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortIo {
    pub out: bool,
    pub port: u16,
    pub size: u8,
    pub value: u32,
}

/// Segment attributes (VMCS layout) for common descriptors.
pub mod attrs {
    /// 64-bit code, DPL 0 (the boot loader's).
    pub const CODE64: u32 = crate::boot::ATTR_CODE64;
    /// 32-bit code, DPL 0.
    pub const CODE32: u32 = crate::boot::ATTR_CODE32;
    /// 32-bit read/write data, DPL 0, 4G limit.
    pub const DATA32: u32 = crate::boot::ATTR_DATA;
    /// Real-mode code / data (16-bit, present, DPL 0).
    pub const REAL_CODE: u32 = 0x9b;
    pub const REAL_DATA: u32 = 0x93;
    /// DPL field value for CPL 3.
    pub const DPL3: u32 = 3 << 5;
}

/// The in-memory guest.
#[derive(Clone, Debug)]
pub struct TestGuest {
    pub state: CpuState,
    /// Guest-physical memory from address 0.
    pub ram: Vec<u8>,
    /// Guest-physical ranges `(start, len)` that are not RAM (MMIO).
    pub mmio: Vec<(u64, u64)>,
    /// Next frame the page-table builders allocate (they allocate downwards from
    /// the top of RAM).
    pub next_table: u64,
    /// Scripted port reads, per port, consumed in order; then `default_port_in`.
    pub port_script: BTreeMap<u16, VecDeque<u32>>,
    pub default_port_in: u32,
    pub io_log: Vec<PortIo>,
    pub msrs: BTreeMap<u32, u64>,
    /// MSRs whose access raises #GP (also: any MSR absent from `msrs` on read).
    pub msr_faults: BTreeSet<u32>,
    pub msr_writes: Vec<(u32, u64)>,
    /// CPUID leaves by (leaf, subleaf); starts as [`TestGuest::DEFAULT_CPUID`].
    pub cpuid_leaves: BTreeMap<(u32, u32), [u32; 4]>,
    pub cpuid_calls: u32,
    /// A write to this port asks the VMM to stop the guest (debug-exit).
    pub debug_exit_port: u16,
    /// The status of the first debug-exit write.
    pub exit_status: Option<u8>,
    pub tsc: u64,
    /// Added to `tsc` at every read.
    pub tsc_step: u64,
    pub xcr0: u64,
    pub xsetbv_log: Vec<(u32, u64)>,
    /// `interrupt_pending()` answers true once it has been asked this many times
    /// (`Some(0)`: always); `None`: never.
    pub irq_after: Option<u32>,
    pub irq_checks: u32,
    pub tlb_flushes: u32,
    pub state_reads: u32,
    pub state_writes: u32,
}

impl TestGuest {
    /// The CPUID a test guest starts with: an x86-64 CPU with PAE, PGE, PCID,
    /// XSAVE, FSGSBASE, SMEP, SMAP and UMIP, 46-bit physical and 48-bit linear
    /// addresses, and neither VMX, SMX, PKU, CET nor 5-level paging.
    pub const DEFAULT_CPUID: [((u32, u32), [u32; 4]); 6] = [
        ((0, 0), [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
        // ECX: SSE3, PCID (17), XSAVE (26). EDX: FPU..SSE2 with PAE (6), PGE (13).
        ((1, 0), [0x000a_0655, 0, 0x0402_0001, 0x078b_fbff]),
        // EBX: FSGSBASE (0), SMEP (7), SMAP (20). ECX: UMIP (2).
        ((7, 0), [0, 0x0010_0081, 0x4, 0]),
        ((0x8000_0000, 0), [0x8000_0008, 0, 0, 0]),
        // EDX: SYSCALL, NX, LM.
        ((0x8000_0001, 0), [0, 0, 0, 0x2010_0800]),
        ((0x8000_0008, 0), [0x302e, 0, 0, 0]),
    ];

    /// A guest with `ram_bytes` of zeroed RAM in real mode at 0:0.
    pub fn new(ram_bytes: usize) -> TestGuest {
        let ram_bytes = ram_bytes.max(4096) & !0xfff;
        let mut state = CpuState {
            rflags: 2,
            cr0: 0x10,
            ..CpuState::default()
        };
        for s in state.seg.iter_mut() {
            *s = Segment {
                selector: 0,
                base: 0,
                limit: 0xffff,
                attrs: attrs::REAL_DATA,
            };
        }
        state.seg[Seg::Cs as usize].attrs = attrs::REAL_CODE;
        TestGuest {
            state,
            ram: vec![0; ram_bytes],
            mmio: Vec::new(),
            next_table: ram_bytes as u64,
            port_script: BTreeMap::new(),
            default_port_in: 0xffff_ffff,
            io_log: Vec::new(),
            msrs: BTreeMap::new(),
            msr_faults: BTreeSet::new(),
            msr_writes: Vec::new(),
            cpuid_leaves: TestGuest::DEFAULT_CPUID.iter().copied().collect(),
            cpuid_calls: 0,
            debug_exit_port: 0xf4,
            exit_status: None,
            tsc: 0,
            tsc_step: 0,
            xcr0: 1,
            xsetbv_log: Vec::new(),
            irq_after: None,
            irq_checks: 0,
            tlb_flushes: 0,
            state_reads: 0,
            state_writes: 0,
        }
    }

    /// 64-bit long mode, CPL 0, 4-level paging with an empty PML4, NXE and WP on.
    pub fn long_mode(ram_bytes: usize) -> TestGuest {
        let mut g = TestGuest::new(ram_bytes);
        let pml4 = g.alloc_table();
        let s = &mut g.state;
        s.cr0 = cr0::PE | cr0::PG | cr0::WP | cr0::ET;
        s.cr4 = cr4::PAE | cr4::OSXSAVE;
        s.efer = efer::LME | efer::LMA | efer::NXE;
        s.cr3 = pml4;
        g.flat_segments(attrs::CODE64, attrs::DATA32);
        g
    }

    /// 32-bit protected mode, flat segments; `paging`: `None` (CR0.PG=0),
    /// `Bits32 { pse }` or `Pae` (NXE on); the tables start empty.
    pub fn protected32(ram_bytes: usize, paging: Paging) -> TestGuest {
        let mut g = TestGuest::new(ram_bytes);
        g.flat_segments(attrs::CODE32, attrs::DATA32);
        g.state.cr0 = cr0::PE | cr0::WP | cr0::ET;
        match paging {
            Paging::Bits32 { pse } => {
                g.state.cr3 = g.alloc_table();
                g.state.cr0 |= cr0::PG;
                if pse {
                    g.state.cr4 |= cr4::PSE;
                }
            }
            Paging::Pae => {
                // The PDPT (32 bytes, 32-byte aligned) lives in a table frame.
                g.state.cr3 = g.alloc_table();
                g.state.cr0 |= cr0::PG;
                g.state.cr4 |= cr4::PAE;
                g.state.efer |= efer::NXE;
            }
            _ => {}
        }
        g
    }

    fn flat_segments(&mut self, code: u32, data: u32) {
        for (i, s) in self.state.seg.iter_mut().enumerate() {
            *s = Segment {
                selector: if i == Seg::Cs as usize { 8 } else { 16 },
                base: 0,
                limit: 0xffff_ffff,
                attrs: if i == Seg::Cs as usize { code } else { data },
            };
        }
    }

    /// Sets CPL (CS.DPL and SS.DPL).
    pub fn set_cpl(&mut self, cpl: u8) {
        for s in [Seg::Cs, Seg::Ss] {
            let a = &mut self.state.seg[s as usize].attrs;
            *a = (*a & !(3 << 5)) | ((cpl as u32 & 3) << 5);
        }
    }

    /// Allocates a zeroed 4K frame for page tables (downwards from the top of RAM).
    pub fn alloc_table(&mut self) -> u64 {
        self.next_table -= 4096;
        let a = self.next_table as usize;
        self.ram[a..a + 4096].fill(0);
        self.next_table
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let a = gpa as usize;
        u64::from_le_bytes(self.ram[a..a + 8].try_into().unwrap())
    }
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let a = gpa as usize;
        u32::from_le_bytes(self.ram[a..a + 4].try_into().unwrap())
    }
    pub fn write_bytes(&mut self, gpa: u64, data: &[u8]) {
        let a = gpa as usize;
        self.ram[a..a + data.len()].copy_from_slice(data);
    }
    pub fn bytes(&self, gpa: u64, len: usize) -> &[u8] {
        &self.ram[gpa as usize..gpa as usize + len]
    }
    fn write_entry(&mut self, gpa: u64, v: u64, wide: bool) {
        if wide {
            self.write_bytes(gpa, &v.to_le_bytes());
        } else {
            self.write_bytes(gpa, &(v as u32).to_le_bytes());
        }
    }

    /// Maps `va` to `pa` in the current paging mode (from CR0/CR4/EFER), creating
    /// intermediate tables (present, writable, user) as needed. `flags` are the
    /// final entry's flags (P, RW, US, NX, ...; PS is added for large pages).
    pub fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: u64) {
        let inter = pte::P | pte::RW | pte::US;
        match Paging::of(&self.state) {
            Paging::Long4 => {
                let mut table = self.state.cr3 & !0xfff;
                let last = match size {
                    PageSize::K4 => 0,
                    PageSize::Large => 1,
                    PageSize::G1 => 2,
                };
                for level in (last + 1..=3).rev() {
                    let ea = table + ((va >> (12 + 9 * level)) & 0x1ff) * 8;
                    table = self.table_at(ea, inter, true);
                }
                let ea = table + ((va >> (12 + 9 * last)) & 0x1ff) * 8;
                let ps = if last > 0 { pte::PS } else { 0 };
                self.write_entry(ea, pa | flags | ps, true);
            }
            Paging::Pae => {
                let pdpte = (self.state.cr3 & 0xffff_ffe0) + ((va >> 30) & 3) * 8;
                let pd = self.table_at(pdpte, pte::P, true);
                let pde = pd + ((va >> 21) & 0x1ff) * 8;
                if size == PageSize::K4 {
                    let pt = self.table_at(pde, inter, true);
                    self.write_entry(pt + ((va >> 12) & 0x1ff) * 8, pa | flags, true);
                } else {
                    self.write_entry(pde, pa | flags | pte::PS, true);
                }
            }
            Paging::Bits32 { .. } => {
                let pde = (self.state.cr3 & 0xffff_f000) + ((va >> 22) & 0x3ff) * 4;
                if size == PageSize::K4 {
                    let pt = self.table_at(pde, inter, false);
                    self.write_entry(pt + ((va >> 12) & 0x3ff) * 4, pa | flags, false);
                } else {
                    // PSE-36: physical bits 39:32 go to PDE bits 20:13.
                    let e = (pa & 0xffc0_0000) | (((pa >> 32) & 0xff) << 13) | flags | pte::PS;
                    self.write_entry(pde, e, false);
                }
            }
            _ => {}
        }
    }

    /// Maps `[va, va+len)` to `[pa, ...)` with 4K pages.
    pub fn map_range(&mut self, va: u64, pa: u64, len: u64, flags: u64) {
        let mut o = 0;
        while o < len {
            self.map(va + o, pa + o, PageSize::K4, flags);
            o += 4096;
        }
    }

    /// The table an entry at `ea` points to, creating it if absent.
    fn table_at(&mut self, ea: u64, flags: u64, wide: bool) -> u64 {
        let e = if wide {
            self.read_u64(ea)
        } else {
            self.read_u32(ea) as u64
        };
        if e & pte::P != 0 {
            return e & 0x000f_ffff_ffff_f000;
        }
        let t = self.alloc_table();
        self.write_entry(ea, t | flags, wide);
        t
    }

    /// Guest-physical addresses of the paging-structure entries that map `va`, from
    /// the top level down (stops at a non-present or large entry). For inspecting
    /// and editing A/D/permission bits in tests. Entries are 8 bytes, except 4 in
    /// 32-bit paging.
    pub fn entries(&self, va: u64) -> Vec<u64> {
        let mut out = Vec::new();
        match Paging::of(&self.state) {
            Paging::Long4 | Paging::Pae => {
                let (mut table, mut level) = if Paging::of(&self.state) == Paging::Pae {
                    let pdpte = (self.state.cr3 & 0xffff_ffe0) + ((va >> 30) & 3) * 8;
                    out.push(pdpte);
                    let e = self.read_u64(pdpte);
                    if e & pte::P == 0 {
                        return out;
                    }
                    (e & 0x000f_ffff_ffff_f000, 1)
                } else {
                    (self.state.cr3 & !0xfff, 3)
                };
                loop {
                    let ea = table + ((va >> (12 + 9 * level)) & 0x1ff) * 8;
                    out.push(ea);
                    let e = self.read_u64(ea);
                    if level == 0 || e & pte::P == 0 || e & pte::PS != 0 {
                        return out;
                    }
                    table = e & 0x000f_ffff_ffff_f000;
                    level -= 1;
                }
            }
            Paging::Bits32 { .. } => {
                let pde = (self.state.cr3 & 0xffff_f000) + ((va >> 22) & 0x3ff) * 4;
                out.push(pde);
                let e = self.read_u32(pde) as u64;
                if e & pte::P != 0 && e & pte::PS == 0 {
                    out.push((e & 0xffff_f000) + ((va >> 12) & 0x3ff) * 4);
                }
            }
            _ => {}
        }
        out
    }

    /// The final entry mapping `va` (8 bytes, or 4 in 32-bit paging), as a value.
    pub fn leaf(&self, va: u64) -> u64 {
        let e = self.entries(va);
        let Some(&a) = e.last() else { return 0 };
        if matches!(Paging::of(&self.state), Paging::Bits32 { .. }) {
            self.read_u32(a) as u64
        } else {
            self.read_u64(a)
        }
    }

    /// Writes a cluster's code bytes at guest-physical `gpa` (the address of its
    /// lowest byte; the ranges keep their distances).
    pub fn load_code(&mut self, gpa: u64, c: &Cluster) {
        let base = c.lowest();
        for r in &c.code {
            self.write_bytes(gpa + (r.start - base), &r.bytes);
        }
    }

    /// Loads the PDPTE registers from memory at CR3, as a MOV to CR3 does in PAE
    /// mode (after building the tables with [`TestGuest::map`]).
    pub fn load_pdptes(&mut self) {
        let base = self.state.cr3 & 0xffff_ffe0;
        let mut p = [0u64; 4];
        for (i, e) in p.iter_mut().enumerate() {
            *e = self.read_u64(base + 8 * i as u64);
        }
        self.state.pdpte = Some(p);
    }

    /// Looks up a CPUID leaf (the subleaf's, else subleaf 0's, else zeros).
    fn cpuid_leaf(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid_leaves
            .get(&(leaf, subleaf))
            .or_else(|| self.cpuid_leaves.get(&(leaf, 0)))
            .copied()
            .unwrap_or([0; 4])
    }

    /// Queues values for reads of `port`.
    pub fn script_port(&mut self, port: u16, values: &[u32]) {
        self.port_script
            .entry(port)
            .or_default()
            .extend(values.iter().copied());
    }

    /// Port writes, in order, as (port, size, value).
    pub fn outs(&self) -> Vec<(u16, u8, u32)> {
        self.io_log
            .iter()
            .filter(|p| p.out)
            .map(|p| (p.port, p.size, p.value))
            .collect()
    }

    #[inline]
    fn is_ram(&self, gpa: u64, len: usize) -> Result<usize, NotRam> {
        let end = gpa.checked_add(len as u64).ok_or(NotRam { gpa })?;
        if end > self.ram.len() as u64 {
            return Err(NotRam { gpa });
        }
        if self.mmio.is_empty() {
            return Ok(gpa as usize);
        }
        for &(s, l) in &self.mmio {
            if gpa < s + l && end > s {
                return Err(NotRam { gpa: gpa.max(s) });
            }
        }
        Ok(gpa as usize)
    }
}

impl Guest for TestGuest {
    fn state(&mut self) -> CpuState {
        self.state_reads += 1;
        self.state.clone()
    }
    fn set_state(&mut self, state: &CpuState) {
        self.state_writes += 1;
        self.state = state.clone();
    }
    #[inline]
    fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let a = self.is_ram(gpa, buf.len())?;
        if buf.len() == 8 {
            // Page-table entries and qword accesses: a plain load, no memcpy call.
            let v: [u8; 8] = self.ram[a..a + 8].try_into().map_err(|_| NotRam { gpa })?;
            buf.copy_from_slice(&v);
        } else {
            buf.copy_from_slice(&self.ram[a..a + buf.len()]);
        }
        Ok(())
    }
    #[inline]
    fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let a = self.is_ram(gpa, data.len())?;
        if let Ok(v) = <[u8; 8]>::try_from(data) {
            self.ram[a..a + 8].copy_from_slice(&v);
        } else {
            self.ram[a..a + data.len()].copy_from_slice(data);
        }
        Ok(())
    }
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        let mask = if size >= 4 {
            u32::MAX
        } else {
            (1u32 << (size * 8)) - 1
        };
        let v = self
            .port_script
            .get_mut(&port)
            .and_then(|q| q.pop_front())
            .unwrap_or(self.default_port_in)
            & mask;
        self.io_log.push(PortIo {
            out: false,
            port,
            size,
            value: v,
        });
        v
    }
    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        self.io_log.push(PortIo {
            out: true,
            port,
            size,
            value,
        });
        if port == self.debug_exit_port {
            self.exit_status.get_or_insert(value as u8);
        }
    }
    fn stop_requested(&mut self) -> bool {
        self.exit_status.is_some()
    }
    fn rdmsr(&mut self, msr: u32) -> Result<u64, Fault> {
        if self.msr_faults.contains(&msr) {
            return Err(Fault::GeneralProtection);
        }
        self.msrs.get(&msr).copied().ok_or(Fault::GeneralProtection)
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> Result<(), Fault> {
        if self.msr_faults.contains(&msr) {
            return Err(Fault::GeneralProtection);
        }
        self.msrs.insert(msr, value);
        self.msr_writes.push((msr, value));
        Ok(())
    }
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid_calls += 1;
        self.cpuid_leaf(leaf, subleaf)
    }
    /// From the CPUID table, without counting calls (`cpuid_calls` counts the
    /// guest's CPUID instructions).
    fn cpu_caps(&mut self) -> CpuCaps {
        CpuCaps::from_cpuid(|leaf, subleaf| self.cpuid_leaf(leaf, subleaf))
    }
    fn tsc(&mut self) -> u64 {
        self.tsc = self.tsc.wrapping_add(self.tsc_step);
        self.tsc
    }
    fn xgetbv(&mut self, index: u32) -> Result<u64, Fault> {
        match index {
            0 => Ok(self.xcr0),
            _ => Err(Fault::GeneralProtection),
        }
    }
    fn xsetbv(&mut self, index: u32, value: u64) -> Result<(), Fault> {
        if index != 0 || value & 1 == 0 {
            return Err(Fault::GeneralProtection);
        }
        self.xcr0 = value;
        self.xsetbv_log.push((index, value));
        Ok(())
    }
    fn interrupt_pending(&mut self) -> bool {
        self.irq_checks += 1;
        match self.irq_after {
            Some(n) => self.irq_checks > n,
            None => false,
        }
    }
    fn invalidate_tlb(&mut self) {
        self.tlb_flushes += 1;
    }
}
