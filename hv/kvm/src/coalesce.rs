//! Coalesced port I/O (`KVM_CAP_COALESCED_PIO`): KVM keeps guest writes to a few
//! ports in a ring (the page at `KVM_COALESCED_MMIO_PAGE_OFFSET` of the vCPU
//! mmap) instead of exiting to user space for each; the backend applies them to
//! the device models, in order, before it handles the next exit to user space
//! and at the end of the run.
//!
//! A port may be coalesced only if a write to it has no effect the guest can
//! observe before its next exit to user space: the device model must raise no
//! interrupt, change no state the guest reads without exiting, and produce no
//! output because of it. Every later access to the same device is an exit (a
//! read of a data port, a write elsewhere), and the ring is drained before that
//! exit is handled, so the device sees the same writes in the same order.
//!
//! KVM takes a write into the ring only when it lies wholly inside a zone
//! (`coalesced_mmio_in_range`): a wider write that reaches past a zone (an `outw`
//! to 0x70 that also writes 0x71) still exits as before.
//!
//! Measured here: a coalesced write is not in KVM's `exits` on this host, whose
//! KVM runs the OUT in its emulator and fills the ring without a VM exit (rtc in
//! off: `exits` 824 -> 505 with 321 writes coalesced). On hardware KVM the OUT is
//! still a VM exit (`handle_io` counts it in `exits` and `io_exits`); only the
//! trip to user space is saved.

use avex_core::exit::Exit;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};

use crate::Vm;

/// A coalesced port range: first port, length in bytes, and why it is safe.
pub struct Zone {
    pub port: u16,
    pub len: u32,
    pub device: &'static str,
}

/// The coalesced zones. Why each is safe (see hv/core/src/devices for what each
/// device does on a write):
pub const ZONES: &[Zone] = &[
    // RTC/CMOS index (rtc.rs): a write only latches the register index and the
    // NMI-disable bit. The index is used at the next access to the data port 0x71,
    // which is not coalesced (an exit, before which the ring is drained); no NMI is
    // ever delivered to this vCPU (no interrupt controller is wired to it). 0x71 is
    // left out: a data write changes the clock, alarms, periodic rate and the
    // interrupt line.
    Zone {
        port: 0x70,
        len: 1,
        device: "rtc index",
    },
    // PCI CONFIG_ADDRESS (pci.rs): a 4-byte write only latches the address that
    // the next access to CONFIG_DATA 0xcfc..0xcff uses, and those are not
    // coalesced. The zone is 0xcf8..0xcfb because a 4-byte write must lie inside
    // it; the byte writes it also takes are ignored by the model (0xcf8, 0xcfa,
    // 0xcfb) or set the reset control register 0xcf9, whose reset request nothing
    // acts on (no backend resets the guest); a later read of 0xcf9 is an exit.
    Zone {
        port: 0xcf8,
        len: 4,
        device: "pci config address",
    },
    // POST code (debug_exit.rs `PostCode`): the write is recorded for the host and
    // nothing else; Linux's `outb_p` writes it as an I/O delay. Reads are an exit.
    Zone {
        port: 0x80,
        len: 1,
        device: "post code",
    },
];

/// Whether writes are coalesced in a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coalescing {
    /// Not asked for.
    Off,
    /// The [`ZONES`] are registered and the ring mapped.
    On,
    /// Asked for, but the host refused (the reason): every write exits.
    Unsupported(String),
}

/// Register the [`ZONES`] on `vm`; the ring is mapped on the vCPU by [`map_ring`].
pub(crate) fn register(kvm: &Kvm, vm: &VmFd) -> Coalescing {
    if !kvm.check_extension(Cap::CoalescedPio) {
        return Coalescing::Unsupported("the host lacks KVM_CAP_COALESCED_PIO".into());
    }
    for z in ZONES {
        if let Err(e) = vm.register_coalesced_mmio(IoEventAddress::Pio(u64::from(z.port)), z.len) {
            return Coalescing::Unsupported(format!(
                "KVM_REGISTER_COALESCED_MMIO (pio {:#x}, {}): {e}",
                z.port, z.device
            ));
        }
    }
    Coalescing::On
}

/// Map the vCPU's ring (after [`register`] said [`Coalescing::On`]).
pub(crate) fn map_ring(vcpu: &mut kvm_ioctls::VcpuFd, c: Coalescing) -> Coalescing {
    match c {
        Coalescing::On => match vcpu.map_coalesced_mmio_ring() {
            Ok(()) => Coalescing::On,
            Err(e) => Coalescing::Unsupported(format!("mapping the coalesced ring: {e}")),
        },
        other => other,
    }
}

impl Vm {
    /// Apply every write KVM holds in the ring to the device models, oldest first,
    /// through the exit handler's own device path; counted as coalesced writes, not
    /// exits.
    pub(crate) fn drain_coalesced(&mut self) {
        if self.coalescing != Coalescing::On {
            return;
        }
        // The vCPU is not in KVM_RUN (one vCPU, run on this thread): the ring
        // cannot change under us.
        while let Ok(Some(e)) = self.guest.vcpu.coalesced_mmio_read() {
            let size = e.len.min(4) as u8;
            let mut v = [0u8; 4];
            v[..size as usize].copy_from_slice(&e.data[..size as usize]);
            let exit = Exit::PortIo {
                port: e.phys_addr as u16,
                size,
                write: true,
                value: u32::from_le_bytes(v),
            };
            self.handler.perform_coalesced(&exit, &mut self.guest);
        }
    }
}
