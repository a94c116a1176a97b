//! Translations made ahead of time, as `avex link` would put them in an image.

use avex_core::format::{self, GuestIdentity, TranslationSet, TranslatorStamp};
use avex_core::policy::ExitPolicy;

/// The AOT pass's translations of `elf` under the default policy, as a set the
/// running guest accepts (only clusters the format validates, one per start).
pub fn aot_set(name: &str, elf: &[u8]) -> TranslationSet {
    let policy = ExitPolicy::default();
    let config = avex_aot::TranslatorConfig::default();
    let a = avex_aot::analyze_bytes(name, elf, &policy, &config).expect("analysis");
    let mut clusters = a.clusters.clone();
    clusters.sort_by_key(|c| c.entry_rip());
    clusters.dedup_by_key(|c| c.entry_rip());
    // Only what the format accepts can be linked into an image.
    clusters.retain(|c| format::validate(c).is_ok());
    TranslationSet {
        guest: GuestIdentity {
            digest: avex_core::identity::of_elf(elf).expect("identity"),
            name: name.into(),
        },
        policy: policy.fingerprint(),
        translator: TranslatorStamp::default(),
        clusters,
    }
}
