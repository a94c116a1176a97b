//! avex's ahead-of-time pass: reads a guest ELF (ELF32 or ELF64; ET_EXEC, ET_DYN or
//! ET_REL) through hv/core's ELF reader (`avex_core::elf`; [`elf`] is what the pass
//! takes from it: code areas, code symbols, pointers in data), finds its code,
//! classifies every decoded instruction with the exit policy, forms clusters with
//! hv/core's translator at every exit-prone site, and reports.
//!
//! ```text
//! analyze_bytes(name, elf, policy, config) -> Analysis { report, clusters, sites, .. }
//! Analysis::translation_set(elf, policy, config) -> TranslationSet (with the guest identity)
//! ```
//!
//! How code is found, and in which bitness it is decoded, is described in
//! `docs/analyze.md` and on [`analyze_bytes`].

pub mod api;
pub mod elf;
mod form;
pub mod patch;
mod scan;
pub mod synth;
pub mod targets;

use std::collections::BTreeMap;
use std::time::Instant;

use avex_core::ir::{Bitness, Cluster};
use rayon::prelude::*;
use serde::Serialize;

pub use api::{ExitClass, ExitPolicy, NoCluster, Shape, TranslatorConfig};
use elf::CodeArea;
use scan::{decode_score, Region};

/// Why a file could not be analyzed. Every variant names what is wrong and where
/// (file offsets in bytes).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AnalyzeError {
    /// The ELF reader refused the file: the error names the field, its offset and
    /// why.
    #[error(transparent)]
    Elf(#[from] avex_core::elf::ElfError),
    #[error("unknown machine {machine} ({name}) in e_machine at offset 0x12: avex analyzes x86 only (EM_386, EM_X86_64)")]
    UnknownMachine { machine: u16, name: &'static str },
}

/// Minimum, maximum, mean and total of a per-cluster count.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    pub total: u64,
}

impl Stats {
    fn of(values: impl Iterator<Item = u64>) -> Stats {
        let (mut min, mut max, mut total, mut n) = (u64::MAX, 0, 0, 0u64);
        for v in values {
            min = min.min(v);
            max = max.max(v);
            total += v;
            n += 1;
        }
        if n == 0 {
            return Stats::default();
        }
        Stats {
            min,
            max,
            mean: total as f64 / n as f64,
            total,
        }
    }
}

/// A run of code decoded in one bitness.
#[derive(Clone, Debug, Serialize)]
pub struct RegionReport {
    /// Section name (or `segment N`), with `+0xOFF` when a section was split.
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// 16, 32 or 64.
    pub bitness: u32,
    /// Why this bitness: `elf-class`, `section-name`, `symbol-name`, `far-jump`,
    /// `decode-heuristic`.
    pub bitness_reason: &'static str,
    pub instructions: u64,
    pub sites: u64,
}

/// Seconds spent.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timing {
    pub parse: f64,
    pub decode: f64,
    pub cluster: f64,
    pub total: f64,
}

/// The report of one file. Serialized as documented in docs/analyze.md.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub file: String,
    /// 32 or 64.
    pub elf_class: u32,
    pub machine: &'static str,
    /// `EXEC`, `DYN` or `REL`.
    pub elf_type: &'static str,
    pub entry: Option<u64>,
    pub code_symbols: u64,
    pub regions: Vec<RegionReport>,
    /// Bytes in executable sections (or segments).
    pub code_bytes: u64,
    /// Bytes covered by decoded instructions.
    pub bytes_decoded: u64,
    /// Of those, reached by recursive traversal (the rest by linear sweep).
    pub bytes_traversed: u64,
    pub instructions: u64,
    /// Byte positions that did not decode as an instruction.
    pub invalid: u64,
    /// Exit-prone sites per class (`ExitClass::name()`): instructions that exit
    /// under the policy. Classes without sites are omitted.
    pub sites: BTreeMap<&'static str, u64>,
    /// Instructions of each exit class whatever the policy (omitted when zero).
    pub class_instructions: BTreeMap<&'static str, u64>,
    /// The classes that can exit under the policy used (others never have sites).
    pub policy_classes: Vec<&'static str>,
    pub sites_total: u64,
    /// Clusters formed.
    pub clusters: u64,
    /// Instructions per cluster.
    pub cluster_instructions: Stats,
    /// Exiting instructions per cluster.
    pub cluster_exiting: Stats,
    /// Clusters per shape: `straight-line`, `branching`, `looping`.
    pub cluster_shapes: BTreeMap<&'static str, u64>,
    /// Sites that needed a cluster of their own (each gave a cluster or a reason).
    pub sites_translated: u64,
    /// Sites an earlier cluster serves: the hypervisor, exiting there, enters it
    /// and can still absorb an exit (no cluster of their own).
    pub sites_covered: u64,
    /// Sites the translator formed no cluster at.
    pub sites_unclustered: u64,
    /// Why, per `NoCluster::name()` (and `same-entry`: the cluster formed there
    /// has the entry of one already kept).
    pub unclustered: BTreeMap<&'static str, u64>,
    /// Of `unclustered["unsupported"]`, per blocking mnemonic.
    pub unsupported_blockers: BTreeMap<String, u64>,
    /// Sites that are exiting instructions of a cluster holding two or more.
    pub sites_in_clusters: u64,
    /// Why each other site is in no such cluster: its own translation's
    /// `NoCluster::name()`, or `one-exit-loop` (its cluster loops over it alone).
    pub sites_not_in_clusters: BTreeMap<&'static str, u64>,
    /// What the pass knows of indirect destinations (thunks, returns, function
    /// pointers).
    pub indirect: targets::KnowledgeReport,
    pub seconds: Timing,
}

