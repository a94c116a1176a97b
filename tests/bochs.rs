//! End to end on the bare-metal VT-x hypervisor, booted by GRUB in Bochs
//! (`avex run --backend bochs`), with pre-analyzed images:
//!
//! - every bundled guest, pre-analyzed with `avex link`, prints the same console
//!   bytes with clustering off and in `aot+dynamic`, and takes fewer exits with
//!   clusters;
//! - a damaged and a stale `.avex.translations` section are each rejected with
//!   their reason, and the guest still prints the same bytes;
//! - a guest that writes over its own clustered code still prints the right
//!   result (the hypervisor sees the write through EPT write protection of the
//!   page, and the stale translation is dropped before it runs again);
//! - `avex image` writes a bootable ISO.
//!
//! Hand-made guests are in tests/bochs_guests.rs, shape guests in
//! tests/bochs_shapes.rs, the helpers in tests/support/bochs.rs. Needs Bochs and
//! the GRUB tools (`.ci/install-bochs.sh`). Each run boots BIOS, GRUB and the
//! hypervisor (about 1.1 s of Bochs time); runs go two at a time.

#[path = "../src/guests.rs"]
mod guests;
mod support;

use std::path::{Path, PathBuf};

use support::avex;
use support::bochs::*;
use support::cguests::c8250_output;

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn bundled_guests_print_the_same_bytes_with_fewer_exits_in_aot_dynamic() {
    let dir = scratch("bundled");
    let mut jobs: Vec<Job<(String, String, Run)>> = Vec::new();
    for g in guests::bundled() {
        let elf = dir.join(g.name);
        std::fs::write(&elf, g.elf).unwrap();
        let pre = dir.join(format!("{}.pre.elf", g.name));
        link(&elf, &pre);
        for mode in ["off", "aot+dynamic"] {
            let pre = pre.clone();
            let name = g.name.to_string();
            jobs.push(Box::new(move || {
                let r = run_bochs(&pre, mode);
                (name, mode.to_string(), r)
            }));
        }
    }
    let results = parallel(jobs);
    eprintln!(
        "{:<10} {:>8} {:>12} {:>10} {:>10}",
        "guest", "off", "aot+dynamic", "avoided", "clusters"
    );
    let mut failures = Vec::new();
    for g in guests::bundled() {
        let get = |m: &str| {
            results
                .iter()
                .find(|(n, mm, _)| n == g.name && mm == m)
                .map(|(_, _, r)| r.clone())
                .unwrap()
        };
        let (off, aot) = (get("off"), get("aot+dynamic"));
        eprintln!(
            "{:<10} {:>8} {:>12} {:>10} {:>10}",
            g.name,
            off.exits(),
            aot.exits(),
            aot.record["avoided"].as_u64().unwrap_or(0),
            aot.record["clusters_run"].as_u64().unwrap_or(0)
        );
        if off.console != aot.console {
            failures.push(format!(
                "{}: console differs between off and aot+dynamic:\n--- off\n{}\n--- aot+dynamic\n{}",
                g.name,
                String::from_utf8_lossy(&off.console),
                String::from_utf8_lossy(&aot.console)
            ));
        }
        if off.console.is_empty() {
            failures.push(format!("{}: printed nothing", g.name));
        }
        if g.name.starts_with("c8250") && off.console != c8250_output() {
            failures.push(format!(
                "{}: not the bytes it prints under QEMU:\n{}",
                g.name,
                String::from_utf8_lossy(&off.console)
            ));
        }
        // Fewer exits with clusters, for every guest, by a clear margin.
        if !support::clusters_cut_enough(g.name, off.exits(), aot.exits()) {
            failures.push(format!(
                "{}: {} exits with clusters, {} without",
                g.name,
                aot.exits(),
                off.exits()
            ));
        }
        if let Some(r) = aot.rejected() {
            failures.push(format!(
                "{}: its own translations were rejected: {r}",
                g.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The console guest's ELF and its pre-analyzed image, in `dir`.
fn console_images(dir: &Path) -> (PathBuf, PathBuf) {
    let g = guests::find("console").expect("bundled console guest");
    let elf = dir.join("console.elf");
    std::fs::write(&elf, g.elf).unwrap();
    let pre = dir.join("console.pre.elf");
    link(&elf, &pre);
    (elf, pre)
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn damaged_and_stale_translations_are_rejected_and_the_guest_still_runs() {
    let dir = scratch("reject");
    let (elf, pre) = console_images(&dir);
    let pre_bytes = std::fs::read(&pre).unwrap();

    // Damaged: one payload byte flipped (the header's checksum no longer matches).
    let section = avex_linker::read_translations(&pre_bytes)
        .unwrap()
        .expect("a translations section");
    let at = pre_bytes
        .windows(section.len())
        .position(|w| w == section.as_slice())
        .expect("section bytes in the file");
    let mut damaged = pre_bytes.clone();
    damaged[at + section.len() - 3] ^= 0x5a;
    let damaged_path = dir.join("console.damaged.elf");
    std::fs::write(&damaged_path, &damaged).unwrap();

    // Stale: the console guest's translations in another guest's image (as if the
    // guest had been rebuilt since the analysis).
    let pci = guests::find("pci").expect("bundled pci guest");
    let stale = avex_linker::embed(pci.elf, &section).unwrap();
    let stale_path = dir.join("pci.stale.elf");
    std::fs::write(&stale_path, &stale).unwrap();
    let pci_path = dir.join("pci.elf");
    std::fs::write(&pci_path, pci.elf).unwrap();

    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = elf.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&damaged_path, "aot+dynamic")),
        Box::new(move || run_bochs(&pci_path, "off")),
        Box::new(move || run_bochs(&stale_path, "aot+dynamic")),
    ];
    let r = parallel(jobs);
    let (console_off, damaged, pci_off, stale) = (&r[0], &r[1], &r[2], &r[3]);

    let why = damaged.rejected().expect("the damaged set is rejected");
    assert!(why.contains("damaged"), "reason: {why}");
    assert_eq!(damaged.record["translations_loaded"], 0);
    assert_eq!(
        damaged.console, console_off.console,
        "damaged: same console bytes"
    );

    let why = stale.rejected().expect("the stale set is rejected");
    assert!(why.contains("stale"), "reason: {why}");
    assert_eq!(stale.record["translations_loaded"], 0);
    assert_eq!(stale.console, pci_off.console, "stale: same console bytes");
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn a_guest_writing_over_its_clustered_code_prints_the_right_result() {
    let dir = scratch("smc");
    let elf = dir.join("smc.elf");
    std::fs::write(&elf, self_modifying_guest()).unwrap();
    let pre = dir.join("smc.pre.elf");
    link(&elf, &pre);
    let r = off_and_aot_dynamic(&pre);
    let (off, aot) = (&r[0], &r[1]);
    assert_eq!(String::from_utf8_lossy(&off.console), "[AA\n[BB\n[CC\n");
    assert_eq!(String::from_utf8_lossy(&aot.console), "[AA\n[BB\n[CC\n");
    assert!(
        aot.record["translations_loaded"].as_u64().unwrap() >= 1,
        "the AOT pass clustered the OUTs"
    );
    assert!(
        aot.record["clusters_run"].as_u64().unwrap() >= 1,
        "the cluster ran before the write"
    );
    assert!(
        aot.record["backend_stats"]["code_page_writes"]
            .as_u64()
            .unwrap()
            >= 1,
        "the hypervisor saw the write to the write-protected code page: {}",
        aot.record
    );
}

#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn avex_image_writes_a_bootable_iso() {
    let dir = scratch("image");
    let iso = dir.join("boot.iso");
    let out = avex()
        .args(["image", "console", "--mode", "aot+dynamic", "-o"])
        .arg(&iso)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&iso).unwrap();
    // ISO 9660 primary volume descriptor at sector 16, and GRUB's El Torito boot record.
    assert_eq!(&bytes[0x8001..0x8006], b"CD001");
    assert!(bytes.windows(8).any(|w| w == b"EL TORITO"[..8].as_ref()));
}

/// The distance between exits from Bochs' TSC (which counts instructions): a guest
/// whose four gaps are 0, 5, 201 and 1 instructions reads exactly those in `off`;
/// in `aot+dynamic` the histogram is still one gap per exit after the first.
#[test]
#[cfg_attr(
    not(avex_bochs),
    ignore = "needs Bochs and the GRUB ISO tools (.ci/install-bochs.sh)"
)]
fn exit_distance_counts_guest_instructions_from_the_tsc() {
    let dir = scratch("distance");
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0x80, 0x00,       // mov dx, 0x80
        0xee, 0xee,                   // out dx, al ; out dx, al: gap 0
        0x90, 0x90, 0x90, 0x90, 0x90, // 5 NOPs
        0xee,                         // out: gap 5
        0xb9, 100, 0, 0, 0,           // mov ecx, 100
        0xff, 0xc9, 0x75, 0xfc,       // 1: dec ecx ; jnz 1b
        0xee,                         // out: gap 1 + 200
        0x31, 0xc0, 0xe6, 0xf4,       // xor eax, eax ; out 0xf4, al: gap 1
        0xf4,                         // hlt
    ];
    let elf = dir.join("gaps.elf");
    std::fs::write(&elf, elf64_at_1mib(&code)).unwrap();
    let pre = dir.join("gaps.pre.elf");
    link(&elf, &pre);
    let jobs: Vec<Job<Run>> = vec![
        Box::new({
            let p = pre.clone();
            move || run_bochs(&p, "off")
        }),
        Box::new(move || run_bochs(&pre, "aot+dynamic")),
    ];
    let runs = parallel(jobs);
    for r in &runs {
        let d = &r.record["exit_distance"];
        assert_eq!(d["source"], "bochs_tsc", "{}", r.record);
        let buckets: Vec<u64> = serde_json::from_value(d["log2_buckets"].clone()).unwrap();
        let gaps = d["gaps"].as_u64().unwrap();
        assert_eq!(buckets.iter().sum::<u64>(), gaps);
        assert_eq!(gaps, r.record["handled_exits"].as_u64().unwrap() - 1);
        assert_eq!(d["clamped"], 0, "{d}");
    }
    let off = &runs[0].record["exit_distance"];
    // Gaps 0, 5, 201, 1: buckets 0, 3 (4..=7), 8 (128..=255) and 1.
    assert_eq!(
        off["log2_buckets"],
        serde_json::json!([1, 1, 0, 1, 0, 0, 0, 0, 1])
    );
    assert_eq!(off["guest_insns"], 207);
}
