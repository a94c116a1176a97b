//! The pass on synthetic images: exact counts by construction, the parallel chunked
//! sweep equal to traversal, and no panic on truncated or corrupted ELFs.
use avex_aot::{analyze_bytes, policy_all, synth, AnalyzeError, ExitPolicy, TranslatorConfig};
use avex_core::elf::ElfError;
use proptest::prelude::*;

fn analyze(data: &[u8]) -> Result<avex_aot::Analysis, AnalyzeError> {
    analyze_bytes(
        "synth",
        data,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
}

#[test]
fn counts_match_construction_with_and_without_symbols() {
    for bits in [32, 64] {
        // Over 1 MiB: several chunks, scanned in parallel.
        let with = synth::elf(bits, 1 << 20, 5, true);
        let without = synth::elf(bits, 1 << 20, 5, false);
        let all = |d: &[u8]| {
            analyze_bytes("synth", d, &policy_all(), &TranslatorConfig::default())
                .unwrap()
                .report
        };
        let a = all(&with);
        let b = all(&without);
        let functions = a.code_symbols as usize;
        assert!(functions > 1000);
        assert_eq!(b.code_symbols, 0);
        let exiting = functions.div_ceil(5) as u64;
        for class in [
            "IN",
            "OUT",
            "RDMSR",
            "WRMSR",
            "CPUID",
            "MOV_TO_CR3",
            "MOV_FROM_CR3",
            "RDTSC",
        ] {
            assert_eq!(
                a.sites.get(class).copied(),
                Some(exiting),
                "{bits}-bit {class}"
            );
        }
        assert_eq!(a.sites_total, exiting * synth::EXITS_PER_FUNCTION as u64);
        // Traversal from symbols and the chunked linear sweep of the stripped copy
        // decode exactly the same instructions.
        assert_eq!(a.sites, b.sites, "{bits}-bit");
        assert_eq!(a.instructions, b.instructions, "{bits}-bit");
        assert_eq!(a.bytes_decoded, b.bytes_decoded);
        assert_eq!(a.bytes_decoded, a.code_bytes);
        assert_eq!(a.invalid, 0);
        assert!(
            a.bytes_traversed > a.code_bytes / 2,
            "symbols drive traversal"
        );
        assert_eq!(b.bytes_traversed as usize, {
            // Only the entry function is reached by traversal in the stripped copy.
            let first = analyze(&synth::elf(bits, 1, 5, false)).unwrap().report;
            first.bytes_traversed as usize
        });
        assert_eq!(a.regions.len(), 1);
        assert_eq!(a.regions[0].bitness, bits);
    }
}

#[test]
fn policy_decides_sites_not_class_counts() {
    let img = synth::elf(64, 4096, 1, true);
    let none = ExitPolicy::builder().build();
    let a = analyze_bytes("s", &img, &none, &TranslatorConfig::default())
        .unwrap()
        .report;
    let all = analyze_bytes("s", &img, &policy_all(), &TranslatorConfig::default())
        .unwrap()
        .report;
    // CPUID always exits; with nothing intercepted, port I/O, MSRs, CR3 and RDTSC do not.
    assert_eq!(a.sites.keys().copied().collect::<Vec<_>>(), vec!["CPUID"]);
    assert_eq!(a.class_instructions, all.class_instructions);
    assert_eq!(all.sites, all.class_instructions);
}

#[test]
fn errors_name_the_problem() {
    let good = synth::elf(64, 4096, 1, true);
    assert!(matches!(
        analyze(b"MZ\x90\x00"),
        Err(AnalyzeError::Elf(ElfError::NotElf { .. }))
    ));
    assert!(matches!(
        analyze(&good[..10]),
        Err(AnalyzeError::Elf(ElfError::Truncated { .. }))
    ));
    let mut m = good.clone();
    m[18] = 183;
    let e = analyze(&m).unwrap_err();
    assert_eq!(
        e,
        AnalyzeError::UnknownMachine {
            machine: 183,
            name: "AArch64"
        }
    );
    assert!(e.to_string().contains("unknown machine 183 (AArch64)"));
    let mut s = good.clone();
    s.truncate(s.len() - 8); // cuts the last section header
    assert!(matches!(
        analyze(&s),
        Err(AnalyzeError::Elf(ElfError::TablePastEnd { .. }))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn truncated_never_panics(bits in prop::sample::select(vec![32u32, 64]), cut in 0usize..8192) {
        let img = synth::elf(bits, 2048, 2, true);
        let cut = cut.min(img.len());
        let _ = analyze(&img[..cut]);
    }

    #[test]
    fn bit_flips_never_panic(
        bits in prop::sample::select(vec![32u32, 64]),
        flips in prop::collection::vec((0usize..1 << 16, 0u8..8), 1..16),
        header_only in any::<bool>(),
    ) {
        let mut img = synth::elf(bits, 2048, 2, true);
        let len = img.len();
        let header_end = if bits == 64 { 64 + 56 } else { 52 + 32 };
        for (pos, bit) in flips {
            let p = if header_only { pos % header_end } else { pos % len };
            img[p] ^= 1 << bit;
        }
        // Section headers are at the end: flip some there too.
        let tail = len - 1 - (img[0] as usize % 64);
        img[tail] ^= 0xff;
        match analyze(&img) {
            Ok(a) => prop_assert!(a.report.bytes_decoded <= a.report.code_bytes),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
