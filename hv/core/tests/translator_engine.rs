//! The translator's clusters run by the engine: driver sequences translated from their
//! bytes, then executed against the in-memory test guest. This checks the contract
//! between lowering/cluster formation and the engine end to end (targets, back-edge
//! caps, operand sizes in each code size), not the engine's semantics in detail.

use avex_core::arch::pte;
use avex_core::engine::test_guest::TestGuest;
use avex_core::engine::{run, RunLimits, StopReason};
use avex_core::ir::{Bitness, Cluster, RAX, RCX, RDX};
use avex_core::policy::{ExitClass, ExitPolicy};
use avex_core::translator::{shape, translate, Shape, TranslatorConfig};

fn cluster(code: &[u8], rip: u64, bitness: Bitness) -> Cluster {
    translate(
        code,
        rip,
        bitness,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
    .expect("the sequence forms a cluster")
}

/// Places `code` at guest-physical `rip` (no paging, flat or real-mode CS at 0).
fn load(guest: &mut TestGuest, rip: u64, code: &[u8]) {
    guest.write_bytes(rip, code);
    guest.state.rip = rip;
}

#[test]
fn serial_poll_loop_in_real_mode_runs_until_the_transmitter_is_empty() {
    // L: in al,dx ; test al,0x20 ; jz L ; mov dx,0x3f8 ; mov al,'A' ; out dx,al
    let code = [
        0xec, 0xa8, 0x20, 0x74, 0xfb, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee,
    ];
    let rip = 0x1000;
    let c = cluster(&code, rip, Bitness::B16);
    assert_eq!(shape(&c), Shape::Looping);
    assert_eq!(c.back_edges[0].cap, None, "the loop passes through IN");

    let mut guest = TestGuest::new(0x10000);
    load(&mut guest, rip, &code);
    guest.state.gpr[RDX as usize] = 0x3fd;
    // LSR: busy, busy, then THRE set.
    guest.script_port(0x3fd, &[0x00, 0x00, 0x20]);
    let outcome = run(&c, &mut guest, 0, &RunLimits::default());

    assert_eq!(outcome.reason, StopReason::End);
    assert_eq!(outcome.rip, c.highest_end());
    assert_eq!(outcome.stats.exits_of(ExitClass::In), 3);
    assert_eq!(outcome.stats.exits_of(ExitClass::Out), 1);
    assert_eq!(outcome.stats.back_edges, 2);
    assert_eq!(guest.outs(), vec![(0x3f8, 1, u32::from(b'A'))]);
    assert_eq!(guest.state.gpr[RDX as usize] & 0xffff, 0x3f8);
}

#[test]
fn pci_config_read_in_32_bit_code() {
    // out dx,eax ; mov dx,0xcfc ; in eax,dx
    let code = [0xef, 0x66, 0xba, 0xfc, 0x0c, 0xed];
    let rip = 0x2000;
    let c = cluster(&code, rip, Bitness::B32);
    assert_eq!(shape(&c), Shape::StraightLine);

    let mut guest = TestGuest::protected32(0x10000, avex_core::engine::Paging::None);
    load(&mut guest, rip, &code);
    guest.state.gpr[RAX as usize] = 0x8000_0800;
    guest.state.gpr[RDX as usize] = 0xcf8;
    guest.script_port(0xcfc, &[0x1237_8086]);
    let outcome = run(&c, &mut guest, 0, &RunLimits::default());

    assert_eq!(outcome.reason, StopReason::End);
    assert_eq!(guest.outs(), vec![(0xcf8, 4, 0x8000_0800)]);
    assert_eq!(guest.state.gpr[RAX as usize], 0x1237_8086);
    assert_eq!(guest.state.rip, rip + code.len() as u64);
}

#[test]
fn a_capped_back_edge_stops_the_cluster_at_its_target() {
    // out 0x80,al ; L: dec ecx ; jnz L ; out 0x80,al  (64-bit, paged)
    let code = [0xe6, 0x80, 0xff, 0xc9, 0x75, 0xfc, 0xe6, 0x80];
    let rip = 0xffff_8000_0000_3000;
    let c = cluster(&code, rip, Bitness::B64);
    assert_eq!(c.back_edges[0].cap, Some(10));

    let mut guest = TestGuest::long_mode(0x40_0000);
    guest.map_range(rip, 0x3000, 0x1000, pte::P | pte::RW);
    guest.write_bytes(0x3000, &code);
    guest.state.rip = rip;
    guest.state.gpr[RCX as usize] = 100;
    let outcome = run(&c, &mut guest, 0, &RunLimits::default());

    assert_eq!(outcome.reason, StopReason::BackEdgeCap);
    // Resumes at the loop head (`dec ecx`) with the capped iterations done.
    assert_eq!(outcome.rip, rip + 2);
    assert_eq!(outcome.index, Some(1));
    // The first pass plus ten capped iterations ran; the eleventh taken back-edge
    // completed as a branch to the loop head and stopped the cluster there.
    assert_eq!(guest.state.gpr[RCX as usize], 100 - 11);
    assert_eq!(guest.outs(), vec![(0x80, 1, 0)]);

    // With few iterations the loop finishes inside the cluster.
    let mut guest = TestGuest::long_mode(0x40_0000);
    guest.map_range(rip, 0x3000, 0x1000, pte::P | pte::RW);
    guest.write_bytes(0x3000, &code);
    guest.state.rip = rip;
    guest.state.gpr[RCX as usize] = 3;
    let outcome = run(&c, &mut guest, 0, &RunLimits::default());
    assert_eq!(outcome.reason, StopReason::End);
    assert_eq!(guest.state.gpr[RCX as usize], 0);
    assert_eq!(guest.outs().len(), 2);
}

#[test]
fn a_forward_branch_out_of_the_cluster_leaves_at_its_target() {
    // in al,0x71 ; test al,0x80 ; jnz +4 (past the cluster) ; out 0x70,al ; out 0x80,al
    let code = [0xe4, 0x71, 0xa8, 0x80, 0x75, 0x04, 0xe6, 0x70, 0xe6, 0x80];
    let rip = 0x1000;
    let c = cluster(&code, rip, Bitness::B32);
    let mut guest = TestGuest::protected32(0x10000, avex_core::engine::Paging::None);
    load(&mut guest, rip, &code);
    guest.script_port(0x71, &[0x80]);
    let outcome = run(&c, &mut guest, 0, &RunLimits::default());
    assert_eq!(outcome.reason, StopReason::ExitBranch);
    assert_eq!(outcome.rip, rip + 10);
    assert!(guest.outs().is_empty());
}
