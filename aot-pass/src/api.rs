//! The hv/core APIs the pass uses, in one place.

pub use avex_core::ir::Cluster;
pub use avex_core::policy::{exit_class_of, ExitClass, ExitPolicy, VmcsControl};
pub use avex_core::translator::{
    shape, translate, translate_in, NoCluster, Shape, Translated, TranslatorConfig,
};

pub fn class_name(c: ExitClass) -> &'static str {
    c.name()
}

/// Human-readable summary of a translator configuration, for translation sets.
pub fn describe_config(c: &TranslatorConfig) -> String {
    format!(
        "look_ahead={} max_gap_memory_accesses={} back_edge_cap={} end_after_cr3_load={}",
        c.look_ahead, c.max_gap_memory_accesses, c.back_edge_cap, c.end_after_cr3_load
    )
}
