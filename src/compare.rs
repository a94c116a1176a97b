//! `avex compare [GUEST...]`: run every guest in every clustering mode (off,
//! dynamic, aot, aot+dynamic), after analyzing each with the AOT pass, and compare
//! exits, exits avoided, run-time translation work, time and console output.
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

use crate::guests;
use crate::run::{self, Backend, RunRecord, RunRequest};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guests: ELF paths, pre-analyzed images or bundled names. Default: every
    /// bundled guest.
    pub guests: Vec<String>,
    #[arg(long, value_enum, default_value = "kvm")]
    pub backend: Backend,
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
}

/// One row of the comparison.
#[derive(Clone, Debug)]
pub struct Row {
    pub guest: String,
    pub mode: Mode,
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
    backend: Backend,
    timeout: Duration,
    repeat: u32,
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
            for (mi, mode) in Mode::ALL.into_iter().enumerate() {
                let req = RunRequest {
                    name: &guest.name,
                    elf: &guest.elf,
                    mode,
                    policy: policy.clone(),
                    translations: mode.uses_aot().then(|| set.clone()),
                    timeout,
                };
                let row = match run::run_backend(backend, req, &mut |_| {}) {
                    Ok(r) => {
                        if mode == Mode::Off && off_console.is_none() {
                            off_console = Some(r.console.clone());
                        }
                        Row {
                            guest: guest.name.clone(),
                            mode,
                            same_as_off: off_console.as_ref().map(|c| *c == r.console),
                            result: Ok(RunRecord::new(&guest.name, mode, backend, &r)),
                        }
                    }
                    Err(e) => Row {
                        guest: guest.name.clone(),
                        mode,
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
    rows.iter()
        .find(|r| r.guest == guest && r.mode == Mode::Off)
        .and_then(|r| r.result.as_ref().ok())
        .map(|r| r.exits)
}

/// The comparison table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:<12} {:>9} {:>10} {:>11} {:>9} {:>10} {:>9} {:>8}",
        "guest", "mode", "exits", "vs off", "exit-prone", "clusters", "built", "time ms", "same"
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
                    "{:<10} {:<12} {:>9} {:>10} {:>11} {:>9} {:>10} {:>9.1} {:>8}",
                    r.guest,
                    r.mode.name(),
                    rec.exits,
                    vs,
                    rec.exit_prone,
                    rec.clusters_run,
                    rec.translations_built,
                    rec.seconds * 1e3,
                    same
                );
            }
            Err(e) => {
                let _ = writeln!(s, "{:<10} {:<12} FAILED: {e}", r.guest, r.mode.name());
            }
        }
    }
    // Time ratios off : aot+dynamic per guest.
    let mut guests_seen: Vec<&str> = Vec::new();
    for r in rows {
        if !guests_seen.contains(&r.guest.as_str()) {
            guests_seen.push(&r.guest);
        }
    }
    for g in guests_seen {
        let t = |m: Mode| {
            rows.iter()
                .find(|r| r.guest == g && r.mode == m)
                .and_then(|r| r.result.as_ref().ok())
                .map(|r| (r.seconds, r.exits))
        };
        if let (Some((t_off, e_off)), Some((t_ad, e_ad))) = (t(Mode::Off), t(Mode::AotDynamic)) {
            let _ = writeln!(
                s,
                "{g}: off {:.1} ms / aot+dynamic {:.1} ms = {:.2}x faster; exits {} -> {} ({:.1}% fewer)",
                t_off * 1e3,
                t_ad * 1e3,
                if t_ad > 0.0 { t_off / t_ad } else { 0.0 },
                e_off,
                e_ad,
                if e_off > 0 {
                    (e_off as f64 - e_ad as f64) / e_off as f64 * 100.0
                } else {
                    0.0
                }
            );
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grouped bar chart of exits per mode per guest, as SVG.
pub fn chart_svg(rows: &[Row]) -> String {
    let mut guests_seen: Vec<String> = Vec::new();
    for r in rows {
        if !guests_seen.contains(&r.guest) {
            guests_seen.push(r.guest.clone());
        }
    }
    let colors = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c"];
    let (bar_w, gap, left, top, plot_h) = (22.0, 30.0, 70.0, 40.0, 300.0);
    let group_w = bar_w * Mode::ALL.len() as f64 + gap;
    let width = left + group_w * guests_seen.len().max(1) as f64 + 20.0;
    let height = top + plot_h + 90.0;
    let max = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|x| x.exits))
        .max()
        .unwrap_or(1)
        .max(1);
    // Log scale (exits span orders of magnitude between off and aot+dynamic).
    let lmax = (max as f64 + 1.0).log10().ceil().max(1.0);
    let y = |v: u64| top + plot_h - ((v as f64 + 1.0).log10() / lmax) * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="20" font-size="14" text-anchor="middle">VM exits per guest and clustering mode (log scale)</text>"#,
        width / 2.0
    );
    for p in 0..=(lmax as u32) {
        let v = 10u64.pow(p);
        let yy = y(v - 1);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.0}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{v}</text>"##,
            width - 10.0,
            left - 5.0,
            yy + 4.0
        );
    }
    for (gi, g) in guests_seen.iter().enumerate() {
        let gx = left + gi as f64 * group_w + gap / 2.0;
        for (mi, m) in Mode::ALL.iter().enumerate() {
            let Some(rec) = rows
                .iter()
                .find(|r| &r.guest == g && r.mode == *m)
                .and_then(|r| r.result.as_ref().ok())
            else {
                continue;
            };
            let x = gx + mi as f64 * bar_w;
            let yy = y(rec.exits);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {} exits</title></rect>"#,
                bar_w - 2.0,
                top + plot_h - yy,
                colors[mi],
                esc(g),
                m.name(),
                rec.exits
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="8" text-anchor="middle">{}</text>"#,
                x + bar_w / 2.0 - 1.0,
                yy - 2.0,
                rec.exits
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + bar_w * 2.0,
            top + plot_h + 15.0,
            esc(g)
        );
    }
    for (mi, m) in Mode::ALL.iter().enumerate() {
        let x = left + mi as f64 * 110.0;
        let yy = top + plot_h + 45.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
            yy - 10.0,
            colors[mi],
            x + 16.0,
            yy,
            m.name()
        );
    }
    s.push_str("</svg>\n");
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
    let rows = compare(
        &specs,
        args.backend,
        Duration::from_secs_f64(args.timeout),
        args.repeat,
    )?;
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
                    "guest": r.guest, "mode": r.mode.name(), "backend": args.backend.name(), "error": e
                }),
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&records)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, chart_svg(&rows))
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
    use crate::run::RunResult;
    use avex_core::stats::ExitStats;

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
        };
        Row {
            guest: guest.into(),
            mode,
            result: Ok(RunRecord::new(guest, mode, Backend::Kvm, &r)),
            same_as_off: same,
        }
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
            t.contains("g: off 400.0 ms / aot+dynamic 100.0 ms = 4.00x faster"),
            "{t}"
        );
        let svg = chart_svg(&rows);
        assert!(svg.contains("g aot+dynamic: 100 exits"));
        assert_eq!(problems(&rows), (0, 0));
        rows[2].same_as_off = Some(false);
        rows[1].result = Err("boom".into());
        assert_eq!(problems(&rows), (1, 1));
        let t = table(&rows);
        assert!(t.contains("FAILED: boom") && t.contains(" NO"), "{t}");
    }
}
