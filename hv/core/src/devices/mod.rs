//! Device models: plain state machines on a port bus.
//!
//! Every device is driven only by the accesses a backend forwards to it and by a
//! virtual time the backend passes in (`now_ns`: nanoseconds since the guest
//! started, monotonic; the KVM backend takes it from the host clock, the VT-x
//! hypervisor from the TSC). Nothing here reads a clock, so every model is
//! deterministic under test and the same code runs in both backends.
//!
//! A guest's misbehaviour (odd access sizes, unaligned or out-of-range accesses,
//! nonsense register values, time going backwards) never panics a device: the
//! access is absorbed the way hardware would absorb it (reads of nothing return
//! all-ones, writes of nothing are dropped).
//!
//! Interrupts: each device reports its line through [`PortDevice::irq`];
//! [`PortBus::update_irqs`] drives the 8259 pair with them (PIT OUT0 on IRQ0,
//! COM1 on IRQ4, RTC on IRQ8), [`PortBus::pending_vector`] and
//! [`PortBus::acknowledge`] give a backend the vector to inject, and
//! [`PortBus::next_event_ns`] when a timer will next fire (for HLT).
//!
//! ```
//! use avex_core::devices::{PortBus, StandardConfig};
//!
//! let mut bus = PortBus::standard(StandardConfig::default());
//! // What a backend does on an OUT/IN exit: forward it with the virtual time.
//! for &b in b"ok\n" {
//!     while bus.read(0x3fd, 1, 0) & 0x20 == 0 {} // LSR.THRE
//!     bus.write(0x3f8, 1, b as u32, 0);
//! }
//! bus.write(0xf4, 1, 0, 1_000);
//! assert_eq!(bus.take_console_output(), b"ok\n");
//! assert_eq!(bus.exit_status(), Some(0));
//! ```
//!
//! - [`device`]: what a device is to the bus ([`PortDevice`], [`InterruptController`]).
//! - [`bus`]: [`PortBus`], dispatch by port range.
//! - [`board`]: the standard PC set ([`PortBus::standard`]) and typed access to it.
//! - [`uart`]: 16550A UART.
//! - [`pit`]: 8254 PIT and system control port B (0x61).
//! - [`pic`]: the cascaded 8259A pair.
//! - [`rtc`]: MC146818 RTC and CMOS RAM.
//! - [`pci`]: PCI configuration mechanism #1 and configurable type-0 functions.
//! - [`debug_exit`]: isa-debug-exit style port, and the POST code port 0x80.

pub mod board;
pub mod bus;
pub mod debug_exit;
pub mod device;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod uart;

pub use board::StandardConfig;
pub use bus::{BusError, DeviceId, PortBus};
pub use debug_exit::{DebugExit, PostCode};
pub use device::{InterruptController, IrqOutput, PortDevice, PortRange};
pub use pci::{Bar, PciBus, PciConfig, PciFunction};
pub use pic::Pic;
pub use pit::Pit;
pub use rtc::{DateTime, Rtc, RtcConfig};
pub use uart::Uart;
