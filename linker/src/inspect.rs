//! A readable listing of a translation set: header fields, then each cluster with
//! its bounds, instruction count, exiting classes, back-edges and disassembly
//! (iced-x86, Intel syntax) of the guest bytes it covers.

use std::fmt::Write as _;

use avex_core::format::{Hex, TranslationSet};
use avex_core::ir::{Bitness, Cluster};
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

/// What the listing says about the set's guest identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityCheck {
    /// The listed image's identity equals the set's.
    Matches,
    /// It differs: the set is stale for this image.
    Differs([u8; 32]),
    /// Not checked (a bare translation file).
    Unknown,
}

/// The disassembly of one cluster, one line per instruction in layout order (the
/// order the engine runs them; a block reached from two call sites appears twice):
/// address, bytes, Intel syntax, the exit class of exiting instructions, and the
/// guarded destinations of indirect branches and returns.
pub fn disassemble(c: &Cluster) -> Vec<String> {
    let bits = match c.bitness {
        Bitness::B16 => 16,
        Bitness::B32 => 32,
        Bitness::B64 => 64,
    };
    let mut fmt = IntelFormatter::new();
    let mut lines = Vec::new();
    let mut text = String::new();
    for (k, insn) in c.insns.iter().enumerate() {
        let bytes = c.insn_bytes(k).unwrap_or(&[]);
        let mut decoder = Decoder::with_ip(bits, bytes, insn.rip, DecoderOptions::NONE);
        let instr = decoder.decode();
        text.clear();
        fmt.format(&instr, &mut text);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let class = insn
            .exit_class
            .map(|e| format!("  ; exits: {}", e.name()))
            .unwrap_or_default();
        let guards: Vec<String> = c.guards_of(k).map(|g| format!("{:#x}", g.expect)).collect();
        let guards = if insn.op.is_guarded() {
            format!("  ; goes on to: [{}]", guards.join(", "))
        } else {
            String::new()
        };
        let mark = if class.is_empty() { ' ' } else { '*' };
        lines.push(format!(
            "  {mark} {:016x}  {hex:<30} {text}{class}{guards}",
            insn.rip
        ));
    }
    lines
}

/// The full listing.
pub fn render(set: &TranslationSet, identity: IdentityCheck) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "guest:      {:?}", set.guest.name);
    let _ = writeln!(s, "identity:   {}", Hex(&set.guest.digest));
    match identity {
        IdentityCheck::Matches => {
            let _ = writeln!(s, "            (matches this image)");
        }
        IdentityCheck::Differs(actual) => {
            let _ = writeln!(
                s,
                "            STALE: this image's identity is {}",
                Hex(&actual)
            );
        }
        IdentityCheck::Unknown => {}
    }
    let _ = writeln!(s, "policy:     {}", Hex(&set.policy));
    let _ = writeln!(
        s,
        "translator: {} ({})",
        Hex(&set.translator.fingerprint),
        set.translator.description
    );
    let insns: usize = set.clusters.iter().map(|c| c.insns.len()).sum();
    let exiting: usize = set.clusters.iter().map(|c| c.exiting_count()).sum();
    let _ = writeln!(
        s,
        "clusters:   {} ({} instructions, {} exiting)",
        set.clusters.len(),
        insns,
        exiting
    );
    for (k, c) in set.clusters.iter().enumerate() {
        let mut classes: Vec<&str> = c
            .insns
            .iter()
            .filter_map(|i| i.exit_class)
            .map(|e| e.name())
            .collect();
        classes.sort_unstable();
        classes.dedup();
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "cluster {k}: entry {:#x}, {} code range(s) {:#x}..{:#x} ({} bytes, {}-bit), {} instructions, {} exiting [{}]",
            c.entry_rip().unwrap_or(0),
            c.code.len(),
            c.lowest(),
            c.highest_end(),
            c.code_bytes(),
            c.bitness.bits(),
            c.insns.len(),
            c.exiting_count(),
            classes.join(", ")
        );
        for b in &c.back_edges {
            let at = c.insns.get(b.insn as usize).map_or(0, |i| i.rip);
            match b.cap {
                Some(n) => {
                    let _ = writeln!(s, "  back-edge at {at:#x}: taken at most {n} times per run");
                }
                None => {
                    let _ = writeln!(s, "  back-edge at {at:#x}: qualified loop");
                }
            }
        }
        for line in disassemble(c) {
            let _ = writeln!(s, "{line}");
        }
    }
    s
}
