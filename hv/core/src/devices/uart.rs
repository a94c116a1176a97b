//! 16550A UART.
//!
//! Transmission is instantaneous: a byte written to THR is appended to an output
//! buffer the backend drains with [`Uart::take_output`], and LSR always shows THRE
//! and TEMT. Nothing the guest transmits is ever dropped. Received bytes are
//! queued with [`Uart::enqueue_input`] and read from RBR; the queue is unbounded,
//! so there are no overruns. In loopback mode (MCR bit 4) transmitted bytes go to
//! the receive queue instead and the modem status inputs follow MCR's outputs.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::device::{IrqOutput, PortDevice};

// Register offsets.
const DATA: u16 = 0; // RBR / THR, DLL with DLAB
const IER: u16 = 1; // IER, DLM with DLAB
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;

const IIR_NONE: u8 = 0x01;
const IIR_MS: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_FIFO: u8 = 0xc0;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The UART's input clock divided by 16: the baud rate at divisor 1.
pub const BASE_BAUD: u32 = 115_200;

/// A 16550A at `base..base + 8`.
#[derive(Clone, Debug)]
pub struct Uart {
    base: u16,
    irq: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// Line status error bits (OE/PE/FE/BI) latched until LSR is read.
    lsr_errors: u8,
    /// MSR delta bits (0..=3); the status bits are computed.
    msr_delta: u8,
    /// Modem status inputs when not in loopback (CTS, DSR, RI, DCD in MSR bits 4..7).
    modem_inputs: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    /// THR-empty interrupt latched (set when THR becomes empty or IER.THRE is
    /// enabled, cleared by reading IIR while it is the source or writing THR).
    thre_pending: bool,
    input: VecDeque<u8>,
    output: Vec<u8>,
    transmitted: u64,
}

impl Uart {
    /// A UART at `base` (0x3f8 for COM1) on interrupt line `irq` (4 for COM1), in
    /// its reset state, with a connected terminal (DCD, DSR, CTS asserted).
    pub fn new(base: u16, irq: u8) -> Self {
        Uart {
            base,
            irq,
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr_delta: 0,
            modem_inputs: MSR_DCD | MSR_DSR | MSR_CTS,
            scr: 0,
            dll: 0x0c, // 9600 baud, as after a typical BIOS
            dlm: 0,
            fcr: 0,
            thre_pending: false,
            input: VecDeque::new(),
            output: Vec::new(),
            transmitted: 0,
        }
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    /// Drain every byte transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.output)
    }

    /// Bytes transmitted and not yet drained.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Total bytes ever transmitted (drained or not).
    pub fn transmitted(&self) -> u64 {
        self.transmitted
    }

