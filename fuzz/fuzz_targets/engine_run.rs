//! The engine on whatever `format::decode` accepts: every cluster of a decoded set
//! (regions with calls, returns and guarded indirect branches included) runs on an
//! in-memory guest whose code, stack and data are mapped. The engine must never
//! panic, and every stop must leave the guest at a RIP the run can explain.
//!
//! The input is a translation file; the checksum is recomputed so the fuzzer gets
//! past it (as in `format_decode`). The guest's registers come from a hash of the
//! input (so they vary with it but cannot shadow what decode reads).
#![no_main]

use avex_core::arch::pte;
use avex_core::engine::test_guest::{PageSize, TestGuest};
use avex_core::engine::{self, Paging, RunLimits, StopReason};
use avex_core::format::{decode, FIXED_HEADER_LEN};
use avex_core::ir::{Bitness, Cluster};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const CHECKSUM_OFFSET: usize = 124;
const RAM: usize = 8 << 20;

fn guest_for(c: &Cluster, regs: &[u8]) -> Option<TestGuest> {
    let mut g = match c.bitness {
        Bitness::B64 => TestGuest::long_mode(RAM),
        Bitness::B32 => TestGuest::protected32(RAM, Paging::None),
        Bitness::B16 => TestGuest::new(RAM),
    };
    // Code at low physical memory, keeping the distances between ranges.
    let lowest = c.lowest();
    if c.highest_end() - lowest > 0x40_0000 {
        return None;
    }
    if c.bitness == Bitness::B64 {
        let first = lowest & !0xfff;
        let len = (c.highest_end() - first + 0xfff) & !0xfff;
        let mut o = 0;
        while o < len {
            g.map(first + o, 0x10_0000 + o, PageSize::K4, pte::P | pte::RW);
            o += 0x1000;
        }
        for r in &c.code {
            g.write_bytes(0x10_0000 + (r.start - first), &r.bytes);
        }
        // Stack and data: 1 MiB at 0x7000_0000.
        g.map_range(0x7000_0000, 0x50_0000, 0x10_0000, pte::P | pte::RW);
    } else {
        if c.highest_end() > RAM as u64 - 0x10_0000 {
            return None;
        }
        for r in &c.code {
            g.write_bytes(r.start, &r.bytes);
        }
    }
    for (k, chunk) in regs.chunks(8).take(16).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        g.state.gpr[k] = u64::from_le_bytes(b);
    }
    g.state.gpr[4] = if c.bitness == Bitness::B64 {
        0x7008_0000
    } else {
        0x8_0000
    };
    g.state.rip = c.insns[c.entry_index()?].rip;
    if c.bitness == Bitness::B16 && g.state.rip > 0xffff {
        return None;
    }
    g.irq_after = Some(5);
    Some(g)
}

fn check(data: &[u8]) {
    let Ok(set) = decode(data) else { return };
    let hash: [u8; 32] = Sha256::digest(data).into();
    let regs: Vec<u8> = hash.iter().cycle().take(128).copied().collect();
    for c in &set.clusters {
        let Some(mut g) = guest_for(c, &regs) else {
            continue;
        };
        let start = c.entry_index().unwrap();
        let out = engine::run(
            c,
            &mut g,
            start,
            &RunLimits {
                max_insns: 512,
                ..RunLimits::default()
            },
        );
        assert_eq!(g.state.rip, out.rip);
        if let Some(i) = out.index {
            assert_eq!(c.insns[i].rip, out.rip);
        }
        assert!(
            !matches!(out.reason, StopReason::Invalid(_)),
            "{:?}",
            out.reason
        );
        assert!(out.stats.insns <= 512);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= FIXED_HEADER_LEN {
        let header_len = u16::from_le_bytes([data[10], data[11]]) as usize;
        if header_len <= data.len() {
            let mut v = data.to_vec();
            let sum: [u8; 32] = Sha256::digest(&v[header_len..]).into();
            v[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 32].copy_from_slice(&sum);
            check(&v);
        }
    }
});
