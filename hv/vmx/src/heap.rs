//! The heap: all usable RAM above the hypervisor image and the GRUB modules, from
//! the multiboot memory map (within the identity-mapped first 4 GiB).

use linked_list_allocator::LockedHeap;

use crate::logln;
use crate::multiboot::Info;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __bss_end: u8;
}

pub fn init(info: &Info) {
    // Only the address of the linker symbol is taken.
    let image_end = core::ptr::addr_of!(__bss_end) as u64;
    // Keep the multiboot info and module strings (below the image or just after the
    // modules) out of the heap: start past both, with a margin.
    let floor = (image_end.max(info.modules_end()) + 0x10_0000 + 0xfff) & !0xfff;
    let mut best = (0u64, 0u64);
    info.for_each_region(|r| {
        if r.kind != 1 {
            return;
        }
        let start = r.base.max(floor);
        let end = (r.base + r.len).min(0x1_0000_0000) & !0xfff;
        if end > start && end - start > best.1 - best.0 {
            best = (start, end);
        }
    });
    if best.1 <= best.0 {
        logln!("avex-vmx: no usable memory above {floor:#x} for the heap");
        crate::cpu::shutdown();
    }
    // SAFETY: the region is usable RAM per the memory map, identity-mapped, above the
    // image, the modules and the boot information, and handed to the allocator once.
    unsafe {
        HEAP.lock()
            .init(best.0 as *mut u8, (best.1 - best.0) as usize)
    };
    logln!(
        "avex-vmx: heap {:#x}..{:#x} ({} MiB)",
        best.0,
        best.1,
        (best.1 - best.0) >> 20
    );
}
