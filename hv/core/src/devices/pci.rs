//! PCI configuration mechanism #1 (0xcf8 address, 0xcfc..0xcff data) on bus 0,
//! with configurable type-0 functions.
//!
//! Each function is 256 bytes of configuration space plus a mask of writable
//! bits, so hardware behaviour falls out: read-only fields (IDs, class, header
//! type, interrupt pin) ignore writes, the command register takes only the bits it
//! implements, and BAR sizing works as on hardware (write all-ones, read back the
//! size mask with the BAR's type bits, restore). Functions that do not exist read
//! all-ones, which is how enumeration finds nothing there. The PIIX reset control
//! register (byte port 0xcf9) records a guest's reset request.

use alloc::collections::BTreeMap;

use super::device::{size_mask, valid_size, PortDevice};

/// A base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// I/O space; `size` is rounded up to a power of two of at least 4.
    Io { size: u32, addr: u32 },
    /// 32-bit memory; `size` is rounded up to a power of two of at least 16.
    Mem32 {
        size: u32,
        addr: u32,
        prefetchable: bool,
    },
    /// 64-bit memory, taking this BAR and the next; `size` as for `Mem32`.
    Mem64 {
        size: u64,
        addr: u64,
        prefetchable: bool,
    },
}

impl Bar {
    /// The size after rounding.
    pub fn size(&self) -> u64 {
        match *self {
            Bar::Io { size, .. } => (size.max(4) as u64).next_power_of_two(),
            Bar::Mem32 { size, .. } => (size.max(16) as u64).next_power_of_two(),
            Bar::Mem64 { size, .. } => size.max(16).checked_next_power_of_two().unwrap_or(1 << 63),
        }
    }
}

const COMMAND_WRITABLE: u16 = 0x0547; // I/O, memory, bus master, parity, SERR, INTx disable

/// One PCI function's configuration space.
#[derive(Clone, Debug)]
pub struct PciFunction {
    config: [u8; 256],
    wmask: [u8; 256],
    bars: [Option<Bar>; 6],
}

