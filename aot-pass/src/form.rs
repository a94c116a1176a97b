//! Cluster formation over a whole file: every exit-prone site is translated with
//! `translate_region` (in parallel; each translation depends only on the site and
//! the code), then the clusters to keep are chosen in one pass in site order, so
//! the result is the same whatever the number of threads.
//!
//! A site needs no cluster of its own when the hypervisor, exiting there, would run
//! an existing cluster from it and that run can still absorb an exit: the cluster
//! it enters (hv/core's `containing_exit`: a cluster holding the site as an exiting
//! instruction that is not its last one, the largest if several) reaches an exiting
//! instruction from the site along its own edges.

use std::collections::{BTreeMap, HashMap};

use avex_core::ir::{Bitness, Cluster, Target};
use rayon::prelude::*;

use crate::api::{self, ExitPolicy, NoCluster, TranslatorConfig};
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
/// around it).
pub const ONE_EXIT_LOOP: &str = "one-exit-loop";
/// Its cluster's entry is the entry of a cluster already kept.
pub const SAME_ENTRY: &str = "same-entry";

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
    let succ = |k: usize| {
        let i = &c.insns[k];
        let mut out: Vec<usize> = Vec::new();
        if i.op.falls_through()
            && k + 1 < n
            && c.insns[k + 1].rip == i.rip.wrapping_add(u64::from(i.len))
        {
            out.push(k + 1);
        }
        if let Some(Target::Insn(j)) = i.op.target() {
            out.push(usize::from(j));
        }
        for g in c.guards_of(k) {
            if let Target::Insn(j) = g.target {
                out.push(usize::from(j));
            }
        }
        out
    };
    let mut first: HashMap<u64, usize> = HashMap::new();
    for (k, i) in c.insns.iter().enumerate() {
        first.entry(i.rip).or_insert(k);
    }
    let mut out = Vec::new();
    for (k, i) in c.insns.iter().enumerate() {
        if i.exit_class.is_none() || first.get(&i.rip) != Some(&k) || k + 1 >= n {
            continue;
        }
        let mut seen = vec![false; n];
        let mut stack = succ(k);
        let mut serves = false;
        while let Some(j) = stack.pop() {
            if j >= n || seen[j] {
                continue;
            }
            seen[j] = true;
            if c.insns[j].exit_class.is_some() {
                serves = true;
                break;
            }
            stack.extend(succ(j));
        }
        out.push((i.rip, serves));
    }
    out
}

/// Translates every site and chooses the clusters to keep (module docs).
pub fn form(
    sites: &[Site],
    knowledge: &Knowledge<'_>,
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Formed {
    let results: Vec<Result<Cluster, NoCluster>> = sites
        .par_iter()
        .map(|s| {
            let Some(pieces) = knowledge.source(s.space) else {
                return Err(NoCluster::CodeEnds);
            };
            let mut src = pieces;
            api::translate_region(&mut src, s.rip, s.bitness, policy, config).map(|t| t.cluster)
        })
        .collect();
    let mut out = Formed::default();
    // (space, rip) -> the cluster the hypervisor would enter there.
    let mut entered: HashMap<(usize, u64), Entered> = HashMap::new();
    let mut kept: BTreeMap<(usize, u64), Cluster> = BTreeMap::new();
    let own: Vec<Option<&'static str>> = results
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.name()))
        .collect();
    for (s, r) in sites.iter().zip(results) {
        if entered.get(&(s.space, s.rip)).is_some_and(|e| e.serves) {
            out.covered += 1;
            continue;
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
        if kept.contains_key(&(s.space, entry)) {
            *out.reasons.entry(SAME_ENTRY).or_insert(0) += 1;
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
            // In no kept cluster: its own translation's reason (a translation that
            // succeeded but was not kept shares its entry with a kept one).
            None => own.unwrap_or(SAME_ENTRY),
        };
        *out.not_in_multi_exit_clusters.entry(why).or_insert(0) += 1;
    }
    out.clusters = kept.into_iter().map(|((space, _), c)| (space, c)).collect();
    out
}
