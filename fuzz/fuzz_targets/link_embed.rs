//! The linker's hand-written ELF section append on arbitrary bytes: reading must
//! never panic, and whenever `embed` accepts an input, the payload reads back
//! exactly, the original bytes are unchanged but the ELF header's section-table
//! fields, and the program headers parse the same.
#![no_main]

use avex_core::boot::parse_elf;
use avex_linker::{embed, read_translation_set, read_translations};
use libfuzzer_sys::fuzz_target;

const PAYLOAD: &[u8] = b"avex fuzz payload";

fuzz_target!(|data: &[u8]| {
    let _ = read_translations(data);
    let _ = read_translation_set(data);
    let Ok(out) = embed(data, PAYLOAD) else {
        return;
    };
    assert_eq!(read_translations(&out).unwrap().as_deref(), Some(PAYLOAD));
    let fields: &[std::ops::Range<usize>] = if data[4] == 2 {
        &[0x28..0x30, 0x3a..0x40]
    } else {
        &[0x20..0x24, 0x2e..0x34]
    };
    for (i, (a, b)) in data.iter().zip(out.iter()).enumerate() {
        assert!(
            a == b || fields.iter().any(|r| r.contains(&i)),
            "byte {i:#x} changed"
        );
    }
    if let Ok(before) = parse_elf(data) {
        assert_eq!(parse_elf(&out).ok(), Some(before));
    }
    // Embedding again replaces the section.
    let again = embed(&out, b"second").unwrap();
    assert_eq!(
        read_translations(&again).unwrap().as_deref(),
        Some(&b"second"[..])
    );
});
