//! Per-binary linker scripts: the guests link at 1 MiB, the multiboot trampoline
//! used for QEMU hand checks links at 16 MiB so it does not overlap a guest.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    for bin in ["console", "pci", "rtc", "pit", "cpuid", "ctxswitch"] {
        println!("cargo:rustc-link-arg-bin={bin}=-T{dir}/guest.ld");
    }
    println!("cargo:rustc-link-arg-bin=mbloader=-T{dir}/mbloader.ld");
    println!("cargo:rerun-if-changed=guest.ld");
    println!("cargo:rerun-if-changed=mbloader.ld");
}
