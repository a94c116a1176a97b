//! Cluster formation over a whole file: the clusters to keep are chosen in one
//! pass in site order; a site not served by a cluster kept so far is translated
//! with `translate_region`, in parallel batches with the next such sites (each
//! translation depends only on the site and the code), so the result is the same
//! whatever the number of threads.
//!
//! A site needs no cluster of its own when the hypervisor, exiting there, would run
//! an existing cluster from it and that run can still absorb an exit: the cluster
//! it enters (hv/core's `containing_exit`: a cluster holding the site as an exiting
//! instruction that is not its last one, the largest if several) reaches an exiting
//! instruction from the site along its own edges.

use std::collections::{BTreeMap, HashMap};

use avex_core::ir::{Bitness, Cluster};
use rayon::prelude::*;

use crate::api::{self, ExitPolicy, NoCluster, TranslatorConfig};
use crate::patch::{PatchSites, Unpatched};
use crate::targets::Knowledge;

/// One exit-prone site to translate.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    pub space: usize,
    pub rip: u64,
    pub bitness: Bitness,
}

/// What formation gave.
#[derive(Debug, Default)]
pub struct Formed {
    /// Kept clusters, sorted by (address space, entry RIP), one per entry.
    pub clusters: Vec<(usize, Cluster)>,
    /// Sites given a cluster of their own, or a reason for none.
    pub translated: u64,
    /// Sites an existing cluster serves.
    pub covered: u64,
    /// Sites with no cluster of their own and none serving them, per reason.
    pub reasons: BTreeMap<&'static str, u64>,
    /// `Unsupported` reasons per blocking mnemonic.
    pub blockers: BTreeMap<String, u64>,
    /// Sites that are exiting instructions of a kept cluster with two or more
    /// exiting instructions.
    pub in_multi_exit_clusters: u64,
    /// For the other sites, why (a `NoCluster` name, or `one-exit-loop`: their
    /// cluster is a loop around that one instruction).
    pub not_in_multi_exit_clusters: BTreeMap<&'static str, u64>,
}

/// The only clusters holding the site have one exiting instruction (a loop
/// around it: clusters of one exiting instruction without a loop are not kept).
pub const ONE_EXIT_LOOP: &str = "one-exit-loop";
/// Its cluster's entry is the entry of a cluster already kept.
pub const SAME_ENTRY: &str = "same-entry";
/// The site's bytes are rewritten by the kernel at boot ([`crate::patch`]).
pub const PATCHED: &str = "patched-at-boot";

/// The cluster the hypervisor enters when the instruction at a RIP exits.
#[derive(Clone, Copy)]
struct Entered {
    insns: usize,
    entry: u64,
    serves: bool,
}

/// Indices of the exiting instructions of `c` that, entered at their first index
/// (as the hypervisor enters), are not the cluster's last instruction; with whether
/// an exiting instruction is reachable from there along the cluster's edges.
fn entry_points(c: &Cluster) -> Vec<(u64, bool)> {
    let n = c.insns.len();
    let mut first: HashMap<u64, usize> = HashMap::new();
    for (k, i) in c.insns.iter().enumerate() {
        first.entry(i.rip).or_insert(k);
    }
    c.insns
        .iter()
        .enumerate()
        .filter(|&(k, i)| i.exit_class.is_some() && first.get(&i.rip) == Some(&k) && k + 1 < n)
        .map(|(k, i)| (i.rip, c.reach_after(k).exiting > 0))
        .collect()
}

/// Whether a path of `c` stops at an indirect CALL/JMP or RET that knows no
/// destination (the run-time guard would learn it).
fn stops_at_unknown_destination(c: &Cluster) -> bool {
    (0..c.insns.len()).any(|k| c.insns[k].op.is_guarded() && c.guards_of(k).next().is_none())
}

/// Sites translated together ahead of need (some may turn out served by then).
const BATCH: usize = 16;

