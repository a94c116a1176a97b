//! The shape guests (tests/support/shapes.rs) build, run in mode `off`, and print
//! exactly the bytes of `off`, with its status, in every clustering mode on KVM.
//! Every `.c` file in tests/shapes/ is run, so a shape added later is covered.

mod support;

use std::time::Duration;

use avex_core::exit::Mode;

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn every_shape_builds_and_ends_with_status_0_in_mode_off() {
    let names = support::shapes::all();
    assert!(!names.is_empty(), "no shape guests in tests/shapes");
    for name in names {
        let elf = support::shapes::build(&name);
        let out = support::avex()
            .args(["run", "--mode", "off"])
            .arg(&elf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shape {name} in mode off: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "shape {name} printed nothing");
    }
}

fn run_kvm(
    elf: &[u8],
    mode: Mode,
    set: Option<&avex_core::format::TranslationSet>,
) -> Result<avex_kvm::Report, avex_kvm::Error> {
    let config = avex_kvm::Config {
        mode,
        translations: set.map(|s| Ok(s.clone())),
        timeout: Some(Duration::from_secs(60)),
        ..avex_kvm::Config::default()
    };
    avex_kvm::run(elf, &config, &mut |_| {})
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn every_shape_prints_the_bytes_of_off_in_every_mode_on_kvm() {
    let mut failures = Vec::new();
    for name in support::shapes::all() {
        let elf = support::shapes::elf(&name);
        let set = support::aot::aot_set(&name, &elf);
        let off = match run_kvm(&elf, Mode::Off, None) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name} off: {e}"));
                continue;
            }
        };
        for mode in [Mode::Dynamic, Mode::Aot, Mode::AotDynamic] {
            let r = match run_kvm(&elf, mode, mode.uses_aot().then_some(&set)) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name} {mode}: {e}"));
                    continue;
                }
            };
            if let Some(why) = &r.stats.translations_rejected {
                failures.push(format!("{name} {mode}: translations rejected: {why}"));
            }
            if r.status != off.status || r.console != off.console {
                failures.push(format!(
                    "{name} {mode}: status {} (off {}), console differs from off:\n--- off\n{}--- {mode}\n{}",
                    r.status,
                    off.status,
                    String::from_utf8_lossy(&off.console),
                    String::from_utf8_lossy(&r.console)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Linux's spinlock around the console's port I/O (`pushf; pop; cli; lock
/// cmpxchg` ... `movb $0; test $0x200; je; sti`): clusters run through the lock and
/// the unlock's STI, so aot+dynamic takes well under half the exits of off (before
/// the engine ran PUSHF, CLI, CMPXCHG and STI every cluster ended at them and the
/// counts were about equal).
#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn spinlock_console_clusters_through_the_lock_on_kvm() {
    let name = "spinlock_console";
    let elf = support::shapes::elf(name);
    let set = support::aot::aot_set(name, &elf);
    let off = run_kvm(&elf, Mode::Off, None).expect("off");
    let clustered = run_kvm(&elf, Mode::AotDynamic, Some(&set)).expect("aot+dynamic");
    assert_eq!(off.status, 0);
    assert_eq!(clustered.console, off.console);
    let text = String::from_utf8_lossy(&off.console);
    assert!(text.contains("if=0x0000000000000001"), "{text}");
    assert!(text.contains("preempt=0x0000000000000000"), "{text}");
    let (o, c) = (off.stats.exits(), clustered.stats.exits());
    assert!(2 * c < o, "aot+dynamic took {c} exits, off {o}");
}