impl PciFunction {
    /// A type-0 function with these IDs and class code, no BARs, no interrupt.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut f = PciFunction {
            config: [0; 256],
            wmask: [0; 256],
            bars: [None; 6],
        };
        f.set16(0x00, vendor);
        f.set16(0x02, device);
        f.config[0x09] = prog_if;
        f.config[0x0a] = subclass;
        f.config[0x0b] = class;
        f.wmask[0x04..0x06].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        f.wmask[0x0c] = 0xff; // cache line size
        f.wmask[0x0d] = 0xff; // latency timer
        f.wmask[0x3c] = 0xff; // interrupt line
        f
    }

    /// The i440FX host bridge, 8086:1237 class 06/00/00.
    pub fn host_bridge() -> Self {
        PciFunction::new(0x8086, 0x1237, 0x06, 0x00, 0x00).revision(0x02)
    }

    pub fn revision(mut self, rev: u8) -> Self {
        self.config[0x08] = rev;
        self
    }

    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.set16(0x2c, vendor);
        self.set16(0x2e, id);
        self
    }

    /// Interrupt pin (1 = INTA#..4 = INTD#) and the line the firmware routed it to.
    pub fn interrupt(mut self, pin: u8, line: u8) -> Self {
        self.config[0x3d] = pin;
        self.config[0x3c] = line;
        self
    }

    /// Initial command register (only its writable bits are kept).
    pub fn command_init(mut self, command: u16) -> Self {
        self.set16(0x04, command & COMMAND_WRITABLE);
        self
    }

    /// Install `bar` at BAR `index` (0..=5; a 64-bit BAR also takes `index + 1`).
    /// The address is aligned down to the BAR's size.
    ///
    /// # Panics
    /// On an index out of range or a 64-bit BAR at index 5: a configuration error.
    pub fn bar(mut self, index: usize, bar: Bar) -> Self {
        let wide = matches!(bar, Bar::Mem64 { .. });
        assert!(
            index < 6 && !(wide && index == 5),
            "BAR index {index} out of range"
        );
        let size = bar.size();
        let mask = !(size - 1);
        let off = 0x10 + 4 * index;
        let (value, wmask): (u64, u64) = match bar {
            Bar::Io { addr, .. } => ((addr as u64 & mask) | 1, mask & 0xffff_fffc),
            Bar::Mem32 {
                addr, prefetchable, ..
            } => (
                (addr as u64 & mask) | (prefetchable as u64) << 3,
                mask & 0xffff_fff0,
            ),
            Bar::Mem64 {
                addr, prefetchable, ..
            } => (
                (addr & mask) | 0b100 | (prefetchable as u64) << 3,
                mask & !0xf,
            ),
        };
        let n = if wide { 8 } else { 4 };
        self.config[off..off + n].copy_from_slice(&value.to_le_bytes()[..n]);
        self.wmask[off..off + n].copy_from_slice(&wmask.to_le_bytes()[..n]);
        self.bars[index] = Some(bar);
        if wide {
            self.bars[index + 1] = None;
        }
        self
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.config[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.config[off],
            self.config[off + 1],
            self.config[off + 2],
            self.config[off + 3],
        ])
    }

    pub fn vendor_id(&self) -> u16 {
        u16::from_le_bytes([self.config[0], self.config[1]])
    }
    pub fn device_id(&self) -> u16 {
        u16::from_le_bytes([self.config[2], self.config[3]])
    }
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.config[4], self.config[5]])
    }
    pub fn interrupt_line(&self) -> u8 {
        self.config[0x3c]
    }

    /// The BAR as configured (type and size).
    pub fn bar_info(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently holds (type bits stripped).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar_info(index)?;
        let lo = self.get32(0x10 + 4 * index) as u64;
        Some(match bar {
            Bar::Io { .. } => lo & !0x3,
            Bar::Mem32 { .. } => lo & !0xf,
            Bar::Mem64 { .. } => (self.get32(0x14 + 4 * index) as u64) << 32 | (lo & !0xf),
        })
    }

    /// The configuration dword at `reg` (aligned down to 4).
    pub fn read_dword(&self, reg: u8) -> u32 {
        self.get32((reg & 0xfc) as usize)
    }

    /// Write `size` bytes of `value` at byte `offset`, through the write mask.
    /// Bytes past the end of the 256-byte space are dropped.
    pub fn write(&mut self, offset: u8, size: u8, value: u32) {
        for i in 0..size.min(4) as usize {
            let idx = offset as usize + i;
            if idx >= 256 {
                break;
            }
            let b = (value >> (8 * i)) as u8;
            let m = self.wmask[idx];
            self.config[idx] = (self.config[idx] & !m) | (b & m);
        }
    }

    fn set_multifunction(&mut self, on: bool) {
        if on {
            self.config[0x0e] |= 0x80;
        } else {
            self.config[0x0e] &= !0x80;
        }
    }
}

/// The set of functions on bus 0.
#[derive(Clone, Debug, Default)]
pub struct PciConfig {
    functions: BTreeMap<(u8, u8), PciFunction>,
}

impl PciConfig {
    /// No functions at all (not even a host bridge).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) function `device.function` on bus 0.
    ///
    /// # Panics
    /// If `device > 31` or `function > 7`: a configuration error.
    pub fn with(mut self, device: u8, function: u8, f: PciFunction) -> Self {
        assert!(
            device < 32 && function < 8,
            "no PCI function {device}.{function}"
        );
        self.functions.insert((device, function), f);
        self
    }