/// Translates the sites that need it and chooses the clusters to keep (module
/// docs). Regions end before bytes in `patches` (the kernel rewrites them at
/// boot), and a site in them gets no cluster.
pub fn form(
    sites: &[Site],
    knowledge: &Knowledge<'_>,
    patches: &PatchSites,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Formed {
    let translate = |s: &Site| {
        let Some(pieces) = knowledge.source(s.space) else {
            return Err(NoCluster::CodeEnds);
        };
        let mut src = Unpatched { pieces, patches };
        api::translate_region(&mut src, s.rip, s.bitness, policy, config).map(|t| t.cluster)
    };
    let mut out = Formed::default();
    // (space, rip) -> the cluster the hypervisor would enter there.
    let mut entered: HashMap<(usize, u64), Entered> = HashMap::new();
    let mut kept: BTreeMap<(usize, u64), Cluster> = BTreeMap::new();
    // Why each site's own translation gave no kept cluster (None: it did, or it
    // was not needed).
    let mut own: Vec<Option<&'static str>> = vec![None; sites.len()];
    let mut done: Vec<Option<Result<Cluster, NoCluster>>> = vec![None; sites.len()];
    let served = |entered: &HashMap<(usize, u64), Entered>, s: &Site| {
        entered.get(&(s.space, s.rip)).is_some_and(|e| e.serves)
    };
    for (i, s) in sites.iter().enumerate() {
        if served(&entered, s) {
            out.covered += 1;
            continue;
        }
        if patches.overlaps(s.rip, s.rip.saturating_add(1)) {
            *out.reasons.entry(PATCHED).or_insert(0) += 1;
            own[i] = Some(PATCHED);
            continue;
        }
        if done[i].is_none() {
            // Translate this site and, in parallel, the next ones not served so
            // far. Which sites a batch holds depends only on the sites and the
            // clusters kept before: the same whatever the thread count.
            let batch: Vec<usize> = (i..sites.len())
                .filter(|&j| done[j].is_none() && !served(&entered, &sites[j]))
                .take(BATCH)
                .collect();
            let results: Vec<_> = batch.par_iter().map(|&j| translate(&sites[j])).collect();
            for (j, r) in batch.into_iter().zip(results) {
                done[j] = Some(r);
            }
        }
        let Some(r) = done[i].take() else {
            continue;
        };
        if let Err(e) = &r {
            own[i] = Some(e.name());
        }
        out.translated += 1;
        let c = match r {
            Ok(c) => c,
            Err(e) => {
                *out.reasons.entry(e.name()).or_insert(0) += 1;
                if let Some(m) = e.blocker() {
                    *out.blockers.entry(format!("{m:?}")).or_insert(0) += 1;
                }
                continue;
            }
        };
        let Some(entry) = c.entry_rip() else {
            *out.reasons.entry(NoCluster::NotExiting.name()).or_insert(0) += 1;
            continue;
        };
        // One exiting instruction and no loop: running it after the exit absorbs
        // nothing (its paths end, or stop at a guard that knows no destination, before
        // another exit). The translator forms such a region so that the hypervisor
        // can learn at the guard; ahead of time it is only cost, and the dynamic
        // translator builds it itself where it pays.
        if c.exiting_count() < 2 && c.back_edges.is_empty() {
            let why = if stops_at_unknown_destination(&c) {
                NoCluster::IndirectUnknown
            } else {
                NoCluster::Single
            };
            *out.reasons.entry(why.name()).or_insert(0) += 1;
            own[i] = Some(why.name());
            continue;
        }
        if kept.contains_key(&(s.space, entry)) {
            *out.reasons.entry(SAME_ENTRY).or_insert(0) += 1;
            own[i] = Some(SAME_ENTRY);
            continue;
        }
        let len = c.insns.len();
        for (rip, serves) in entry_points(&c) {
            let e = entered.entry((s.space, rip)).or_insert(Entered {
                insns: 0,
                entry: 0,
                serves: false,
            });
            // hv/core's containing_exit: the largest; among equals, the last in
            // entry order.
            if (len, entry) >= (e.insns, e.entry) {
                *e = Entered {
                    insns: len,
                    entry,
                    serves,
                };
            }
        }
        kept.insert((s.space, entry), c);
    }
    // Which sites end up inside a cluster of two or more exiting instructions.
    let mut inside: HashMap<(usize, u64), usize> = HashMap::new();
    for (&(space, _), c) in &kept {
        let n = c.exiting_count();
        for i in c.insns.iter().filter(|i| i.exit_class.is_some()) {
            let e = inside.entry((space, i.rip)).or_insert(0);
            *e = (*e).max(n);
        }
    }
    for (s, own) in sites.iter().zip(own) {
        let why = match inside.get(&(s.space, s.rip)) {
            Some(&n) if n >= 2 => {
                out.in_multi_exit_clusters += 1;
                continue;
            }
            Some(_) => ONE_EXIT_LOOP,
            // In no kept cluster: why its own translation gave none.
            None => own.unwrap_or(NoCluster::Single.name()),
        };
        *out.not_in_multi_exit_clusters.entry(why).or_insert(0) += 1;
    }
    out.clusters = kept.into_iter().map(|((space, _), c)| (space, c)).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use avex_core::translator::Pieces;

    const BASE: u64 = 0x40_0000;
    const OUT: [u8; 2] = [0xe6, 0x80]; // out %al, $0x80

    /// Three OUTs, then plain instructions and a RET.
    fn three_outs() -> Vec<u8> {
        let mut code = [OUT, OUT, OUT].concat();
        code.extend_from_slice(&[0x90; 20]);
        code.push(0xc3);
        code
    }

    fn knowledge(code: &[u8]) -> Knowledge<'_> {
        let mut p = Pieces::new();
        p.add(BASE, code);
        Knowledge {
            spaces: [(0, p)].into_iter().collect(),
            targets: Vec::new(),
            thunks: Vec::new(),
            report: Default::default(),
        }
    }

    fn sites(rips: &[u64]) -> Vec<Site> {
        rips.iter()
            .map(|&rip| Site {
                space: 0,
                rip,
                bitness: Bitness::B64,
            })
            .collect()
    }

    #[test]
    fn an_exiting_instruction_is_an_entry_point_that_serves_only_if_an_exit_follows() {
        // A: out; jz C; B: out; jmp away; C: out; (nops)
        let mut code = vec![0xe6, 0x80, 0x74, 0x04, 0xe6, 0x80, 0xeb, 0x7f, 0xe6, 0x80];
        code.resize(0x100, 0x90);
        let c = avex_core::translator::translate(
            &code,
            BASE,
            Bitness::B64,
            &crate::policy_all(),
            &TranslatorConfig::default(),
        )
        .unwrap();
        assert_eq!(c.exiting_count(), 3);
        // From B only the jump away follows: entering there absorbs nothing. C is
        // the last instruction, where the hypervisor enters no cluster.
        assert_eq!(entry_points(&c), vec![(BASE, true), (BASE + 4, false)]);
        let c = avex_core::translator::translate(
            &three_outs(),
            BASE,
            Bitness::B64,
            &crate::policy_all(),
            &TranslatorConfig::default(),
        )
        .unwrap();
        // The third is the last exiting instruction: entered there (when the region
        // goes on past it), the run absorbs nothing.
        let points = entry_points(&c);
        assert_eq!(points[..2], [(BASE, true), (BASE + 2, true)]);
        assert!(
            points[2..].is_empty() || points[2..] == [(BASE + 4, false)],
            "{points:?}"
        );
    }

    /// The third OUT lies in the first cluster, but entering that cluster there
    /// absorbs no exit: it is not served, so it is translated on its own (and, with
    /// nothing exiting after it, keeps no cluster). The second is served.
    #[test]
    fn a_site_is_covered_only_when_the_cluster_entered_there_serves_it() {
        let code = three_outs();
        let k = knowledge(&code);
        let f = form(
            &sites(&[BASE, BASE + 2, BASE + 4]),
            &k,
            &PatchSites::default(),
            &crate::policy_all(),
            &TranslatorConfig::default(),
        );
        assert_eq!(f.clusters.len(), 1);
        assert_eq!(f.covered, 1);
        assert_eq!(f.translated, 2);
        // Its own region stops at the RET, whose destinations nobody knows.
        assert_eq!(
            f.reasons.get("indirect-unknown"),
            Some(&1),
            "{:?}",
            f.reasons
        );
        assert_eq!(f.in_multi_exit_clusters, 3);
        assert!(f.not_in_multi_exit_clusters.is_empty());
    }

    /// Clusters come out sorted by entry, one per entry, whatever the order the
    /// sites were translated in and the number of threads.
    #[test]
    fn formation_is_the_same_with_one_thread_or_many() {
        let elf = crate::synth::elf(64, 1 << 20, 3, false);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    crate::analyze_bytes(
                        "synth",
                        &elf,
                        &crate::policy_all(),
                        &TranslatorConfig::default(),
                    )
                    .unwrap()
                })
        };
        let one = run(1);
        assert!(one.clusters.len() > 100);
        let entries: Vec<u64> = one.clusters.iter().filter_map(|c| c.entry_rip()).collect();
        assert!(
            entries.windows(2).all(|w| w[0] < w[1]),
            "sorted, one per entry"
        );
        assert_eq!(entries.len(), one.clusters.len());
        for threads in [2, 4, 7] {
            let many = run(threads);
            assert_eq!(many.clusters, one.clusters, "{threads} threads");
            assert_eq!(many.report.sites_covered, one.report.sites_covered);
            assert_eq!(many.report.unclustered, one.report.unclustered);
            assert_eq!(many.indirect_targets, one.indirect_targets);
        }
    }

    /// Bytes the kernel rewrites at boot end a region before them, and a site in
    /// them gets no cluster: its translation would be stale before its first run.
    #[test]
    fn regions_stop_before_patched_bytes() {
        let code = three_outs();
        let k = knowledge(&code);
        // The third OUT is patched: the cluster holds the first two only.
        let patched = PatchSites::from_ranges([(BASE + 4, 2)]);
        let f = form(
            &sites(&[BASE, BASE + 2, BASE + 4]),
            &k,
            &patched,
            &crate::policy_all(),
            &TranslatorConfig::default(),
        );
        assert_eq!(f.clusters.len(), 1);
        let c = &f.clusters[0].1;
        assert_eq!(c.exiting_count(), 2);
        assert!(c
            .code
            .iter()
            .all(|r| !patched.overlaps(r.start, r.start + r.bytes.len() as u64)));
        assert_eq!(f.reasons.get(PATCHED), Some(&1), "{:?}", f.reasons);
    }
}
