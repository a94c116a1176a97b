//! The JSON record of one run (`avex run --json`, and each element of `avex compare
//! --json`): the same fields on every backend. The exit handler's [`ExitStats`] is
//! in it whole (flattened: its serde field names are record field names), next to
//! the quantities derived from it and what the run itself reports.

use std::collections::BTreeMap;

use avex_core::exit::Mode;
use avex_core::stats::ExitStats;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, RunResult, TimeSplit};

#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub guest: String,
    pub mode: String,
    /// Writes were coalesced (KVM's coalesced PIO, `--coalesce`): the table and
    /// chart name the run `MODE+coalesce`.
    pub coalesced: bool,
    pub backend: String,
    pub status: u8,
    /// VM exits the hardware took; what that is on this backend: `exits_counted`.
    pub exits: u64,
    pub exits_counted: String,
    /// Exits plus instructions run inside clusters that exit on this backend.
    pub exit_prone: u64,
    pub avoided: u64,
    pub reduction: f64,
    /// Instructions of an exit class run inside clusters that do not exit on this
    /// backend (KVM: CPUID, RDTSC, CR moves): never counted as avoided.
    pub in_cluster_not_exiting: u64,
    /// Everything the exit handler counted, under its own field names
    /// (`exits_by_reason`, `handled_exits`, `in_cluster_exiting_by_class`, ...).
    #[serde(flatten)]
    pub stats: ExitStats,
    /// KVM: wall time apart (time in KVM_RUN, time handling exits in user space).
    pub time_split: Option<TimeSplit>,
    pub console_sha256: String,
    pub console_bytes: usize,
    pub seconds: f64,
    pub backend_stats: BTreeMap<String, u64>,
    pub notes: Vec<String>,
    /// Why the exit statistic (KVM's `exits`) could not be read; `exits` then
    /// counts only handled exits. `null` when it was read.
    pub exit_statistics_unreadable: Option<String>,
    /// The hardware cost model's projection for this run (src/cost.rs: a
    /// projection, not a measurement); `null` without an exit distance.
    pub cost_model: Option<crate::cost::Projection>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl RunRecord {
    pub fn new(guest: &str, mode: Mode, backend: &dyn Backend, r: &RunResult) -> RunRecord {
        let s = &r.stats;
        RunRecord {
            guest: guest.to_string(),
            mode: mode.name().to_string(),
            coalesced: r.coalesced,
            backend: backend.name().to_string(),
            status: r.status,
            exits: s.exits(),
            exits_counted: backend.exits_counted(s).to_string(),
            exit_prone: s.exit_prone(),
            avoided: s.avoided(),
            reduction: s.reduction(),
            in_cluster_not_exiting: s.in_cluster_not_exiting(),
            stats: s.clone(),
            time_split: r.time_split,
            console_sha256: sha256_hex(&r.console),
            console_bytes: r.console.len(),
            seconds: r.seconds,
            backend_stats: r.details.clone(),
            notes: r.notes.clone(),
            exit_statistics_unreadable: r.exit_statistics_unreadable.clone(),
            cost_model: crate::cost::of_stats(s.exits(), s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avex_core::policy::ExitClass;
    use avex_core::stats::{EarlyStop, ExitReason, Summary};

    /// Every field of `ExitStats` set to something not its default. A struct
    /// literal without `..`: a new field does not compile until it is given a value
    /// here, and from then on the test below checks that it reaches the record.
    fn every_field_set() -> ExitStats {
        ExitStats {
            by_reason: [(ExitReason::IoOut, 6), (ExitReason::Ins, 1)].into(),
            handled: 7,
            hardware_exits: Some(9),
            in_cluster_exiting: 5,
            in_cluster_by_class: [(ExitClass::Out, 4), (ExitClass::MovToCr3, 1)].into(),
            in_cluster_not_exiting_by_class: [(ExitClass::Cpuid, 2)].into(),
            exit_set: vec![ExitClass::Out, ExitClass::MovToCr3],
            clusters_run: 3,
            clusters_run_aot: 2,
            clusters_run_dynamic: 1,
            cluster_insns: 40,
            clusters_skipped_idle: 22,
            early_stops: [(EarlyStop::Budget, 1), (EarlyStop::GeneralProtection, 2)].into(),
            translations_loaded: 11,
            translations_rejected: Some("digest \"differs\"".into()),
            translations_built: 13,
            translation_failures: 14,
            translation_failures_by_reason: [("unsupported(Imul)".to_string(), 14)].into(),
            translate_ns: 15,
            translate_insns: 16,
            stale_dropped: 17,
            aot_translations_ran: 20,
            aot_translations_stale: 21,
            indirect_targets_learned: 18,
            translations_rebuilt: 19,
            translations_for_callers: 23,
            port_exits: [(0x3f8, 24)].into(),
            by_rip: [(0x1000, 3), (0xffff_ffff_8000_0000, 4)].into(),
            exit_sites: [(
                0x1000,
                avex_core::stats::ExitSite {
                    reason: Some(ExitReason::IoIn),
                    clustered: 2,
                    absorbed: 5,
                    ends: [(0x1010, 2)].into(),
                    ends_other: 0,
                    runs_since_learning: 2,
                },
            )]
            .into(),
            coalesced_writes: 20,
            exit_distance: Some(avex_core::distance::ExitDistance {
                source: "bochs_tsc".into(),
                log2_buckets: vec![1, 0, 2],
                gaps: 3,
                guest_insns: 7,
                engine_insns: 2,
                clamped: 1,
            }),
        }
    }

    fn result(stats: ExitStats) -> RunResult {
        RunResult {
            status: 0,
            stats,
            console: b"hi".to_vec(),
            seconds: 0.5,
            details: Default::default(),
            notes: vec![],
            exit_statistics_unreadable: None,
            time_split: None,
            coalesced: false,
        }
    }

    #[test]
    fn every_exit_statistic_reaches_the_record_on_both_backends() {
        let full = every_field_set();
        let as_json = serde_json::to_value(&full).unwrap();
        let fields = as_json.as_object().unwrap();
        // No field is left at its default (else a dropped one could pass unseen).
        let default = serde_json::to_value(ExitStats::default()).unwrap();
        for (k, v) in fields {
            assert_ne!(Some(v), default.get(k), "{k} is at its default in the test");
        }
        // VT-x: the hypervisor prints a Summary as JSON, the host reads it back.
        let printed = serde_json::to_string(&Summary {
            stats: Some(full.clone()),
            ..Summary::default()
        })
        .unwrap();
        let read = crate::bochs::parse_summary(&printed)
            .unwrap()
            .stats
            .unwrap();
        assert_eq!(read, full, "lost between the hypervisor and the host");
        // Both backends: every field is in the record, with its value, and reads
        // back whole.
        let kvm_keys: Vec<String>;
        {
            let rec = RunRecord::new("g", Mode::Dynamic, &crate::kvm::Kvm, &result(full.clone()));
            let v = serde_json::to_value(&rec).unwrap();
            for (k, want) in fields {
                assert_eq!(v.get(k), Some(want), "kvm record: {k}");
            }
            assert_eq!(
                serde_json::from_value::<ExitStats>(v.clone()).unwrap(),
                full
            );
            kvm_keys = v.as_object().unwrap().keys().cloned().collect();
        }
        let rec = RunRecord::new("g", Mode::Dynamic, &crate::bochs::Bochs, &result(read));
        let v = serde_json::to_value(&rec).unwrap();
        for (k, want) in fields {
            assert_eq!(v.get(k), Some(want), "bochs record: {k}");
        }
        assert_eq!(
            serde_json::from_value::<ExitStats>(v.clone()).unwrap(),
            full
        );
        let bochs_keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(kvm_keys, bochs_keys);
        // The derived numbers agree with the statistics.
        assert_eq!(v["exits"], 9);
        assert_eq!(v["exit_prone"], 14);
        assert_eq!(v["in_cluster_not_exiting"], 2);
    }

    #[test]
    fn names_in_json_are_the_report_names() {
        for c in ExitClass::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
        for r in ExitReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
        for e in EarlyStop::ALL {
            assert_eq!(serde_json::to_value(e).unwrap(), e.name());
        }
        let v = serde_json::to_value(every_field_set()).unwrap();
        assert_eq!(v["exits_by_reason"]["io_out"], 6);
        assert_eq!(v["in_cluster_exiting_by_class"]["MOV_TO_CR3"], 1);
        assert_eq!(v["early_stops"]["GP"], 2);
        assert_eq!(v["exit_set"][1], "MOV_TO_CR3");
    }
}
