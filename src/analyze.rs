//! `avex analyze FILE...`: find exit-prone sites and clusters in guest ELFs.
//!
//! Files or directories (searched recursively for ELF files). A file that cannot be
//! analyzed is reported as one line `avex: FILE: reason` on stderr; the others are
//! still analyzed, and the exit status is 1 if any failed. The report is a table, or
//! JSON with `--json` (documented in docs/analyze.md). `-o` writes translation sets.
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use avex_aot::{analyze_bytes, policy_all, Analysis, ExitPolicy, Report, TranslatorConfig};
use avex_core::format;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ELF files (ELF32/ELF64; executables, shared objects, relocatable objects and
    /// kernel modules) or directories to search for them.
    #[arg(required = true, value_name = "FILE")]
    pub paths: Vec<PathBuf>,
    /// Print a JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the translation set: with one input file, to this file; with several
    /// inputs (or a directory), into this directory as `<file name>.avxt`.
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Exit policy: `default` (what the hypervisor configures) or `all` (every class
    /// that can exit under VT-x does).
    #[arg(long, default_value = "default", value_parser = ["default", "all"])]
    pub policy: String,
}

#[derive(Serialize)]
struct Failure {
    file: String,
    error: String,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    files: Vec<&'a Report>,
    failed: Vec<Failure>,
}

/// Collects the files to analyze: named files as given, directories recursively
/// (files starting with the ELF magic only, in path order).
fn collect(paths: &[PathBuf], failed: &mut Vec<Failure>) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, failed: &mut Vec<Failure>) {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(e) => {
                failed.push(Failure {
                    file: dir.display().to_string(),
                    error: format!("cannot read directory: {e}"),
                });
                return;
            }
        };
        entries.sort();
        for p in entries {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                walk(&p, out, failed);
            } else if meta.is_file() && is_elf(&p) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out, failed);
        } else {
            out.push(p.clone());
        }
    }
    out
}

