//! Lists every exit-prone site of an ELF: `cargo run --example sites -- FILE [--all]`
//! (`--all`: under the all-classes policy).
use avex_aot::{analyze_bytes, policy_all, ExitPolicy, TranslatorConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.first() else {
        eprintln!("usage: sites FILE [--all]");
        std::process::exit(2);
    };
    let policy = if args.iter().any(|a| a == "--all") {
        policy_all()
    } else {
        ExitPolicy::default()
    };
    let data = std::fs::read(file).unwrap_or_else(|e| {
        eprintln!("sites: {file}: {e}");
        std::process::exit(1)
    });
    match analyze_bytes(file, &data, &policy, &TranslatorConfig::default()) {
        Ok(a) => {
            for (region, rip, class) in &a.sites {
                println!(
                    "{rip:#x} {} {}",
                    class.name(),
                    a.report.regions[*region].name
                );
            }
        }
        Err(e) => {
            eprintln!("sites: {file}: {e}");
            std::process::exit(1)
        }
    }
}
