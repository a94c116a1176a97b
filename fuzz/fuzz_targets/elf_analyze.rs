//! The AOT pass's ELF analysis (`avex_aot::analyze_bytes`) on arbitrary in-memory
//! bytes: it must return a report or an error, never panic, and every cluster it
//! forms must pass the translation format's validation.
#![no_main]

use avex_aot::{analyze_bytes, ExitPolicy, TranslatorConfig};
use avex_core::format::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = ExitPolicy::default();
    let config = TranslatorConfig::default();
    if let Ok(analysis) = analyze_bytes("fuzz.elf", data, &policy, &config) {
        for c in &analysis.clusters {
            if let Err(e) = validate(c) {
                panic!("cluster at {:#x} fails validation: {e}", c.lowest());
            }
        }
    }
});
