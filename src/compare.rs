//! `avex compare [GUEST...]`: run every guest in every clustering mode (off,
//! dynamic, aot, aot+dynamic), after analyzing each with the AOT pass, and compare
//! exits, exits avoided, run-time translation work, time and console output. With
//! `--coalesce` (KVM), also `off+coalesce` and `aot+dynamic+coalesce`: the same
//! modes with KVM's coalesced PIO, against which clusters are measured.
//!
//! Prints a table, writes the run records as a JSON list (`--json`) and an SVG bar
//! chart of exits per mode per guest (`--chart`, hand-written SVG). Exits non-zero
//! if any mode's console output differs from `off`'s, or any run fails.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use avex_core::exit::Mode;
use avex_core::policy::ExitPolicy;
use avex_core::stats::ExitReason;

use crate::backend::{variant_name, KernelBoot, RunRequest, TimeSplit};
use crate::backends::BackendKind;
use crate::guests;
use crate::record::RunRecord;
use crate::run;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guests: ELF paths, pre-analyzed images or bundled names. Default: every
    /// bundled guest.
    pub guests: Vec<String>,
    #[arg(long, value_enum, default_value = "kvm")]
    pub backend: BackendKind,
    /// Write the run records as a JSON list to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw exits per mode per guest as an SVG bar chart to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// Per-run timeout in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,
    /// Run each guest in each mode N times (modes interleaved) and keep each mode's
    /// fastest run, so that time ratios are not one run's noise.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: u32,
    #[command(flatten)]
    pub kernel: run::KernelArgs,
    /// Also run each guest in off and aot+dynamic with KVM's coalesced PIO (as
    /// `avex run --coalesce`): `off+coalesce`, `aot+dynamic+coalesce`.
    #[arg(long)]
    pub coalesce: bool,
}

/// The runs of one guest: every mode, then (with `--coalesce`) off and aot+dynamic
/// with coalesced writes.
pub fn variants(coalesce: bool) -> Vec<(Mode, bool)> {
    let mut v: Vec<(Mode, bool)> = Mode::ALL.into_iter().map(|m| (m, false)).collect();
    if coalesce {
        v.extend([(Mode::Off, true), (Mode::AotDynamic, true)]);
    }
    v
}

/// What two modes' consoles are compared by: the whole console for the small
/// guests, the workload's result lines for a kernel with an initrd.
fn compared_output(console: &[u8], kernel: &KernelBoot) -> Vec<u8> {
    if kernel.initrd.is_none() {
        return console.to_vec();
    }
    String::from_utf8_lossy(console)
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with(crate::initramfs::PREFIX))
        .flat_map(|l| l.bytes().chain([b'\n']))
        .collect()
}

/// One row of the comparison.
#[derive(Clone, Debug)]
pub struct Row {
    pub guest: String,
    pub mode: Mode,
    /// Run with coalesced writes (`--coalesce`).
    pub coalesced: bool,
    /// The run's record, or why it failed.
    pub result: Result<RunRecord, String>,
    /// Same console bytes as `off` (None when `off` itself failed).
    pub same_as_off: Option<bool>,
}

/// Run `guests` in every mode on `backend`. Each guest is analyzed once with the
/// AOT pass; `aot` modes get its translation set. With `repeat` > 1 the modes run
/// interleaved `repeat` times and each mode keeps its fastest run; a failure or a
/// console difference in any round is kept instead.
pub fn compare(
    guest_specs: &[String],
    backend: BackendKind,
    timeout: Duration,
    repeat: u32,
    kernel: &KernelBoot,
    coalesce: bool,
) -> anyhow::Result<Vec<Row>> {
    let policy = ExitPolicy::default();
    let mut rows: Vec<Row> = Vec::new();
    for spec in guest_specs {
        let guest = run::load_guest(spec)?;
        let set =
            run::analyze_guest(&guest.name, &guest.elf, &policy).map_err(|e| format!("{e:#}"));
        let mut off_console: Option<Vec<u8>> = None;
        let first = rows.len();
        for round in 0..repeat.max(1) {
            for (mi, (mode, coalesced)) in variants(coalesce).into_iter().enumerate() {
                let req = RunRequest {
                    name: &guest.name,
                    elf: &guest.elf,
                    mode,
                    policy: policy.clone(),
                    translations: mode.uses_aot().then(|| set.clone()),
                    timeout,
                    kernel: kernel.clone(),
                    coalesce: coalesced,
                    exit_distance: true,
                };
                let row = match backend.get().run(&req, &mut |_| {}) {
                    Ok(r) => {
                        let output = compared_output(&r.console, kernel);
                        if mode == Mode::Off && !coalesced && off_console.is_none() {
                            off_console = Some(output.clone());
                        }
                        Row {
                            guest: guest.name.clone(),
                            mode,
                            coalesced,
                            same_as_off: off_console.as_ref().map(|c| *c == output),
                            result: Ok(RunRecord::new(&guest.name, mode, backend.get(), &r)),
                        }
                    }
                    Err(e) => Row {
                        guest: guest.name.clone(),
                        mode,
                        coalesced,
                        result: Err(format!("{e:#}")),
                        same_as_off: None,
                    },
                };
                if round == 0 {
                    rows.push(row);
                    continue;
                }
                let kept = &mut rows[first + mi];
                let kept_bad = kept.result.is_err() || kept.same_as_off == Some(false);
                let row_bad = row.result.is_err() || row.same_as_off == Some(false);
                let faster = match (&kept.result, &row.result) {
                    (Ok(k), Ok(r)) => r.seconds < k.seconds,
                    _ => false,
                };
                if !kept_bad && (row_bad || faster) {
                    *kept = row;
                }
            }
        }
    }
    Ok(rows)
}

