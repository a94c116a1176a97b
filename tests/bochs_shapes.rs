//! Shape guests (tests/shapes) on the VT-x hypervisor in Bochs: each, pre-analyzed
//! with `avex link`, prints the bytes of mode `off` in every clustering mode, and
//! the vCPU's own behaviour (MSRs, CPUID, CR writes, TLB flushes) shows through
//! them. Needs Bochs, the GRUB tools and gcc; helpers in tests/support/bochs.rs.

mod support;

use avex_core::arch::msr;

use support::bochs::*;

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn the_virtual_cpu_refuses_unknown_msrs_and_describes_itself_in_cpuid() {
    let sig = |s: &[u8]| u64::from(u32::from_le_bytes(s.try_into().unwrap()));
    let mut want = String::new();
    for (n, v) in [
        ("wrmsr_gp", 1),
        ("rdmsr_gp", 1),
        ("vmx", 0),
        ("x2apic", 0),
        ("tsc_deadline", 0),
        ("xsave", 0),
        ("hypervisor", 1),
        ("apic", 0),
        ("hv_max", 0x4000_0000),
        ("hv_sig", (sig(b"avex") << 32) | sig(b"avex")),
        ("hv_sig_hi", sig(b"avex")),
        ("tsc_ratio", (1 << 32) | 1),
        // Bochs' TSC counts instructions at the configured rate (src/bochs.rs).
        ("crystal_hz", 10_000_000),
    ] {
        want += &line(n, v);
    }
    shape_prints_in_every_mode("vmx_cpu_model", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn the_guests_x87_and_sse_state_survives_every_exit_in_every_mode() {
    let mut want = String::new();
    want += &line("xmm_qwords_kept", 32);
    want += &line("mxcsr", 0x1f80 | (3 << 13));
    want += &line("st0_one", 1.0f64.to_bits());
    want += &line("st1_pi", std::f64::consts::PI.to_bits());
    shape_prints_in_every_mode("vmx_fpu_sse_across_exits", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn gs_relative_rip_relative_access_after_rdtsc_in_every_mode() {
    let mut want = String::new();
    for i in 1..=5 {
        want += &line("seen", i);
    }
    want += &line("target", 5);
    want += &line("decoy", 0);
    shape_prints_in_every_mode("vmx_gs_rip_relative", &want);
}

/// `report(name, v)`'s line in a shape's console.
fn line(name: &str, v: u64) -> String {
    format!("{name}={v:#018x}\r\n")
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn addr32_string_io_zero_extends_rsi_rdi_rcx_in_every_mode() {
    // The message goes out raw (no "\r" added).
    let mut want = String::from("addr32 rep outsb\n");
    for (n, v) in [
        ("rsi_hi", 0),
        ("rsi_moved", 17),
        ("rcx", 0),
        ("rdi_hi", 0),
        ("rdi_moved", 2),
        ("rcx", 0),
        // The LSR reads THR-empty | transmitter-empty twice.
        ("lsr", 0x6060),
        ("rsi_hi", 0),
        ("rsi_moved", 1),
    ] {
        want += &line(n, v);
    }
    shape_prints_in_every_mode("vmx_string_io_addr32", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn cr8_written_in_a_cluster_is_the_cr8_native_code_reads() {
    let mut want = String::new();
    for i in 1..=6 {
        want += &line("in_cluster", i);
        want += &line("native", i);
        want += &line("after_native", 7 - i);
    }
    want += &line("ticks", 12);
    shape_prints_in_every_mode("vmx_cr8_in_cluster", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn wrmsr_of_a_non_canonical_address_raises_gp_in_every_mode() {
    let mut want = String::new();
    for msr in [
        msr::FS_BASE,
        msr::GS_BASE,
        msr::KERNEL_GS_BASE,
        msr::LSTAR,
        msr::SYSENTER_ESP,
        msr::SYSENTER_EIP,
    ] {
        want += &line("msr", msr.into());
        want += &line("gp", 1);
        want += &line("kept", 1);
    }
    want += &line("gp_total", 6);
    shape_prints_in_every_mode("vmx_wrmsr_noncanonical", &want);
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn mov_to_cr3_above_maxphyaddr_raises_gp_in_every_mode() {
    let mut want = String::new();
    for _ in 0..3 {
        want += &line("cr3_above_maxphyaddr_gp", 1);
        want += &line("cr3_kept", 1);
    }
    want += &line("gp_total", 3);
    shape_prints_in_every_mode("vmx_cr3_write_gp", &want);
}

/// Passes once the engine checks CR4 writes against the vCPU's CPUID (the engine
/// branch's CR-write checks): the VT-x backend completes MOV to CR4 through the
/// engine, so it raises the engine's #GP.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn mov_to_cr4_with_unsupported_bits_raises_gp_in_every_mode() {
    let mut want = String::new();
    for n in ["cr4_vmxe_gp", "cr4_kept", "cr4_bit15_gp", "cr4_kept"] {
        want += &line(n, 1);
    }
    want += &line("gp_total", 2);
    shape_prints_in_every_mode("vmx_cr4_write_gp", &want);
}

/// With VPID the guest's TLB entries survive VM exits and entries: an INVLPG the
/// engine runs and a MOV CR3 the hypervisor completes must flush them (INVVPID).
/// Bochs flushes its TLB at every VM entry and exit whatever VPID says (the host's
/// CR3/CR4 loads), so here this guards the output rather than catching the miss.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn pages_remapped_and_flushed_by_the_engine_read_right_in_every_mode() {
    shape_prints_in_every_mode("vmx_tlb_flush", "YYXXYYXXYYXXYYXX\r\n");
}

/// Every shape guest (tests/shapes, whoever added it), pre-analyzed with `avex
/// link`, prints the same console bytes with the same status in every clustering
/// mode as in `off`. Shapes that need a fix from another branch fail here until it
/// is merged, as their own tests do.
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn every_shape_prints_the_same_bytes_in_every_mode() {
    let names = support::shapes::all();
    assert!(!names.is_empty());
    let dir = scratch("shapes");
    let mut jobs: Vec<Job<(String, usize, Tried)>> = Vec::new();
    for name in &names {
        let pre = dir.join(format!("{name}.pre.elf"));
        link(&support::shapes::build(name), &pre);
        for (k, &mode) in MODES.iter().enumerate() {
            let (pre, name) = (pre.clone(), name.clone());
            jobs.push(Box::new(move || (name, k, try_run_bochs(&pre, mode))));
        }
    }
    let mut results = parallel(jobs);
    let mut failures = Vec::new();
    for name in &names {
        let mut runs: Vec<(usize, Tried)> = Vec::new();
        results.retain_mut(|(n, k, r)| {
            if n == name {
                runs.push((*k, std::mem::replace(r, Err(String::new()))));
                false
            } else {
                true
            }
        });
        runs.sort_by_key(|(k, _)| *k);
        let runs: Vec<Tried> = runs.into_iter().map(|(_, r)| r).collect();
        failures.extend(differences_from_off(name, &MODES, &runs));
        if let Ok(off) = &runs[0] {
            eprintln!(
                "{name:<28} status {} exits {}",
                off.record["status"],
                MODES
                    .iter()
                    .zip(&runs)
                    .map(|(m, r)| format!(
                        "{m} {}",
                        r.as_ref().map_or("-".into(), |r| r.exits().to_string())
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
