//! isa-debug-exit convention: a write of byte V to the port (0xf4 by default)
//! asks the backend to end the run with status V.
//!
//! The first write wins: it ends the run, so a later write (the backend had not
//! stopped yet) cannot change the recorded status. Wider writes record their low
//! byte. Reads return all-ones, as from an empty ISA slot.
//!
//! Also here: [`PostCode`], the POST code port 0x80.

use super::device::PortDevice;

#[derive(Clone, Debug)]
pub struct DebugExit {
    port: u16,
    status: Option<u8>,
    writes: u64,
}

impl DebugExit {
    pub fn new(port: u16) -> Self {
        DebugExit {
            port,
            status: None,
            writes: 0,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The status of the first write, once the guest made one.
    pub fn exit_status(&self) -> Option<u8> {
        self.status
    }

    /// Writes seen in total.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Forget the recorded status (for a backend that reuses the device).
    pub fn reset(&mut self) {
        self.status = None;
        self.writes = 0;
    }
}

impl PortDevice for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }
    fn read(&mut self, _port: u16, _size: u8, _now_ns: u64) -> u32 {
        0xffff_ffff
    }
    fn write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64) {
        if port == self.port {
            self.writes += 1;
            self.status.get_or_insert(value as u8);
        }
    }
    fn wide(&self) -> bool {
        true
    }
}

/// The POST code port (0x80): firmware writes progress codes there and Linux's
/// `outb_p` writes there as an I/O delay. Writes are recorded, reads return
/// all-ones.
#[derive(Clone, Debug, Default)]
pub struct PostCode {
    last: Option<u8>,
    writes: u64,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }
    /// The last code written.
    pub fn last(&self) -> Option<u8> {
        self.last
    }
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl PortDevice for PostCode {
    fn name(&self) -> &'static str {
        "post-code"
    }
    fn read(&mut self, _port: u16, _size: u8, _now_ns: u64) -> u32 {
        0xffff_ffff
    }
    fn write(&mut self, _port: u16, _size: u8, value: u32, _now_ns: u64) {
        self.writes += 1;
        self.last = Some(value as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{PortBus, PortRange};

    #[test]
    fn first_write_records_the_status() {
        let mut d = DebugExit::new(0xf4);
        assert_eq!(d.exit_status(), None);
        d.write(0xf4, 1, 0x00, 0);
        assert_eq!(d.exit_status(), Some(0));
        d.write(0xf4, 1, 0x07, 0);
        assert_eq!(d.exit_status(), Some(0), "first write wins");
        assert_eq!(d.writes(), 2);
        d.reset();
        assert_eq!(d.exit_status(), None);
        assert_eq!(d.read(0xf4, 1, 0), 0xffff_ffff);
    }

    #[test]
    fn wide_writes_record_the_low_byte_through_the_bus() {
        let mut bus = PortBus::new();
        bus.register(&[PortRange::new(0x501, 1)], DebugExit::new(0x501))
            .unwrap();
        bus.write(0x501, 4, 0x1234_56a5, 0);
        assert_eq!(bus.exit_status(), Some(0xa5));
        assert_eq!(bus.read(0x501, 2, 0), 0xffff);
        assert_eq!(bus.unclaimed_count(), 0);
    }

    #[test]
    fn post_code_keeps_the_last_write() {
        let mut p = PostCode::new();
        assert_eq!(p.last(), None);
        p.write(0x80, 1, 0x12, 0);
        p.write(0x80, 1, 0x34, 0);
        assert_eq!((p.last(), p.writes()), (Some(0x34), 2));
        assert_eq!(p.read(0x80, 1, 0), 0xffff_ffff);
    }
}
