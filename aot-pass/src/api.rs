//! The hv/core APIs the pass uses, in one place.

pub use avex_core::ir::Cluster;
pub use avex_core::policy::{exit_class_of, ExitClass, ExitPolicy, VmcsControl};
pub use avex_core::translator::{shape, translate_region, NoCluster, Shape, TranslatorConfig};

pub fn class_name(c: ExitClass) -> &'static str {
    c.name()
}

/// A translator configuration as a translation set records it: every field (its
/// Debug form), so the stamp changes whenever a rule does.
pub fn describe_config(c: &TranslatorConfig) -> String {
    format!("{c:?}")
}