    /// The standard set:
    /// - 00:00.0 host bridge 8086:1237 (06/00/00);
    /// - 00:01.0 PIIX3 ISA bridge 8086:7000 (06/01/00), multi-function, with
    ///   00:01.1 PIIX3 IDE 8086:7010 (01/01/80), BAR4 I/O 16 bytes at 0xc040;
    /// - 00:02.0 an Ethernet controller 1b36:00f0 (02/00/00), BAR0 I/O 0x20 at
    ///   0xc000, BAR1 32-bit memory 4 KiB at 0xfebf0000, INTA# on line 11;
    /// - 00:03.0 a display controller 1b36:00f1 (03/80/00), BAR0/1 64-bit
    ///   prefetchable memory 1 MiB at 0xe0000000.
    ///
    /// The 1b36:00fx IDs are avex test devices (no guest driver binds them);
    /// addresses are what firmware would have assigned.
    pub fn standard() -> Self {
        PciConfig::new()
            .with(0, 0, PciFunction::host_bridge())
            .with(
                1,
                0,
                PciFunction::new(0x8086, 0x7000, 0x06, 0x01, 0x00).command_init(0x0007),
            )
            .with(
                1,
                1,
                PciFunction::new(0x8086, 0x7010, 0x01, 0x01, 0x80)
                    .bar(
                        4,
                        Bar::Io {
                            size: 16,
                            addr: 0xc040,
                        },
                    )
                    .command_init(0x0005),
            )
            .with(
                2,
                0,
                PciFunction::new(0x1b36, 0x00f0, 0x02, 0x00, 0x00)
                    .subsystem(0x1af4, 0x1100)
                    .bar(
                        0,
                        Bar::Io {
                            size: 0x20,
                            addr: 0xc000,
                        },
                    )
                    .bar(
                        1,
                        Bar::Mem32 {
                            size: 0x1000,
                            addr: 0xfebf_0000,
                            prefetchable: false,
                        },
                    )
                    .interrupt(1, 11)
                    .command_init(0x0003),
            )
            .with(
                3,
                0,
                PciFunction::new(0x1b36, 0x00f1, 0x03, 0x80, 0x00)
                    .subsystem(0x1af4, 0x1100)
                    .bar(
                        0,
                        Bar::Mem64 {
                            size: 0x10_0000,
                            addr: 0xe000_0000,
                            prefetchable: true,
                        },
                    )
                    .command_init(0x0002),
            )
    }
}

/// The configuration mechanism #1 ports and the functions behind them.
#[derive(Clone, Debug)]
pub struct PciBus {
    address: u32,
    functions: BTreeMap<(u8, u8), PciFunction>,
    /// PIIX reset control register (byte port 0xcf9).
    rcr: u8,
    reset_requested: bool,
}

impl PciBus {
    /// The functions of `config`; function 0 of every device that has others gets
    /// its multi-function header bit.
    pub fn new(config: PciConfig) -> Self {
        let mut functions = config.functions;
        let multi: alloc::vec::Vec<u8> = functions
            .keys()
            .filter(|&&(_, f)| f != 0)
            .map(|&(d, _)| d)
            .collect();
        for (&(d, f), func) in functions.iter_mut() {
            if f == 0 {
                func.set_multifunction(multi.contains(&d));
            }
        }
        PciBus {
            address: 0,
            functions,
            rcr: 0,
            reset_requested: false,
        }
    }

    /// True once the guest asked for a reset through the reset control register
    /// (a byte write to 0xcf9 with RST_CPU, bit 2, set: Linux's `reboot=pci`).
    pub fn reset_requested(&self) -> bool {
        self.reset_requested
    }

    /// The current value of the address register (0xcf8).
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn function(&self, device: u8, function: u8) -> Option<&PciFunction> {
        self.functions.get(&(device, function))
    }

    pub fn function_mut(&mut self, device: u8, function: u8) -> Option<&mut PciFunction> {
        self.functions.get_mut(&(device, function))
    }

    /// The function and register the address register selects, if enabled and on
    /// bus 0.
    fn target(&self) -> Option<((u8, u8), u8)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = ((a >> 8) & 7) as u8;
        Some(((dev, func), (a & 0xfc) as u8))
    }

    /// Configuration read of `size` bytes at `port` (0xcf8..=0xcff).
    pub fn read_port(&mut self, port: u16, size: u8) -> u32 {
        if !valid_size(size) {
            return 0xffff_ffff;
        }
        match port {
            0xcf8 if size == 4 => self.address,
            0xcf9 if size == 1 => self.rcr as u32,
            0xcfc..=0xcff => {
                let off = (port - 0xcfc) as u8;
                if off + size > 4 {
                    return 0xffff_ffff;
                }
                let Some((key, reg)) = self.target() else {
                    return size_mask(size);
                };
                match self.functions.get(&key) {
                    Some(f) => (f.read_dword(reg) >> (8 * off)) & size_mask(size),
                    None => size_mask(size),
                }
            }
            // Other byte and word accesses to 0xcf8..0xcfb are not configuration
            // cycles.
            _ => size_mask(size),
        }
    }

    /// Configuration write of `size` bytes at `port` (0xcf8..=0xcff).
    pub fn write_port(&mut self, port: u16, size: u8, value: u32) {
        if !valid_size(size) {
            return;
        }
        match port {
            0xcf8 if size == 4 => self.address = value & 0x80ff_fffc,
            0xcf9 if size == 1 => {
                self.rcr = value as u8 & 0x0e;
                if value & 0x04 != 0 {
                    self.reset_requested = true;
                }
            }
            0xcfc..=0xcff => {
                let off = (port - 0xcfc) as u8;
                if off + size > 4 {
                    return;
                }
                if let Some((key, reg)) = self.target() {
                    if let Some(f) = self.functions.get_mut(&key) {
                        f.write(reg + off, size, value);
                    }
                }
            }
            _ => {}
        }
    }
}

