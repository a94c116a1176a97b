//! `pci`: PCI enumeration and BAR sizing through configuration mechanism #1
//! (0xCF8 address, 0xCFC data), as Linux's `pci_scan_bus`/`__pci_read_base` do it:
//! every bus, device and function (functions 1..7 only when the header type's
//! multi-function bit is set), vendor/device/class of each function found, and
//! each BAR sized with decode disabled (save, write all ones, read, restore; the
//! upper half of 64-bit BARs too). Prints a checksum of every value read.
#![no_std]
#![no_main]

use rt::cpu::{inl, outl};
use rt::serial::{print_dec_n, print_hex_digits};
use rt::{print, print_hex, print_hex_n, println, Checksum};

rt::entry!(main);

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

const PCI_VENDOR_ID: u8 = 0x00;
const PCI_COMMAND: u8 = 0x04;
const PCI_CLASS_REVISION: u8 = 0x08;
const PCI_HEADER_TYPE_DWORD: u8 = 0x0c;
const PCI_BASE_ADDRESS_0: u8 = 0x10;
const PCI_COMMAND_IO: u32 = 0x1;
const PCI_COMMAND_MEMORY: u32 = 0x2;

fn addr(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(dev) << 11)
        | (u32::from(func) << 8)
        | u32::from(reg & 0xfc)
}

fn read32(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
    outl(CONFIG_ADDRESS, addr(bus, dev, func, reg));
    inl(CONFIG_DATA)
}

fn write32(bus: u8, dev: u8, func: u8, reg: u8, v: u32) {
    outl(CONFIG_ADDRESS, addr(bus, dev, func, reg));
    outl(CONFIG_DATA, v);
}

/// `pci_bus_generic_read_dev_vendor_id`: absent functions read all ones (or, on
/// some bridges, zero in one half).
fn present(id: u32) -> bool {
    !matches!(id, 0xffff_ffff | 0 | 0x0000_ffff | 0xffff_0000)
}

struct Stats {
    sum: Checksum,
    functions: u32,
    bars: u32,
}

/// Size the BARs of one function (`nbars` of them: 6 for type 0, 2 for bridges).
fn size_bars(bus: u8, dev: u8, func: u8, nbars: u8, st: &mut Stats) {
    // Disable I/O and memory decode while the BARs hold all ones.
    let cmd = read32(bus, dev, func, PCI_COMMAND);
    st.sum.add_u32(cmd);
    let decode = cmd & (PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    if decode != 0 {
        write32(bus, dev, func, PCI_COMMAND, cmd & !decode & 0xffff);
    }
    let mut i = 0;
    while i < nbars {
        let reg = PCI_BASE_ADDRESS_0 + 4 * i;
        let orig = read32(bus, dev, func, reg);
        write32(bus, dev, func, reg, 0xffff_ffff);
        let mask = read32(bus, dev, func, reg);
        write32(bus, dev, func, reg, orig);
        st.sum.add_u32(orig);
        st.sum.add_u32(mask);
        let is_io = orig & 1 == 1;
        let is_64 = !is_io && (orig >> 1) & 3 == 2;
        let (size, kind) = if is_io {
            let m = u64::from(mask & !0x3) | 0xffff_0000;
            ((!m).wrapping_add(1) & 0xffff, "io   ")
        } else if is_64 && i + 1 < nbars {
            let hreg = reg + 4;
            let horig = read32(bus, dev, func, hreg);
            write32(bus, dev, func, hreg, 0xffff_ffff);
            let hmask = read32(bus, dev, func, hreg);
            write32(bus, dev, func, hreg, horig);
            st.sum.add_u32(horig);
            st.sum.add_u32(hmask);
            let m = (u64::from(hmask) << 32) | u64::from(mask & !0xf);
            ((!m).wrapping_add(1), "mem64")
        } else {
            let m = u64::from(mask & !0xf) | 0xffff_ffff_0000_0000;
            ((!m).wrapping_add(1) & 0xffff_ffff, "mem32")
        };
        if mask != 0 && size != 0 {
            st.bars += 1;
            print("    bar");
            print_dec_n(u64::from(i), 1);
            print(" ");
            print(kind);
            print(" size ");
            print_hex(size);
            if orig & 0x8 != 0 && !is_io {
                print(" prefetchable");
            }
            println("");
        }
        i += if is_64 { 2 } else { 1 };
    }
    if decode != 0 {
        write32(bus, dev, func, PCI_COMMAND, cmd & 0xffff);
    }
}

fn function(bus: u8, dev: u8, func: u8, id: u32, st: &mut Stats) -> u8 {
    let class = read32(bus, dev, func, PCI_CLASS_REVISION);
    let hdr_dword = read32(bus, dev, func, PCI_HEADER_TYPE_DWORD);
    let hdr = (hdr_dword >> 16) as u8;
    st.sum.add_u32(id);
    st.sum.add_u32(class);
    st.sum.add_u32(hdr_dword);
    st.functions += 1;

    print("pci ");
    print_hex_digits(u64::from(bus), 2);
    print(":");
    print_hex_digits(u64::from(dev), 2);
    print(".");
    print_hex_digits(u64::from(func), 1);
    print(" ");
    print_hex_digits(u64::from(id & 0xffff), 4);
    print(":");
    print_hex_digits(u64::from(id >> 16), 4);
    print(" class ");
    print_hex_digits(u64::from(class >> 8), 6);
    print(" rev ");
    print_hex_digits(u64::from(class & 0xff), 2);
    print(" hdr ");
    print_hex_digits(u64::from(hdr), 2);
    println("");

    match hdr & 0x7f {
        0 => size_bars(bus, dev, func, 6, st),
        1 => size_bars(bus, dev, func, 2, st),
        _ => {}
    }
    hdr
}

fn main() -> u8 {
    let mut st = Stats {
        sum: Checksum::new(),
        functions: 0,
        bars: 0,
    };
    let mut probes = 0u32;
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            let id = read32(bus, dev, 0, PCI_VENDOR_ID);
            probes += 1;
            if !present(id) {
                continue;
            }
            let hdr = function(bus, dev, 0, id, &mut st);
            if hdr & 0x80 == 0 {
                continue;
            }
            for func in 1..8u8 {
                let id = read32(bus, dev, func, PCI_VENDOR_ID);
                probes += 1;
                if present(id) {
                    function(bus, dev, func, id, &mut st);
                }
            }
        }
    }
    st.sum.add_u32(probes);
    print("pci: probed ");
    rt::print_dec(u64::from(probes));
    print(" functions, found ");
    rt::print_dec(u64::from(st.functions));
    print(", sized ");
    rt::print_dec(u64::from(st.bars));
    println(" bars");
    print("pci: checksum ");
    print_hex_n(st.sum.value(), 16);
    println("");
    println("pci: ok");
    rt::EXIT_OK
}
