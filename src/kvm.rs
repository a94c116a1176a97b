//! The `--backend kvm` runner: hv/kvm on /dev/kvm, in this process.

use avex_core::stats::ExitStats;

use crate::backend::{Backend, RunRequest, RunResult, TimeSplit};

/// The hosted backend.
pub struct Kvm;

impl Backend for Kvm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn run(
        &self,
        req: &RunRequest<'_>,
        console: &mut dyn FnMut(&[u8]),
    ) -> anyhow::Result<RunResult> {
        if req.kernel.initrd.is_some() || req.kernel.mem_mib.is_some() {
            anyhow::bail!(
                "{}: --initrd and --mem are for kernels on --backend bochs (this KVM's \
                 instruction emulator cannot run Linux: PLATFORM.md)",
                req.name
            );
        }
        if req.kernel.cpu_mhz.is_some() {
            anyhow::bail!(
                "{}: --cpu-mhz sets the guest clock of --backend bochs; on KVM the guest \
                 runs on the host's clock",
                req.name
            );
        }
        let config = avex_kvm::Config {
            mode: req.mode,
            policy: req.policy.clone(),
            timeout: Some(req.timeout),
            translations: req.translations.clone(),
            cmdline: req.kernel.cmdline.clone(),
            coalesce: req.coalesce,
            exit_distance: req.exit_distance,
            ..avex_kvm::Config::default()
        };
        let r = avex_kvm::run(req.elf, &config, console)
            .map_err(|e| anyhow::anyhow!("{}: {e}", req.name))?;
        let mut details = r.kvm_stats.clone();
        details.insert("user_exits".into(), r.user_exits);
        details.insert("completions".into(), r.completions);
        details.insert("unattributed_exits".into(), r.unattributed_exits);
        details.insert("tlb_flushes".into(), r.tlb_flushes);
        details.insert("reg_ioctls".into(), r.reg_ioctls);
        details.insert("kvm_run_ns".into(), r.time.kvm_run_ns);
        details.insert("completion_ns".into(), r.time.completion_ns);
        details.insert("cluster_ns".into(), r.time.cluster_ns);
        details.insert("exit_distance_ns".into(), r.time.distance_ns);
        let mut notes = vec![match &r.msr_exits {
            avex_kvm::MsrExits::Enabled => "MSR exits: to user space (filter)".to_string(),
            avex_kvm::MsrExits::NotNeeded => "MSR exits: none intercepted".to_string(),
            avex_kvm::MsrExits::Unsupported(why) => {
                format!("MSR exits: handled inside KVM ({why})")
            }
        }];
        match &r.coalescing {
            avex_kvm::Coalescing::Off => {}
            avex_kvm::Coalescing::On => notes.push(format!(
                "coalesced PIO: {} (KVM holds these writes in its ring; avex applies them \
                 in order at the next exit to user space)",
                avex_kvm::ZONES
                    .iter()
                    .map(|z| format!("{:#x} {}", z.port, z.device))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            avex_kvm::Coalescing::Unsupported(why) => {
                anyhow::bail!("{}: --coalesce: {why}", req.name)
            }
        }
        notes.extend(r.exit_statistics_unreadable.clone());
        let mut result = RunResult {
            status: r.status,
            stats: r.stats,
            console: r.console,
            seconds: r.seconds,
            details,
            notes,
            exit_statistics_unreadable: r.exit_statistics_unreadable,
            time_split: None,
            coalesced: r.coalescing == avex_kvm::Coalescing::On,
        };
        result.time_split = time_split(&result);
        Ok(result)
    }

    fn exits_counted(&self, stats: &ExitStats) -> &'static str {
        if stats.hardware_exits.is_some() {
            "KVM's `exits` statistic (KVM_GET_STATS_FD): the exits to user space (port \
             I/O, filtered MSRs, HLT) plus the few KVM takes for itself (host interrupts, \
             preemption). On this software KVM, CPUID, CR moves and RDTSC are not exits: \
             KVM's emulator runs them with every other instruction (`insn_emulation`)"
        } else {
            "the exits to user space only (KVM's statistics could not be read): port I/O, \
             filtered MSRs, HLT"
        }
    }
}

/// The split of a KVM run's wall time, from its details (`None` without them).
pub fn time_split(r: &RunResult) -> Option<TimeSplit> {
    let ms = |k: &str| r.details.get(k).map(|&ns| ns as f64 / 1e6);
    let kvm_run_ms = ms("kvm_run_ns")?;
    let completion_ms = ms("completion_ns").unwrap_or(0.0);
    // Reading the exit distance is measurement, not handling: taken out.
    let exit_distance_ms = ms("exit_distance_ns").unwrap_or(0.0);
    let total_ms = (r.seconds * 1e3 - exit_distance_ms).max(0.0);
    Some(TimeSplit {
        total_ms,
        kvm_run_ms,
        user_space_ms: (total_ms - kvm_run_ms).max(0.0),
        cluster_ms: ms("cluster_ns").unwrap_or(0.0),
        completion_ms,
        exit_distance_ms,
        kvm_emulated_insns: r.details.get("insn_emulation").copied(),
        engine_insns: r.stats.cluster_insns,
    })
}
