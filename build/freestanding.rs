//! Shared helper for building a freestanding crate on stable Rust (filled in by the
//! guest-kernel work).
#![allow(dead_code)]
