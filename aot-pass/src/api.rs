//! The hv/core APIs the pass uses, in one place.
//!
//! TEMPORARY stand-ins until hv/core's policy and translator land (documented
//! signatures): replace this file's body with re-exports.

pub use avex_core::ir::Cluster;
pub use avex_core::policy::ExitClass;

pub use avex_core::policy::{exit_class_of, ExitPolicy, VmcsControl};

use avex_core::ir::Bitness;

pub fn class_name(c: ExitClass) -> &'static str {
    c.name()
}

#[derive(Clone, Debug, Default)]
pub struct TranslatorConfig;

#[derive(Clone, Debug)]
pub enum NoCluster {
    NotBuilt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    StraightLine,
    Branching,
    Looping,
}

pub fn translate(
    _code: &[u8],
    _rip: u64,
    _bitness: Bitness,
    _policy: &ExitPolicy,
    _config: &TranslatorConfig,
) -> Result<Cluster, NoCluster> {
    Err(NoCluster::NotBuilt)
}

pub fn shape(_c: &Cluster) -> Shape {
    Shape::StraightLine
}
