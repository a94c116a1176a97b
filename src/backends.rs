//! The backends avex can run a guest on, by name (`--backend`).

use serde::Serialize;

use crate::backend::Backend;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The hosted backend on /dev/kvm.
    Kvm,
    /// The bare-metal VT-x hypervisor, booted in Bochs.
    Bochs,
}

impl BackendKind {
    /// The implementation.
    pub fn get(self) -> &'static dyn Backend {
        match self {
            BackendKind::Kvm => &crate::kvm::Kvm,
            BackendKind::Bochs => &crate::bochs::Bochs,
        }
    }
    pub fn name(self) -> &'static str {
        self.get().name()
    }
}