fn off_exits(rows: &[Row], guest: &str) -> Option<u64> {
    record(rows, guest, Mode::Off, false).map(|r| r.exits)
}

/// Guests in the order they first appear.
fn guests_in(rows: &[Row]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for r in rows {
        if !seen.contains(&r.guest.as_str()) {
            seen.push(&r.guest);
        }
    }
    seen
}

fn record<'a>(rows: &'a [Row], guest: &str, mode: Mode, coalesced: bool) -> Option<&'a RunRecord> {
    rows.iter()
        .find(|r| r.guest == guest && r.mode == mode && r.coalesced == coalesced)
        .and_then(|r| r.result.as_ref().ok())
}

impl Row {
    /// The run's name: `off`, `aot+dynamic+coalesce`, ...
    pub fn name(&self) -> String {
        variant_name(self.mode, self.coalesced)
    }
}

/// The comparison: exits and what was avoided, exits by reason, and (KVM) where
/// the time went, each a table, then one line per guest and what the figures count.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:<20} {:>9} {:>8} {:>10} {:>9} {:>11} {:>8} {:>6} {:>5}",
        "guest",
        "mode",
        "exits",
        "vs off",
        "exit-prone",
        "avoided",
        "not-exiting",
        "clusters",
        "built",
        "same"
    );
    for r in rows {
        match &r.result {
            Ok(rec) => {
                let vs = match off_exits(rows, &r.guest) {
                    Some(off) if off > 0 => {
                        format!(
                            "{:+.1}%",
                            (rec.exits as f64 - off as f64) / off as f64 * 100.0
                        )
                    }
                    _ => "-".into(),
                };
                let same = match r.same_as_off {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "?",
                };
                let _ = writeln!(
                    s,
                    "{:<10} {:<20} {:>9} {:>8} {:>10} {:>9} {:>11} {:>8} {:>6} {:>5}",
                    r.guest,
                    r.name(),
                    rec.exits,
                    vs,
                    rec.exit_prone,
                    rec.avoided,
                    rec.in_cluster_not_exiting,
                    rec.stats.clusters_run,
                    rec.stats.translations_built,
                    same
                );
            }
            Err(e) => {
                let _ = writeln!(s, "{:<10} {:<20} FAILED: {e}", r.guest, r.name());
            }
        }
    }
    s.push_str(
        "(exit-prone = exits + instructions run in clusters that exit on this backend; \
         avoided = exit-prone - exits;\n not-exiting = instructions of an exit class run \
         in clusters that do not exit on this backend, never counted as avoided)\n",
    );
    s.push('\n');
    s.push_str(&reason_table(rows));
    for more in [time_table(rows), crate::cost::table(rows)] {
        if !more.is_empty() {
            s.push('\n');
            s.push_str(&more);
        }
    }
    s.push('\n');
    for g in guests_in(rows) {
        let (Some(off), Some(ad)) = (
            record(rows, g, Mode::Off, false),
            record(rows, g, Mode::AotDynamic, false),
        ) else {
            continue;
        };
        let _ = write!(
            s,
            "{g}: exits off {} -> aot+dynamic {} ({:.1}% fewer), {} avoided of {} exit-prone",
            off.exits,
            ad.exits,
            if off.exits > 0 {
                (off.exits as f64 - ad.exits as f64) / off.exits as f64 * 100.0
            } else {
                0.0
            },
            ad.avoided,
            ad.exit_prone,
        );
        match (&off.time_split, &ad.time_split) {
            (Some(a), Some(b)) => {
                let _ = writeln!(
                    s,
                    "; time handling exits (user space) {:.1} -> {:.1} ms, in KVM_RUN {:.1} -> {:.1} ms",
                    a.user_space_ms, b.user_space_ms, a.kvm_run_ms, b.kvm_run_ms
                );
            }
            _ => s.push('\n'),
        }
        if let Some(line) = coalesce_line(rows, g) {
            s.push_str(&line);
        }
    }
    let mut counted: Vec<(&str, &str)> = Vec::new();
    for r in rows.iter().filter_map(|r| r.result.as_ref().ok()) {
        if !counted.iter().any(|(b, _)| *b == r.backend) {
            counted.push((&r.backend, &r.exits_counted));
        }
    }
    for (b, what) in counted {
        let _ = writeln!(s, "exits on {b}: {what}.");
    }
    s
}