/// The result of analyzing one ELF.
#[derive(Clone, Debug)]
pub struct Analysis {
    pub report: Report,
    /// Clusters sorted by entry RIP, one per entry (ET_REL: per section, in section
    /// order).
    pub clusters: Vec<Cluster>,
    /// Every exit-prone site under the policy: (region index in `report.regions`,
    /// RIP, class), in region then address order.
    pub sites: Vec<(usize, u64, ExitClass)>,
    /// Known destinations of indirect branches and returns, as the translator
    /// was given them: (address space, branch address, destination), sorted. The
    /// address space is 0, or in ET_REL the executable section's index.
    pub indirect_targets: Vec<(usize, u64, u64)>,
    /// Recognised thunks: (address space, address, what a branch to it does), sorted.
    pub thunks: Vec<(usize, u64, targets::Thunk)>,
}

impl Analysis {
    /// The translation set for this guest: its clusters (by start, one per start),
    /// the guest's identity, and the policy and translator configuration they were
    /// made under. `elf` is the file analyzed (its identity is computed here, only
    /// when a set is made). `avex analyze -o`, `avex link` and `avex run` all write
    /// this.
    pub fn translation_set(
        &self,
        elf: &[u8],
        policy: &ExitPolicy,
        config: &TranslatorConfig,
    ) -> Result<avex_core::format::TranslationSet, AnalyzeError> {
        use avex_core::format::{self, GuestIdentity, TranslationSet, TranslatorStamp};
        let description = api::describe_config(config);
        let mut clusters = self.clusters.clone();
        clusters.sort_by_key(|c| c.entry_rip());
        clusters.dedup_by_key(|c| c.entry_rip());
        Ok(TranslationSet {
            guest: GuestIdentity {
                digest: avex_core::identity::of_elf(elf)?,
                name: self.report.file.clone(),
            },
            policy: policy.fingerprint(),
            translator: TranslatorStamp {
                fingerprint: format::fingerprint_of(&description),
                description,
            },
            clusters,
        })
    }
}

/// Upper-case report name of an exit class.
pub fn class_name(c: ExitClass) -> &'static str {
    api::class_name(c)
}

/// A policy under which every class that can exit under VT-x does: every port and
/// MSR intercepted, every exiting control on, every CR0/CR4 bit owned
/// (`avex analyze --policy all`).
pub fn policy_all() -> ExitPolicy {
    let mut b = ExitPolicy::builder()
        .intercept_all_ports()
        .intercept_all_msrs()
        .cr0_guest_host_mask(u64::MAX)
        .cr4_guest_host_mask(u64::MAX);
    for c in api::VmcsControl::ALL {
        b = b.enable(c);
    }
    b.build()
}

struct Planned<'a> {
    region: Region<'a>,
    name: String,
    reason: &'static str,
}

const SAMPLE: usize = 64 * 1024;

fn rex_percent(s: (u32, u32, u32)) -> u32 {
    (s.2 * 100).checked_div(s.1).unwrap_or(0)
}

/// Does `bytes` look like 64-bit code rather than 32-bit? `min_percent`: how many
/// instructions of the 32-bit decoding must be one-byte INC/DEC (REX prefixes).
fn looks_64(bytes: &[u8], addr: u64, min_percent: u32, min_insns: u32) -> bool {
    let b = &bytes[..bytes.len().min(SAMPLE)];
    let s32 = decode_score(b, addr, Bitness::B32);
    let s64 = decode_score(b, addr, Bitness::B64);
    s32.1 >= min_insns && s64.0 <= s32.0 && rex_percent(s32) >= min_percent
}