impl PortDevice for PciBus {
    fn name(&self) -> &'static str {
        "pci-conf1"
    }
    fn read(&mut self, port: u16, size: u8, _now_ns: u64) -> u32 {
        self.read_port(port, size)
    }
    fn write(&mut self, port: u16, size: u8, value: u32, _now_ns: u64) {
        self.write_port(port, size, value)
    }
    fn wide(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn addr(dev: u8, func: u8, reg: u8) -> u32 {
        0x8000_0000 | (dev as u32) << 11 | (func as u32) << 8 | reg as u32
    }

    fn cfg_read(p: &mut PciBus, dev: u8, func: u8, reg: u8, size: u8) -> u32 {
        p.write_port(0xcf8, 4, addr(dev, func, reg & 0xfc));
        p.read_port(0xcfc + (reg & 3) as u16, size)
    }

    fn cfg_write(p: &mut PciBus, dev: u8, func: u8, reg: u8, size: u8, v: u32) {
        p.write_port(0xcf8, 4, addr(dev, func, reg & 0xfc));
        p.write_port(0xcfc + (reg & 3) as u16, size, v);
    }

    /// The Linux/BIOS sizing sequence; returns (original, read-back mask).
    fn size_bar(p: &mut PciBus, dev: u8, func: u8, reg: u8) -> (u32, u32) {
        let orig = cfg_read(p, dev, func, reg, 4);
        cfg_write(p, dev, func, reg, 4, 0xffff_ffff);
        let mask = cfg_read(p, dev, func, reg, 4);
        cfg_write(p, dev, func, reg, 4, orig);
        assert_eq!(cfg_read(p, dev, func, reg, 4), orig, "restored");
        (orig, mask)
    }

    fn std_bus() -> PciBus {
        PciBus::new(PciConfig::standard())
    }

    #[test]
    fn host_bridge_ids_and_sub_dword_accesses() {
        let mut p = std_bus();
        assert_eq!(cfg_read(&mut p, 0, 0, 0x00, 4), 0x1237_8086);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x00, 2), 0x8086);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x02, 2), 0x1237);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x01, 1), 0x80);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x03, 1), 0x12);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x08, 4), 0x0600_0002);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x0b, 1), 0x06);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x0a, 2), 0x0600);
        assert_eq!(cfg_read(&mut p, 0, 0, 0x0e, 1), 0x00, "single-function");
        // A dword access not aligned to the data window reads all-ones.
        p.write_port(0xcf8, 4, addr(0, 0, 0));
        assert_eq!(p.read_port(0xcfd, 4), 0xffff_ffff);
        assert_eq!(p.read_port(0xcfe, 4), 0xffff_ffff);
        p.write_port(0xcfd, 4, 0);
        assert_eq!(p.read_port(0xcfc, 4), 0x1237_8086);
    }

    #[test]
    fn address_register_and_enable_bit() {
        let mut p = std_bus();
        p.write_port(0xcf8, 4, 0xffff_ffff);
        assert_eq!(p.read_port(0xcf8, 4), 0x80ff_fffc, "reserved bits read 0");
        // Enable bit clear: no configuration cycle, all-ones.
        p.write_port(0xcf8, 4, 0x0000_0000);
        assert_eq!(p.read_port(0xcfc, 4), 0xffff_ffff);
        assert_eq!(p.read_port(0xcfc, 2), 0xffff);
        // Byte accesses to 0xcf8..0xcfb do not touch the address register
        // (Linux's type-1 check writes 0xcfb and expects a dword read intact).
        p.write_port(0xcf8, 4, 0x8000_0000);
        p.write_port(0xcfb, 1, 0x01);
        p.write_port(0xcf8, 1, 0x00);
        assert_eq!(p.read_port(0xcf8, 4), 0x8000_0000);
        assert_eq!(p.read_port(0xcf8, 1), 0xff, "not a type-2 mechanism");
        assert_eq!(p.read_port(0xcfa, 1), 0xff);
        // Bus 1 does not exist.
        p.write_port(0xcf8, 4, 0x8001_0000);
        assert_eq!(p.read_port(0xcfc, 4), 0xffff_ffff);
        // Odd sizes.
        assert_eq!(p.read_port(0xcfc, 3), 0xffff_ffff);
        p.write_port(0xcfc, 0, 0);
    }

    #[test]
    fn reset_control_register() {
        let mut p = std_bus();
        assert!(!p.reset_requested());
        p.write_port(0xcf9, 1, 0x02); // SYS_RST alone: no reset yet
        assert_eq!(p.read_port(0xcf9, 1), 0x02);
        assert!(!p.reset_requested());
        p.write_port(0xcf9, 1, 0x06);
        assert!(p.reset_requested());
        // Not the address register.
        p.write_port(0xcf8, 4, 0x8000_0000);
        p.write_port(0xcf9, 1, 0xff);
        assert_eq!(p.read_port(0xcf8, 4), 0x8000_0000);
    }

    #[test]
    fn enumeration_finds_exactly_the_configured_functions() {
        let mut p = std_bus();
        let mut found = Vec::new();
        for dev in 0..32u8 {
            let id = cfg_read(&mut p, dev, 0, 0, 4);
            if id == 0xffff_ffff {
                continue;
            }
            found.push((dev, 0, id));
            let multi = cfg_read(&mut p, dev, 0, 0x0e, 1) & 0x80 != 0;
            if multi {
                for func in 1..8u8 {
                    let id = cfg_read(&mut p, dev, func, 0, 4);
                    if id != 0xffff_ffff {
                        found.push((dev, func, id));
                    }
                }
            }
        }
        assert_eq!(
            found,
            [
                (0, 0, 0x1237_8086),
                (1, 0, 0x7000_8086),
                (1, 1, 0x7010_8086),
                (2, 0, 0x00f0_1b36),
                (3, 0, 0x00f1_1b36),
            ]
        );
        // Absent functions read all-ones at any offset and size, and swallow writes.
        assert_eq!(cfg_read(&mut p, 1, 2, 0x08, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut p, 31, 7, 0x3c, 1), 0xff);
        cfg_write(&mut p, 9, 0, 0x04, 2, 0x7);
        assert_eq!(cfg_read(&mut p, 9, 0, 0x04, 2), 0xffff);
        assert_eq!(cfg_read(&mut p, 1, 1, 0x08, 4), 0x0101_8000);
    }

    #[test]
    fn io_bar_sizing() {
        let mut p = std_bus();
        let (orig, mask) = size_bar(&mut p, 2, 0, 0x10);
        assert_eq!(orig, 0xc001);
        assert_eq!(mask, 0xffff_ffe1);
        assert_eq!(!(mask & !0x3) + 1, 0x20);
        // IDE bus-master BAR4: 16 bytes.
        let (orig, mask) = size_bar(&mut p, 1, 1, 0x20);
        assert_eq!((orig, mask), (0xc041, 0xffff_fff1));
        // Assign a new address; the low bits stay.
        cfg_write(&mut p, 2, 0, 0x10, 4, 0xd020);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x10, 4), 0xd021);
        assert_eq!(p.function(2, 0).unwrap().bar_address(0), Some(0xd020));
        cfg_write(&mut p, 2, 0, 0x10, 4, 0xd03f);
        assert_eq!(
            cfg_read(&mut p, 2, 0, 0x10, 4),
            0xd021,
            "aligned to the size"
        );
    }

    #[test]
    fn mem32_bar_sizing() {
        let mut p = std_bus();
        let (orig, mask) = size_bar(&mut p, 2, 0, 0x14);
        assert_eq!(orig, 0xfebf_0000);
        assert_eq!(mask, 0xffff_f000);
        assert_eq!(!(mask & !0xf) + 1, 0x1000);
        // Unused BARs read 0 and stay 0.
        let (orig, mask) = size_bar(&mut p, 2, 0, 0x18);
        assert_eq!((orig, mask), (0, 0));
        // Byte-wise write of a BAR goes through the mask byte by byte.
        cfg_write(&mut p, 2, 0, 0x17, 1, 0xfd);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x14, 4), 0xfdbf_0000);
        // Expansion ROM BAR absent: reads 0 after sizing.
        let (_, mask) = size_bar(&mut p, 2, 0, 0x30);
        assert_eq!(mask, 0);
    }

    #[test]
    fn mem64_prefetchable_bar_pair_sizing() {
        let mut p = std_bus();
        let (lo, lo_mask) = size_bar(&mut p, 3, 0, 0x10);
        let (hi, hi_mask) = size_bar(&mut p, 3, 0, 0x14);
        assert_eq!(lo, 0xe000_000c);
        assert_eq!(hi, 0);
        assert_eq!(lo_mask, 0xfff0_000c, "64-bit prefetchable type bits kept");
        assert_eq!(hi_mask, 0xffff_ffff);
        // Linux's 64-bit size computation.
        let mask64 = (hi_mask as u64) << 32 | (lo_mask & !0xf) as u64;
        assert_eq!(!mask64 + 1, 0x10_0000);
        // Place it above 4 GiB.
        cfg_write(&mut p, 3, 0, 0x14, 4, 0x0000_0008);
        cfg_write(&mut p, 3, 0, 0x10, 4, 0x4010_0000);
        let f = p.function(3, 0).unwrap();
        assert_eq!(f.bar_address(0), Some(0x8_4010_0000));
        assert_eq!(f.bar_info(0).unwrap().size(), 0x10_0000);
        assert_eq!(f.bar_info(1), None);
    }

    #[test]
    fn read_only_fields_and_writable_registers() {
        let mut p = std_bus();
        cfg_write(&mut p, 2, 0, 0x00, 4, 0xdead_beef);
        cfg_write(&mut p, 2, 0, 0x08, 4, 0xffff_ffff);
        cfg_write(&mut p, 2, 0, 0x2c, 4, 0);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x00, 4), 0x00f0_1b36);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x08, 4), 0x0200_0000);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x2c, 4), 0x1100_1af4);
        // Command register: implemented bits only; status untouched.
        assert_eq!(cfg_read(&mut p, 2, 0, 0x04, 2), 0x0003);
        cfg_write(&mut p, 2, 0, 0x04, 4, 0xffff_ffff);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x04, 4), 0x0000_0547);
        cfg_write(&mut p, 2, 0, 0x04, 2, 0x0004);
        assert_eq!(p.function(2, 0).unwrap().command(), 0x0004);
        // Interrupt line writable, pin not.
        cfg_write(&mut p, 2, 0, 0x3c, 2, 0x0405);
        assert_eq!(cfg_read(&mut p, 2, 0, 0x3c, 2), 0x0105);
        // Header type (and its multi-function bit) is read-only.
        cfg_write(&mut p, 1, 0, 0x0c, 4, 0xffff_ffff);
        assert_eq!(cfg_read(&mut p, 1, 0, 0x0c, 4), 0x0080_ffff);
    }

    #[test]
    fn builder_normalises_bars() {
        let f = PciFunction::new(1, 2, 0xff, 0, 0)
            .bar(
                2,
                Bar::Io {
                    size: 3,
                    addr: 0x1237,
                },
            )
            .bar(
                3,
                Bar::Mem32 {
                    size: 0x1800,
                    addr: 0x1234_5678,
                    prefetchable: true,
                },
            )
            .bar(
                4,
                Bar::Mem64 {
                    size: 0,
                    addr: u64::MAX,
                    prefetchable: false,
                },
            );
        assert_eq!(f.read_dword(0x18), 0x1235);
        assert_eq!(f.read_dword(0x1c), 0x1234_4008);
        assert_eq!(f.bar_address(3), Some(0x1234_4000));
        assert_eq!(f.bar_info(3).unwrap().size(), 0x2000);
        assert_eq!(f.bar_address(4), Some(0xffff_ffff_ffff_fff0));
        let mut bus = PciBus::new(PciConfig::new().with(5, 0, f));
        assert_eq!(
            cfg_read(&mut bus, 0, 0, 0, 4),
            0xffff_ffff,
            "no host bridge"
        );
        assert_eq!(cfg_read(&mut bus, 5, 0, 0, 4), 0x0002_0001);
        let (_, m) = size_bar(&mut bus, 5, 0, 0x20);
        assert_eq!(m, 0xffff_fff4);
    }

    #[test]
    #[should_panic(expected = "BAR index")]
    fn builder_refuses_a_64_bit_bar_at_index_5() {
        let _ = PciFunction::new(1, 2, 0, 0, 0).bar(
            5,
            Bar::Mem64 {
                size: 16,
                addr: 0,
                prefetchable: false,
            },
        );
    }
}