/// With coalesced runs: exits and exits to user space in off, off+coalesce,
/// aot+dynamic and aot+dynamic+coalesce, and the writes coalesced.
fn coalesce_line(rows: &[Row], g: &str) -> Option<String> {
    let runs = [
        (Mode::Off, false),
        (Mode::Off, true),
        (Mode::AotDynamic, false),
        (Mode::AotDynamic, true),
    ];
    if !rows.iter().any(|r| r.guest == g && r.coalesced) {
        return None;
    }
    let parts: Vec<String> = runs
        .iter()
        .filter_map(|&(m, c)| {
            let rec = record(rows, g, m, c)?;
            let user = rec
                .backend_stats
                .get("user_exits")
                .map_or("?".to_string(), |n| n.to_string());
            let mut p = format!("{} {} ({user} to user space", variant_name(m, c), rec.exits);
            if c {
                p += &format!(", {} writes coalesced", rec.stats.coalesced_writes);
            }
            Some(p + ")")
        })
        .collect();
    Some(format!("{g}: exits {}\n", parts.join(", ")))
}

/// Exits that reached avex's exit handler, by reason, per guest and mode; `unseen`
/// is the exits the hardware counted that never reached it (KVM: exits it handled
/// in the kernel, host interrupts).
pub fn reason_table(rows: &[Row]) -> String {
    let recs: Vec<(&Row, &RunRecord)> = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|x| (r, x)))
        .collect();
    let mut reasons: Vec<ExitReason> = Vec::new();
    for (_, rec) in &recs {
        for k in rec.stats.by_reason.keys() {
            if !reasons.contains(k) {
                reasons.push(*k);
            }
        }
    }
    reasons.sort_unstable_by_key(|r| r.name());
    let mut s = String::from(
        "exits by reason (as avex's exit handler saw them; unseen: counted in exits, \
         never reached it)\n",
    );
    let _ = write!(s, "{:<10} {:<20}", "guest", "mode");
    for k in &reasons {
        let _ = write!(s, " {:>9}", k.name());
    }
    let _ = writeln!(s, " {:>7}", "unseen");
    for (r, rec) in recs {
        let _ = write!(s, "{:<10} {:<20}", r.guest, r.name());
        for k in &reasons {
            let _ = write!(
                s,
                " {:>9}",
                rec.stats.by_reason.get(k).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(s, " {:>7}", rec.exits.saturating_sub(rec.stats.handled));
    }
    s
}

/// KVM: wall time apart (time in KVM_RUN, time in user space handling exits) and
/// who ran the guest's instructions. Empty when no run has a time split.
pub fn time_table(rows: &[Row]) -> String {
    let timed: Vec<(&Row, &TimeSplit)> = rows
        .iter()
        .filter_map(|r| {
            let t = r.result.as_ref().ok()?.time_split.as_ref()?;
            Some((r, t))
        })
        .collect();
    if timed.is_empty() {
        return String::new();
    }
    let mut s = String::from("time apart (KVM)\n");
    let _ = writeln!(
        s,
        "{:<10} {:<20} {:>9} {:>11} {:>14} {:>12} {:>14} {:>13} {:>12}",
        "guest",
        "mode",
        "total ms",
        "KVM_RUN ms",
        "user space ms",
        "clusters ms",
        "completing ms",
        "KVM emulated",
        "avex engine"
    );
    for (r, t) in timed {
        let _ = writeln!(
            s,
            "{:<10} {:<20} {:>9.1} {:>11.1} {:>14.1} {:>12.1} {:>14.1} {:>13} {:>12}",
            r.guest,
            r.name(),
            t.total_ms,
            t.kvm_run_ms,
            t.user_space_ms,
            t.cluster_ms,
            t.completion_ms,
            t.kvm_emulated_insns
                .map_or("?".to_string(), |n| n.to_string()),
            t.engine_insns
        );
    }
    s.push_str(
        "(KVM_RUN: KVM running the guest, here its instruction emulator for every guest \
         instruction (\"KVM emulated\", about 0.5 us each),\n the exits it handles in \
         the kernel and the kernel's side of each exit to user space; user space: handling \
         exits in avex,\n clusters included (\"avex engine\": guest instructions run \
         there) and the KVM_RUN calls that complete an instruction before a cluster \
         (\"completing\").\n A mode's total time against off's mixes exits avoided \
         with instructions moved from KVM's emulator to avex's engine: it is not the benefit \
         of avoided exits.)\n",
    );
    s
}

/// Runs that failed, and runs whose console output differs from `off`'s.
pub fn problems(rows: &[Row]) -> (usize, usize) {
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    let differ = rows.iter().filter(|r| r.same_as_off == Some(false)).count();
    (failed, differ)
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let specs: Vec<String> = if args.guests.is_empty() {
        guests::bundled()
            .iter()
            .map(|g| g.name.to_string())
            .collect()
    } else {
        args.guests.clone()
    };
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        anyhow::bail!("--timeout must be a positive number of seconds");
    }
    let initrd = args.kernel.read_initrd()?;
    let kernel = args.kernel.boot(initrd.as_deref());
    let mut rows = compare(
        &specs,
        args.backend,
        Duration::from_secs_f64(args.timeout),
        args.repeat,
        &kernel,
        args.coalesce,
    )?;
    crate::cost::against_off(&mut rows);
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        let records: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match &r.result {
                Ok(rec) => {
                    let mut v = serde_json::to_value(rec).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("same_output_as_off".into(), serde_json::json!(r.same_as_off));
                    }
                    v
                }
                Err(e) => serde_json::json!({
                    "guest": r.guest, "mode": r.mode.name(), "coalesced": r.coalesced, "backend": args.backend.name(), "error": e
                }),
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&records)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, crate::chart::chart_svg(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let (failed, differ) = problems(&rows);
    if failed > 0 || differ > 0 {
        eprintln!("avex compare: {failed} run(s) failed, {differ} run(s) printed different console output than off");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RunResult;
    use avex_core::stats::ExitStats;

    #[test]
    fn a_kernel_is_compared_by_its_result_lines_only() {
        let a = b"[    1.000] booting\r\navex-linux: start\r\n[    2.5] x\r\navex-linux: done\r\n";
        let b = b"[    1.300] booting\navex-linux: start\n[    2.9] y\navex-linux: done\n";
        let small = KernelBoot::default();
        assert_ne!(compared_output(a, &small), compared_output(b, &small));
        let kernel = KernelBoot {
            initrd: Some(b"cpio"),
            ..KernelBoot::default()
        };
        assert_eq!(compared_output(a, &kernel), compared_output(b, &kernel));
        assert_eq!(
            compared_output(a, &kernel),
            b"avex-linux: start\navex-linux: done\n"
        );
    }

    fn row(
        guest: &str,
        mode: Mode,
        exits: u64,
        seconds: f64,
        console: &[u8],
        same: Option<bool>,
    ) -> Row {
        let stats = ExitStats {
            handled: exits,
            by_reason: [(ExitReason::IoOut, exits)].into_iter().collect(),
            ..ExitStats::default()
        };
        let r = RunResult {
            status: 0,
            stats,
            console: console.to_vec(),
            seconds,
            details: Default::default(),
            notes: vec![],
            exit_statistics_unreadable: None,
            time_split: None,
            coalesced: false,
        };
        Row {
            guest: guest.into(),
            mode,
            coalesced: false,
            result: Ok(RunRecord::new(guest, mode, &crate::kvm::Kvm, &r)),
            same_as_off: same,
        }
    }

    #[test]
    fn kvm_time_is_shown_apart_and_never_as_a_benefit() {
        let details = |run_ns: u64, emulated: u64| {
            [
                ("kvm_run_ns".to_string(), run_ns),
                ("cluster_ns".to_string(), 1_000_000),
                ("insn_emulation".to_string(), emulated),
            ]
            .into_iter()
            .collect()
        };
        let mut rows = vec![
            row("g", Mode::Off, 1000, 0.040, b"x", Some(true)),
            row("g", Mode::AotDynamic, 100, 0.010, b"x", Some(true)),
        ];
        for (r, d) in rows
            .iter_mut()
            .zip([details(30_000_000, 9000), details(6_000_000, 2000)])
        {
            let Ok(rec) = &mut r.result else { panic!() };
            let run = RunResult {
                status: 0,
                stats: ExitStats::default(),
                console: vec![],
                seconds: rec.seconds,
                details: d,
                notes: vec![],
                exit_statistics_unreadable: None,
                time_split: None,
                coalesced: false,
            };
            rec.time_split = crate::kvm::time_split(&run);
        }
        let t = time_table(&rows);
        assert!(t.contains("KVM_RUN ms"), "{t}");
        // off: 40 ms total, 30 in KVM_RUN, 10 in user space; 9000 emulated.
        let off = t
            .lines()
            .find(|l| l.starts_with("g ") && l.contains(" off "))
            .unwrap();
        assert_eq!(
            off.split_whitespace().collect::<Vec<_>>(),
            ["g", "off", "40.0", "30.0", "10.0", "1.0", "0.0", "9000", "0"]
        );
        let all = table(&rows);
        assert!(
            all.contains(
                "time handling exits (user space) 10.0 -> 4.0 ms, in KVM_RUN 30.0 -> 6.0 ms"
            ),
            "{all}"
        );
        assert!(all.contains("not the benefit of avoided exits"), "{all}");
    }

    #[test]
    fn coalesced_runs_are_named_and_never_taken_for_off() {
        assert_eq!(
            variants(true)[4..],
            [(Mode::Off, true), (Mode::AotDynamic, true)]
        );
        assert_eq!(variants(false).len(), Mode::ALL.len());
        let mut co = row("g", Mode::Off, 400, 0.1, b"x", Some(true));
        co.coalesced = true;
        if let Ok(rec) = &mut co.result {
            rec.coalesced = true;
            rec.stats.coalesced_writes = 600;
        }
        // Coalesced off first: plain off must still be the reference.
        let rows = vec![
            co,
            row("g", Mode::Off, 1000, 0.4, b"x", Some(true)),
            row("g", Mode::AotDynamic, 100, 0.1, b"x", Some(true)),
        ];
        assert_eq!(off_exits(&rows, "g"), Some(1000));
        let t = table(&rows);
        assert!(t.contains("off+coalesce"), "{t}");
        assert!(t.contains("-60.0%"), "{t}");
        assert!(
            t.contains("g: exits off 1000 (? to user space), off+coalesce 400 (? to user space, 600 writes coalesced), aot+dynamic 100"),
            "{t}"
        );
        let svg = crate::chart::chart_svg(&rows).unwrap();
        assert!(svg.contains("g off+coalesce: 400 exits"), "{svg}");
        assert!(svg.contains("g off: 1000 exits"), "{svg}");
        assert!(svg.contains("\noff+coalesce\n</text>"), "legend: {svg}");
    }

    #[test]
    fn table_chart_and_verdict() {
        let mut rows = vec![
            row("g", Mode::Off, 1000, 0.4, b"x", Some(true)),
            row("g", Mode::Dynamic, 300, 0.2, b"x", Some(true)),
            row("g", Mode::Aot, 200, 0.1, b"x", Some(true)),
            row("g", Mode::AotDynamic, 100, 0.1, b"x", Some(true)),
        ];
        let t = table(&rows);
        assert!(t.contains("-90.0%"), "{t}");
        assert!(
            t.contains("g: exits off 1000 -> aot+dynamic 100 (90.0% fewer)"),
            "{t}"
        );
        assert!(
            !t.contains("faster"),
            "no time ratio presented as a benefit: {t}"
        );
        let reasons = reason_table(&rows);
        assert!(reasons.contains("io_out"), "{reasons}");
        assert!(
            time_table(&rows).is_empty(),
            "no KVM time split in these rows"
        );
        let svg = crate::chart::chart_svg(&rows).unwrap();
        assert!(svg.contains("g aot+dynamic: 100 exits"));
        assert_eq!(problems(&rows), (0, 0));
        rows[2].same_as_off = Some(false);
        rows[1].result = Err("boom".into());
        assert_eq!(problems(&rows), (1, 1));
        let t = table(&rows);
        assert!(t.contains("FAILED: boom") && t.contains(" NO"), "{t}");
    }
}
