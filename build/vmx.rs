//! Builds hv/vmx (in progress).
pub fn build() {}
