//! The multiboot1 information GRUB hands over: command line, modules, memory map.

use alloc::string::String;
use alloc::vec::Vec;

/// What a multiboot loader leaves in EAX (the value avex's own loader gives ELF32
/// guests).
pub use avex_core::boot::MULTIBOOT_MAGIC as MAGIC;

#[derive(Clone, Debug)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    pub cmdline: String,
}

#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    pub base: u64,
    pub len: u64,
    pub kind: u32,
}

/// The raw info block's address, checked and read field by field.
pub struct Info {
    addr: u64,
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: the multiboot structures are in low memory, identity-mapped; the loader
    // put them there and nothing has overwritten them (the heap lies above them).
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as in rd32.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// A NUL-terminated string at `addr` (at most 4 KiB).
fn cstr(addr: u64) -> String {
    let mut s = Vec::new();
    for i in 0..4096 {
        // SAFETY: as in rd32.
        let b = unsafe { core::ptr::read((addr + i) as *const u8) };
        if b == 0 {
            break;
        }
        s.push(b);
    }
    String::from_utf8_lossy(&s).into_owned()
}

impl Info {
    pub fn new(addr: u64) -> Self {
        Info { addr }
    }
    fn flags(&self) -> u32 {
        rd32(self.addr)
    }
    /// Memory map without allocation (used before the heap exists).
    pub fn for_each_region(&self, mut f: impl FnMut(MemRegion)) {
        if self.flags() & (1 << 6) == 0 {
            // Only mem_upper: one region from 1 MiB.
            if self.flags() & 1 != 0 {
                let upper = u64::from(rd32(self.addr + 8)) * 1024;
                f(MemRegion {
                    base: 0x10_0000,
                    len: upper,
                    kind: 1,
                });
            }
            return;
        }
        let len = u64::from(rd32(self.addr + 44));
        let base = u64::from(rd32(self.addr + 48));
        let mut p = base;
        while p + 24 <= base + len {
            let size = u64::from(rd32(p));
            f(MemRegion {
                base: rd64(p + 4),
                len: rd64(p + 12),
                kind: rd32(p + 20),
            });
            p += size + 4;
        }
    }
    /// Highest address used by the modules and their strings (without allocation).
    pub fn modules_end(&self) -> u64 {
        let mut end = 0;
        if self.flags() & (1 << 3) != 0 {
            let count = u64::from(rd32(self.addr + 20));
            let base = u64::from(rd32(self.addr + 24));
            for i in 0..count {
                end = end.max(u64::from(rd32(base + 16 * i + 4)));
            }
        }
        end
    }
    pub fn cmdline(&self) -> String {
        if self.flags() & (1 << 2) != 0 {
            cstr(u64::from(rd32(self.addr + 16)))
        } else {
            String::new()
        }
    }
    pub fn modules(&self) -> Vec<Module> {
        let mut v = Vec::new();
        if self.flags() & (1 << 3) != 0 {
            let count = u64::from(rd32(self.addr + 20));
            let base = u64::from(rd32(self.addr + 24));
            for i in 0..count {
                let m = base + 16 * i;
                v.push(Module {
                    start: u64::from(rd32(m)),
                    end: u64::from(rd32(m + 4)),
                    cmdline: cstr(u64::from(rd32(m + 8))),
                });
            }
        }
        v
    }
}