    /// Queue bytes for the guest to receive.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        self.input.extend(bytes.iter().copied());
    }

    /// Bytes queued for the guest and not yet read.
    pub fn input_len(&self) -> usize {
        self.input.len()
    }

    /// The divisor latch (DLM:DLL).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// The programmed baud rate (0 if the divisor is 0).
    pub fn baud(&self) -> u32 {
        match self.divisor() {
            0 => 0,
            d => BASE_BAUD / d as u32,
        }
    }

    pub fn lcr(&self) -> u8 {
        self.lcr
    }
    pub fn mcr(&self) -> u8 {
        self.mcr
    }
    pub fn ier(&self) -> u8 {
        self.ier
    }

    /// Set the modem status inputs (MSR bits 4..7: CTS, DSR, RI, DCD) as a host
    /// terminal would drive them; changes set the delta bits.
    pub fn set_modem_inputs(&mut self, msr_high: u8) {
        let old = self.modem_inputs;
        let new = msr_high & 0xf0;
        self.msr_delta |= delta_bits(old, new);
        self.modem_inputs = new;
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// The modem status inputs the chip sees now (MSR bits 4..7).
    fn msr_inputs(&self) -> u8 {
        if self.loopback() {
            let m = self.mcr;
            let mut v = 0;
            if m & MCR_RTS != 0 {
                v |= MSR_CTS;
            }
            if m & MCR_DTR != 0 {
                v |= MSR_DSR;
            }
            if m & MCR_OUT1 != 0 {
                v |= MSR_RI;
            }
            if m & MCR_OUT2 != 0 {
                v |= MSR_DCD;
            }
            v
        } else {
            self.modem_inputs
        }
    }

    fn lsr(&self) -> u8 {
        let mut v = LSR_THRE | LSR_TEMT | self.lsr_errors;
        if !self.input.is_empty() {
            v |= LSR_DR;
        }
        v
    }

    /// The interrupt identification (IIR low nibble) by priority.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RLS != 0 && self.lsr_errors & (LSR_OE | 0x0c | LSR_BI) != 0 {
            IIR_RLS
        } else if self.ier & IER_RDA != 0 && !self.input.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else if self.ier & IER_MS != 0 && self.msr_delta != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & 1 != 0
    }

    /// The UART's INTR output, as gated onto the PC's IRQ line by OUT2 (and cut
    /// off in loopback mode).
    pub fn irq_pending(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && !self.loopback() && self.interrupt_id() != IIR_NONE
    }

    /// The interrupt line this UART drives.
    pub fn irq_line(&self) -> u8 {
        self.irq
    }

    fn transmit(&mut self, byte: u8) {
        if self.loopback() {
            self.input.push_back(byte);
        } else {
            self.output.push(byte);
            self.transmitted += 1;
        }
        // The byte leaves THR at once: THR is empty again.
        self.thre_pending = true;
    }

    /// Register read at `offset` (0..=7).
    pub fn read_reg(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.dll,
            DATA => self.input.pop_front().unwrap_or(0),
            IER if dlab => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                if id == IIR_THRE {
                    self.thre_pending = false;
                }
                let fifo = if self.fifo_enabled() { IIR_FIFO } else { 0 };
                id | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let v = self.lsr();
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.msr_inputs() | self.msr_delta;
                self.msr_delta = 0;
                v
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    /// Register write at `offset` (0..=7).
    pub fn write_reg(&mut self, offset: u16, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.dll = value,
            DATA => self.transmit(value),
            IER if dlab => self.dlm = value,
            IER => {
                let old = self.ier;
                self.ier = value & 0x0f;
                // Enabling the THRE interrupt while THR is empty raises it at once.
                if old & IER_THRE == 0 && self.ier & IER_THRE != 0 {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => {
                if value & 0x02 != 0 {
                    self.input.clear();
                }
                // Bit 2 clears the transmit FIFO: it is always empty here.
                self.fcr = value & 0xc9;
            }
            LCR => self.lcr = value,
            MCR => {
                let old_inputs = self.msr_inputs();
                self.mcr = value & 0x1f;
                let new_inputs = self.msr_inputs();
                self.msr_delta |= delta_bits(old_inputs, new_inputs);
            }
            LSR | MSR => {} // read-only (factory test writes ignored)
            SCR => self.scr = value,
            _ => {}
        }
    }
}

/// MSR delta bits for a change of the inputs from `old` to `new` (bits 4..7).
fn delta_bits(old: u8, new: u8) -> u8 {
    let changed = old ^ new;
    let mut d = 0;
    if changed & MSR_CTS != 0 {
        d |= MSR_DCTS;
    }
    if changed & MSR_DSR != 0 {
        d |= MSR_DDSR;
    }
    // TERI: RI went from on to off.
    if old & MSR_RI != 0 && new & MSR_RI == 0 {
        d |= MSR_TERI;
    }
    if changed & MSR_DCD != 0 {
        d |= MSR_DDCD;
    }
    d
}

impl PortDevice for Uart {
    fn name(&self) -> &'static str {
        "uart16550"
    }
    fn read(&mut self, port: u16, _size: u8, _now_ns: u64) -> u32 {
        match port.checked_sub(self.base) {
            Some(off) if off < 8 => self.read_reg(off) as u32,
            _ => 0xff,
        }
    }
    fn write(&mut self, port: u16, _size: u8, value: u32, _now_ns: u64) {
        if let Some(off) = port.checked_sub(self.base) {
            if off < 8 {
                self.write_reg(off, value as u8);
            }
        }
    }
    fn irq(&mut self, _now_ns: u64) -> IrqOutput {
        IrqOutput::Level {
            irq: self.irq,
            high: self.irq_pending(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uart() -> Uart {
        Uart::new(0x3f8, 4)
    }

    #[test]
    fn thr_writes_go_to_output_and_are_never_lost() {
        let mut u = uart();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        for &b in &data {
            // The 8250 driver's pattern: wait for THRE, then write.
            assert_ne!(u.read(0x3fd, 1, 0) & LSR_THRE as u32, 0);
            u.write(0x3f8, 1, b as u32, 0);
        }
        assert_eq!(u.output(), &data[..]);
        assert_eq!(u.take_output(), data);
        assert!(u.take_output().is_empty());
        assert_eq!(u.transmitted(), 10_000);
        u.write(0x3f8, 1, b'x' as u32, 0);
        assert_eq!(u.take_output(), b"x");
    }

    #[test]
    fn lsr_shows_transmitter_empty_and_data_ready() {
        let mut u = uart();
        assert_eq!(u.read_reg(LSR), LSR_THRE | LSR_TEMT);
        u.write_reg(DATA, b'a');
        assert_eq!(u.read_reg(LSR), LSR_THRE | LSR_TEMT);
        u.enqueue_input(b"xy");
        assert_eq!(u.read_reg(LSR), LSR_THRE | LSR_TEMT | LSR_DR);
        assert_eq!(u.read_reg(DATA), b'x');
        assert_eq!(u.read_reg(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read_reg(DATA), b'y');
        assert_eq!(u.read_reg(LSR) & LSR_DR, 0);
        // Reading an empty RBR is harmless.
        assert_eq!(u.read_reg(DATA), 0);
        assert_eq!(u.input_len(), 0);
    }

    #[test]
    fn dlab_switches_data_and_ier_to_the_divisor_latch() {
        let mut u = uart();
        // Linux: LCR = DLAB|8N1, DLL/DLM = 1 (115200), LCR = 8N1.
        u.write_reg(LCR, 0x83);
        u.write_reg(DATA, 0x01);
        u.write_reg(IER, 0x00);
        assert_eq!(u.read_reg(DATA), 0x01);
        assert_eq!(u.read_reg(IER), 0x00);
        u.write_reg(LCR, 0x03);
        assert_eq!(u.divisor(), 1);
        assert_eq!(u.baud(), 115_200);
        assert!(u.output().is_empty(), "a DLL write is not a transmission");
        assert_eq!(u.read_reg(IER), 0);
        u.write_reg(IER, 0xff);
        assert_eq!(u.read_reg(IER), 0x0f, "only IER bits 0..3 exist");
        assert_eq!(u.read_reg(LCR), 0x03);
        u.write_reg(LCR, 0x80);
        u.write_reg(IER, 0x02);
        assert_eq!(u.divisor(), 0x0201);
        assert_eq!(u.baud(), 115_200 / 0x201);
        u.write_reg(LCR, 0);
        assert_eq!(u.read_reg(IER), 0x0f, "DLM write left IER alone");
    }

    #[test]
    fn scratch_and_fifo_detection_as_linux_autoconfig() {
        let mut u = uart();
        u.write_reg(SCR, 0xa5);
        assert_eq!(u.read_reg(SCR), 0xa5);
        u.write_reg(SCR, 0x5a);
        assert_eq!(u.read_reg(SCR), 0x5a);
        // FIFO off: IIR bits 6..7 clear.
        assert_eq!(u.read_reg(IIR_FCR), IIR_NONE);
        u.write_reg(IIR_FCR, 0x07);
        assert_eq!(u.read_reg(IIR_FCR) & 0xc0, 0xc0, "16550A reports FIFOs");
        u.enqueue_input(b"abc");
        u.write_reg(IIR_FCR, 0x03); // clear RX FIFO
        assert_eq!(u.input_len(), 0);
        assert_eq!(u.read_reg(LSR) & LSR_DR, 0);
        u.write_reg(IIR_FCR, 0);
        assert_eq!(u.read_reg(IIR_FCR) & 0xc0, 0);
    }

    #[test]
    fn loopback_routes_tx_to_rx_and_modem_lines() {
        let mut u = uart();
        // Linux's loopback test: MCR = LOOP | OUT2 | RTS, MSR & 0xf0 == 0x90.
        u.write_reg(MCR, MCR_LOOP | 0x0a);
        assert_eq!(u.read_reg(MSR) & 0xf0, 0x90);
        u.write_reg(DATA, 0x42);
        assert!(u.output().is_empty());
        assert_eq!(u.transmitted(), 0);
        assert_eq!(u.read_reg(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read_reg(DATA), 0x42);
        u.write_reg(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1);
        // DSR and RI now on, CTS and DCD off: deltas for CTS, DSR, DCD.
        let msr = u.read_reg(MSR);
        assert_eq!(msr & 0xf0, MSR_DSR | MSR_RI);
        assert_eq!(msr & 0x0f, MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert_eq!(u.read_reg(MSR) & 0x0f, 0, "reading MSR clears deltas");
        u.write_reg(MCR, MCR_LOOP);
        assert_eq!(u.read_reg(MSR) & 0x0f, MSR_DDSR | MSR_TERI);
        u.write_reg(MCR, 0);
        assert_eq!(u.read_reg(MSR) & 0xf0, MSR_DCD | MSR_DSR | MSR_CTS);
        u.write_reg(DATA, 0x43);
        assert_eq!(u.take_output(), [0x43]);
    }

    #[test]
    fn interrupt_identification_and_line() {
        let mut u = uart();
        assert_eq!(u.read_reg(IIR_FCR), IIR_NONE);
        assert!(!u.irq_pending());
        // THRE interrupt fires on enabling it, but the line needs OUT2.
        u.write_reg(IER, IER_THRE);
        assert!(!u.irq_pending());
        u.write_reg(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert!(u.irq_pending());
        assert_eq!(u.read_reg(IIR_FCR), IIR_THRE);
        // Reading IIR cleared the THRE source.
        assert!(!u.irq_pending());
        assert_eq!(u.read_reg(IIR_FCR), IIR_NONE);
        // Writing THR empties at once: THRE again.
        u.write_reg(DATA, b'z');
        assert!(u.irq_pending());
        // Received data has priority over THRE.
        u.write_reg(IER, IER_THRE | IER_RDA);
        u.enqueue_input(b"q");
        assert_eq!(u.read_reg(IIR_FCR), IIR_RDA);
        assert!(u.irq_pending(), "RDA stays until the data is read");
        assert_eq!(u.read_reg(DATA), b'q');
        assert_eq!(u.read_reg(IIR_FCR), IIR_THRE);
        assert_eq!(u.read_reg(IIR_FCR), IIR_NONE);
        // Modem status interrupt.
        u.write_reg(IER, IER_MS);
        u.set_modem_inputs(MSR_DSR | MSR_CTS);
        assert_eq!(u.read_reg(IIR_FCR), IIR_MS);
        assert_eq!(u.read_reg(MSR), MSR_DSR | MSR_CTS | MSR_DDCD);
        assert_eq!(u.read_reg(IIR_FCR), IIR_NONE);
        // Loopback disconnects the line.
        u.write_reg(IER, IER_THRE);
        u.write_reg(MCR, MCR_OUT2 | MCR_LOOP);
        u.write_reg(DATA, 0);
        assert!(!u.irq_pending());
        assert_eq!(
            u.irq(0),
            IrqOutput::Level {
                irq: 4,
                high: false
            }
        );
        u.write_reg(MCR, MCR_OUT2);
        assert_eq!(u.irq(0), IrqOutput::Level { irq: 4, high: true });
    }

    #[test]
    fn ports_outside_the_device_and_odd_values_are_harmless() {
        let mut u = Uart::new(0x2f8, 3);
        assert_eq!(u.read(0x3f8, 1, 0), 0xff);
        u.write(0x3f8, 1, 0x41, 0);
        u.write(0x2f8, 1, 0xffff_ff41, 0);
        assert_eq!(u.take_output(), b"A");
        for off in 0..8 {
            u.write(0x2f8 + off, 1, 0xff, 0);
            let _ = u.read(0x2f8 + off, 1, 0);
        }
        assert_eq!(u.read_reg(9), 0xff);
        u.write_reg(9, 1);
    }
}