fn looks_32(bytes: &[u8], addr: u64) -> bool {
    let b = &bytes[..bytes.len().min(SAMPLE)];
    let s32 = decode_score(b, addr, Bitness::B32);
    let s64 = decode_score(b, addr, Bitness::B64);
    s32.0 <= s64.0 && rex_percent(s32) < 3
}

fn looks_16(bytes: &[u8], addr: u64, than: Bitness) -> bool {
    let b = &bytes[..bytes.len().min(SAMPLE)];
    decode_score(b, addr, Bitness::B16).0 <= decode_score(b, addr, than).0
}

/// Decides the bitness of each area (and of parts of areas) and cuts regions.
fn plan<'a>(
    elf: &elf::Elf<'a>,
    overrides: &[(usize, u64, u64, Bitness, &'static str)],
) -> Vec<Planned<'a>> {
    let default = if elf.bits == 64 || elf.machine == elf::EM_X86_64 {
        Bitness::B64
    } else {
        Bitness::B32
    };
    let mut out = Vec::new();
    for (ai, area) in elf.code.iter().enumerate() {
        let lname = area.name.to_ascii_lowercase();
        let (mut bitness, mut reason) = (default, "elf-class");
        if lname.contains("16") || lname.contains("realmode") || lname.contains("real_mode") {
            if looks_16(area.bytes, area.addr, default) {
                (bitness, reason) = (Bitness::B16, "section-name");
            }
        } else if lname.contains("64") && default != Bitness::B64 {
            if looks_64(area.bytes, area.addr, 3, 1) {
                (bitness, reason) = (Bitness::B64, "section-name");
            }
        } else if lname.contains("32") && default == Bitness::B64 {
            if looks_32(area.bytes, area.addr) {
                (bitness, reason) = (Bitness::B32, "section-name");
            }
        } else if default == Bitness::B32 && looks_64(area.bytes, area.addr, 15, 64) {
            (bitness, reason) = (Bitness::B64, "decode-heuristic");
        }
        // Cut points within this area: overrides (symbol names, far-jump targets).
        let mut cuts: Vec<(u64, u64, Bitness, &'static str)> = overrides
            .iter()
            .filter(|o| o.0 == ai)
            .map(|o| (o.1, o.2, o.3, o.4))
            .collect();
        cuts.sort_by_key(|c| c.0);
        let end = area.addr + area.bytes.len() as u64;
        let mut pos = area.addr;
        let push = |from: u64, to: u64, b: Bitness, why: &'static str, out: &mut Vec<_>| {
            if to <= from {
                return;
            }
            let lo = (from - area.addr) as usize;
            let hi = (to - area.addr) as usize;
            out.push(Planned {
                region: Region {
                    area: ai,
                    addr: from,
                    bytes: &area.bytes[lo..hi],
                    bitness: b,
                    space: area.space,
                },
                name: if from == area.addr {
                    area.name.clone()
                } else {
                    format!("{}+{:#x}", area.name, from - area.addr)
                },
                reason: why,
            });
        };
        for (s, e, b, why) in cuts {
            let (s, e) = (s.max(pos), e.min(end));
            if s >= e {
                continue;
            }
            push(pos, s, bitness, reason, &mut out);
            push(s, e, b, why, &mut out);
            pos = e;
        }
        push(pos, end, bitness, reason, &mut out);
    }
    out
}

