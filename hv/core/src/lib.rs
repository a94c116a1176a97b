//! avex's core, shared by every backend and by the AOT pass.
//!
//! `no_std` + `alloc`: the bare-metal VT-x hypervisor links this crate too.
//! Nothing here knows about VMCS fields or `kvm_run`; backends implement
//! [`guest::Guest`] and turn their hardware's exits into [`exit::Exit`]. The x86
//! architectural facts every crate uses (register bits, MSR numbers, CPUID bits)
//! are in [`arch`], once; every ELF file (a guest to boot, its PVH note, its
//! identity, its translations section, the AOT pass's input) is read by [`elf`].
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod arch;
pub mod boot;
pub mod cache;
pub mod devices;
pub mod distance;
pub mod elf;
pub mod emulate;
pub mod engine;
pub mod exit;
pub mod format;
pub mod guest;
pub mod guest_code;
pub mod identity;
pub mod ir;
pub mod lower;
pub mod policy;
pub mod stats;
pub mod tracker;
pub mod translator;
