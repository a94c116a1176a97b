//! Builds guest-kernels/ (in progress).
pub fn build() {}
