//! Builds the freestanding parts (guest kernels, the VT-x hypervisor) with their own
//! cargo invocations, flags and target directories (PLATFORM.md: they cannot be
//! members of the hosted workspace build), and tells the hosted side where they are.

#[path = "build/cguests.rs"]
mod cguests;
#[path = "build/freestanding.rs"]
mod freestanding;
#[path = "build/guests.rs"]
mod guests;
#[path = "build/tools.rs"]
mod tools;
#[path = "build/vmx.rs"]
mod vmx;

fn main() {
    guests::build();
    vmx::build();
    tools::detect();
}