fn is_elf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"\x7fELF"
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let policy = if args.policy == "all" {
        policy_all()
    } else {
        ExitPolicy::default()
    };
    let config = TranslatorConfig::default();
    let mut failed = Vec::new();
    let files = collect(&args.paths, &mut failed);
    let several = files.len() > 1 || args.paths.iter().any(|p| p.is_dir());
    if let Some(out) = &args.output {
        if several {
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create output directory {}", out.display()))?;
        } else if out.is_dir() {
            bail!(
                "-o {}: is a directory; with one input, -o names the translation file",
                out.display()
            );
        }
    }

    // Progress: shown on a terminal once the work has taken a second.
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} analyzing [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let shower = {
        let bar = bar.clone();
        std::thread::spawn(move || {
            // Wakes at once when the work ends (the sender is dropped).
            if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_secs(1)) {
                if std::io::stderr().is_terminal() {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                    bar.enable_steady_tick(Duration::from_millis(100));
                }
            }
        })
    };

    /// A file's encoded translation set, or why it could not be made.
    type EncodedSet = Result<Vec<u8>, String>;
    let errors = Mutex::new(Vec::new());
    // The translation set (with the guest identity, which needs the file's bytes)
    // is made here, while the bytes are at hand.
    let results: Vec<Option<(Analysis, Option<EncodedSet>)>> = files
        .par_iter()
        .map(|f| {
            let name = f.display().to_string();
            let r = std::fs::read(f)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|data| {
                    let len = data.len() as u64;
                    let a =
                        analyze_bytes(&name, &data, &policy, &config).map_err(|e| e.to_string());
                    bar.inc(len);
                    let a = a?;
                    let set = (args.output.is_some() && a.report.elf_type != "REL").then(|| {
                        a.translation_set(&data, &policy, &config)
                            .map(|set| format::encode(&set))
                            .map_err(|e| e.to_string())
                    });
                    Ok((a, set))
                });
            match r {
                Ok(a) => {
                    bar.set_message(name);
                    Some(a)
                }
                Err(e) => {
                    errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((name, e));
                    None
                }
            }
        })
        .collect();
    drop(done);
    let _ = shower.join();
    bar.finish_and_clear();

    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    errors.sort();
    for (file, error) in errors {
        failed.push(Failure { file, error });
    }
    let analyses: Vec<&Analysis> = results.iter().flatten().map(|(a, _)| a).collect();

    // Translation sets.
    if let Some(out) = &args.output {
        let mut written = std::collections::HashSet::new();
        for (a, set) in results.iter().flatten() {
            if a.report.elf_type == "REL" {
                failed.push(Failure {
                    file: a.report.file.clone(),
                    error: "no translation set written: a relocatable object has no load \
                            addresses (link it first); the analysis is reported"
                        .into(),
                });
                continue;
            }
            let path = if several {
                let base = Path::new(&a.report.file)
                    .file_name()
                    .map_or_else(|| "guest".into(), |n| n.to_string_lossy().into_owned());
                let path = out.join(format!("{base}.avxt"));
                if !written.insert(path.clone()) {
                    failed.push(Failure {
                        file: a.report.file.clone(),
                        error: format!(
                            "no translation set written: {} is already written for another \
                             input of the same file name",
                            path.display()
                        ),
                    });
                    continue;
                }
                path
            } else {
                out.clone()
            };
            let bytes = match set {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    failed.push(Failure {
                        file: a.report.file.clone(),
                        error: format!("no translation set written: {e}"),
                    });
                    continue;
                }
                None => continue,
            };
            if let Err(e) = std::fs::write(&path, bytes) {
                failed.push(Failure {
                    file: a.report.file.clone(),
                    error: format!("cannot write {}: {e}", path.display()),
                });
            }
        }
    }

    for f in &failed {
        eprintln!("avex: {}: {}", f.file, f.error);
    }
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    if args.json {
        let doc = JsonOut {
            files: analyses.iter().map(|a| &a.report).collect(),
            failed,
        };
        serde_json::to_writer_pretty(&mut w, &doc)?;
        writeln!(w)?;
        let failed_any = !doc.failed.is_empty();
        return Ok(if failed_any {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    for a in &analyses {
        print_table(&mut w, &a.report)?;
    }
    if analyses.len() + failed.len() > 1 {
        writeln!(
            w,
            "{} files analyzed, {} failed",
            analyses.len(),
            failed.len()
        )?;
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn print_table(w: &mut impl Write, r: &Report) -> std::io::Result<()> {
    writeln!(
        w,
        "{}: ELF{} {} {}, {} code symbols{}",
        r.file,
        r.elf_class,
        r.machine,
        r.elf_type,
        thousands(r.code_symbols),
        r.entry.map_or(String::new(), |e| format!(", entry {e:#x}"))
    )?;
    for g in &r.regions {
        writeln!(
            w,
            "  {:<24} {:#18x} {:>12} bytes  {}-bit ({})  {:>10} insns  {:>7} sites",
            g.name,
            g.addr,
            thousands(g.size),
            g.bitness,
            g.bitness_reason,
            thousands(g.instructions),
            thousands(g.sites)
        )?;
    }
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    writeln!(
        w,
        "  code       {} bytes, {} decoded ({:.1}% by traversal, the rest by sweep), {} instructions, {} invalid",
        thousands(r.code_bytes),
        thousands(r.bytes_decoded),
        pct(r.bytes_traversed, r.bytes_decoded),
        thousands(r.instructions),
        thousands(r.invalid)
    )?;
    writeln!(w, "  sites      {}", thousands(r.sites_total))?;
    for (class, n) in &r.sites {
        writeln!(w, "    {class:<16} {:>10}", thousands(*n))?;
    }
    writeln!(
        w,
        "  clusters   {}  (instructions per cluster: mean {:.1}, max {}; exiting per cluster: mean {:.1}, max {})",
        thousands(r.clusters),
        r.cluster_instructions.mean,
        r.cluster_instructions.max,
        r.cluster_exiting.mean,
        r.cluster_exiting.max
    )?;
    for (shape, n) in &r.cluster_shapes {
        writeln!(w, "    {shape:<16} {:>10}", thousands(*n))?;
    }
    writeln!(
        w,
        "  sites      {} in clusters of two or more exiting instructions; the others:",
        thousands(r.sites_in_clusters)
    )?;
    for (why, n) in &r.sites_not_in_clusters {
        writeln!(w, "    {why:<30} {:>10}", thousands(*n))?;
    }
    writeln!(
        w,
        "  sites      {} translated, {} served by an earlier cluster, {} unclustered",
        thousands(r.sites_translated),
        thousands(r.sites_covered),
        thousands(r.sites_unclustered)
    )?;
    for (why, n) in &r.unclustered {
        writeln!(w, "    {why:<30} {:>10}", thousands(*n))?;
        if *why == "unsupported" {
            for (m, n) in &r.unsupported_blockers {
                writeln!(w, "      {m:<28} {:>10}", thousands(*n))?;
            }
        }
    }
    let k = &r.indirect;
    writeln!(
        w,
        "  indirect   {} indirect thunks, {} return thunks, {} returns, {} field calls and {} slot calls given destinations, {} address-taken functions",
        thousands(k.indirect_thunks),
        thousands(k.return_thunks),
        thousands(k.returns_resolved),
        thousands(k.field_calls_resolved),
        thousands(k.slot_calls_resolved),
        thousands(k.address_taken)
    )?;
    writeln!(
        w,
        "  time       {:.3} s (parse {:.3}, decode {:.3}, cluster {:.3})",
        r.seconds.total, r.seconds.parse, r.seconds.decode, r.seconds.cluster
    )?;
    Ok(())
}