fn area_of(elf: &elf::Elf<'_>, space: usize, addr: u64) -> Option<usize> {
    elf.code
        .iter()
        .position(|a: &CodeArea<'_>| a.space == space && a.contains(addr))
}

/// A bitness decided for part of an area: (area, start, end, bitness, reason).
type Override = (usize, u64, u64, Bitness, &'static str);

/// ELF32 functions named `*64*` whose bytes decode as 64-bit code.
fn symbol_name_overrides(elf: &elf::Elf<'_>) -> Vec<Override> {
    let mut overrides = Vec::new();
    if elf.bits == 32 && elf.machine == elf::EM_386 {
        for s in &elf.syms {
            if s.is_func && s.size >= 32 && s.name.contains("64") {
                let a = &elf.code[s.area];
                let lo = (s.addr - a.addr) as usize;
                let hi = (lo as u64).saturating_add(s.size).min(a.bytes.len() as u64) as usize;
                if looks_64(&a.bytes[lo..hi], s.addr, 15, 8) {
                    overrides.push((
                        s.area,
                        s.addr,
                        s.addr.saturating_add(s.size),
                        Bitness::B64,
                        "symbol-name",
                    ));
                }
            }
        }
    }
    overrides
}

/// Far jumps from 16/32-bit code into code of a wider mode: the target, up to the
/// next code symbol, is decoded in that mode if its bytes look like it. Adds the
/// overrides and roots; true if it added any.
fn far_jump_overrides(
    elf: &elf::Elf<'_>,
    planned: &[Planned<'_>],
    scans: &[scan::RegionScan],
    overrides: &mut Vec<Override>,
    roots: &mut Vec<(usize, u64)>,
) -> bool {
    let mut added = false;
    for (p, s) in planned.iter().zip(scans) {
        for &t in &s.far_targets {
            let Some(ai) = area_of(elf, p.region.space, t) else {
                continue;
            };
            let Some(tp) = planned
                .iter()
                .find(|q| q.region.area == ai && t >= q.region.addr && t < q.region.end())
            else {
                continue;
            };
            if overrides.iter().any(|o| o.0 == ai && o.1 == t) {
                continue;
            }
            let area = &elf.code[ai];
            // The wider mode runs to the next code symbol after the target, or the
            // end of the region.
            let end = elf
                .syms
                .iter()
                .filter(|s| s.area == ai && s.addr > t)
                .map(|s| s.addr)
                .min()
                .unwrap_or(tp.region.end())
                .min(tp.region.end());
            let lo = (t - area.addr) as usize;
            let hi = (end - area.addr) as usize;
            let bytes = &area.bytes[lo..hi];
            let wider = match tp.region.bitness {
                Bitness::B16 => Bitness::B32,
                Bitness::B32 => Bitness::B64,
                Bitness::B64 => continue,
            };
            let ok = match wider {
                Bitness::B64 => looks_64(bytes, t, 5, 1),
                _ => !looks_16(bytes, t, Bitness::B32) || p.region.bitness == Bitness::B16,
            };
            if ok {
                overrides.push((ai, t, end, wider, "far-jump"));
                roots.push((ai, t));
                added = true;
            }
        }
    }
    added
}

/// The report of an analysis, and its clusters (taken out of `formed`).
#[allow(clippy::too_many_arguments)]
fn report(
    name: &str,
    elf: &elf::Elf<'_>,
    policy: &ExitPolicy,
    planned: &[Planned<'_>],
    scans: &[scan::RegionScan],
    formed: form::Formed,
    indirect: targets::KnowledgeReport,
    seconds: Timing,
) -> (Report, Vec<Cluster>) {
    let mut sites = BTreeMap::new();
    let mut class_instructions = BTreeMap::new();
    let mut shapes = BTreeMap::new();
    for s in scans {
        for &(_, c) in &s.sites {
            *sites.entry(class_name(c)).or_insert(0u64) += 1;
        }
        for &(c, n) in &s.by_class {
            *class_instructions.entry(class_name(c)).or_insert(0u64) += n;
        }
    }
    let clusters: Vec<Cluster> = formed.clusters.into_iter().map(|(_, c)| c).collect();
    for c in &clusters {
        *shapes.entry(api::shape(c).name()).or_insert(0u64) += 1;
    }
    let unclustered = formed.reasons;
    let report = Report {
        file: name.to_string(),
        elf_class: elf.bits,
        machine: if elf.machine == elf::EM_X86_64 {
            "x86-64"
        } else {
            "i386"
        },
        elf_type: elf.kind.name(),
        entry: elf.entry,
        code_symbols: elf.syms.len() as u64,
        regions: planned
            .iter()
            .zip(scans)
            .map(|(p, s)| RegionReport {
                name: p.name.clone(),
                addr: p.region.addr,
                size: p.region.bytes.len() as u64,
                bitness: p.region.bitness.bits(),
                bitness_reason: p.reason,
                instructions: s.instructions,
                sites: s.sites.len() as u64,
            })
            .collect(),
        code_bytes: elf.code.iter().map(|a| a.bytes.len() as u64).sum(),
        bytes_decoded: scans.iter().map(|s| s.bytes_decoded).sum(),
        bytes_traversed: scans.iter().map(|s| s.bytes_traversed).sum(),
        instructions: scans.iter().map(|s| s.instructions).sum(),
        invalid: scans.iter().map(|s| s.invalid).sum(),
        sites_total: scans.iter().map(|s| s.sites.len() as u64).sum(),
        sites,
        class_instructions,
        policy_classes: ExitClass::ALL
            .iter()
            .filter(|c| policy.class_exits(**c))
            .map(|c| c.name())
            .collect(),
        clusters: clusters.len() as u64,
        cluster_instructions: Stats::of(clusters.iter().map(|c| c.insns.len() as u64)),
        cluster_exiting: Stats::of(clusters.iter().map(|c| c.exiting_count() as u64)),
        cluster_shapes: shapes,
        sites_translated: formed.translated,
        sites_covered: formed.covered,
        sites_unclustered: unclustered.values().sum(),
        unclustered,
        unsupported_blockers: formed.blockers,
        sites_in_clusters: formed.in_multi_exit_clusters,
        sites_not_in_clusters: formed.not_in_multi_exit_clusters,
        indirect,
        seconds,
    };
    (report, clusters)
}

/// Analyzes one ELF image held in memory. Never panics on any input.
///
/// Code is found by recursive traversal from the entry point and every code symbol
/// (STT_FUNC, and named STT_NOTYPE labels in executable sections), following direct
/// jumps, calls and conditional branches; every byte range it did not reach is
/// decoded by linear sweep (stripped files are swept whole). Bitness is decided per
/// region (see docs/analyze.md): the ELF class; section names with `16`/`64`/`32`,
/// ELF32 function symbols with `64` in their name, and the targets of immediate far
/// jumps in 16/32-bit code, each confirmed by decoding; and for ELF32 sections a
/// decode heuristic (REX-prefix density).
pub fn analyze_bytes(
    name: &str,
    data: &[u8],
    policy: &ExitPolicy,
    config: &TranslatorConfig,
) -> Result<Analysis, AnalyzeError> {
    let t0 = Instant::now();
    let elf = elf::parse(data)?;
    let t_parse = t0.elapsed().as_secs_f64();

    let mut overrides = symbol_name_overrides(&elf);
    let mut roots: Vec<(usize, u64)> = elf.syms.iter().map(|s| (s.area, s.addr)).collect();
    if let Some(e) = elf.entry {
        if let Some(a) = area_of(&elf, 0, e) {
            roots.push((a, e));
        }
    }
    let mut planned;
    let mut scans;
    let mut round = 0;
    loop {
        planned = plan(&elf, &overrides);
        scans = planned
            .par_iter()
            .map(|p| {
                let r = &p.region;
                let mine: Vec<u64> = roots
                    .iter()
                    .filter(|(a, addr)| *a == r.area && *addr >= r.addr && *addr < r.end())
                    .map(|x| x.1)
                    .collect();
                scan::scan_region(r, &mine, &mine, policy)
            })
            .collect::<Vec<_>>();
        round += 1;
        if round > 2 {
            break;
        }
        // Far jumps from 16/32-bit code into code of a wider mode.
        let added = far_jump_overrides(&elf, &planned, &scans, &mut overrides, &mut roots);
        if !added {
            break;
        }
    }
    let t_decode = t0.elapsed().as_secs_f64() - t_parse;

    // Clusters, over every executable section of the site's address space.
    let t1 = Instant::now();
    let regions: Vec<&Region<'_>> = planned.iter().map(|p| &p.region).collect();
    let branches: Vec<&[Vec<scan::Branch>]> = scans.iter().map(|s| s.branches.as_slice()).collect();
    let knowledge = targets::build(&elf, &regions, &branches);
    let all_sites: Vec<form::Site> = planned
        .iter()
        .zip(&scans)
        .flat_map(|(p, s)| {
            s.sites.iter().map(|&(rip, _)| form::Site {
                space: p.region.space,
                rip,
                bitness: p.region.bitness,
            })
        })
        .collect();
    let patches = patch::PatchSites::of_elf(&elf);
    let formed = form::form(&all_sites, &knowledge, &patches, policy, config);
    let t_cluster = t1.elapsed().as_secs_f64();

    let (report, clusters) = report(
        name,
        &elf,
        policy,
        &planned,
        &scans,
        formed,
        knowledge.report.clone(),
        Timing {
            parse: t_parse,
            decode: t_decode,
            cluster: t_cluster,
            total: t0.elapsed().as_secs_f64(),
        },
    );
    Ok(Analysis {
        report,
        clusters,
        sites: scans
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.sites.iter().map(move |&(rip, c)| (i, rip, c)))
            .collect(),
        indirect_targets: knowledge.targets,
        thunks: knowledge.thunks,
    })
}
