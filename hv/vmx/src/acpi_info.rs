//! ACPI: find the RSDP in the BIOS areas and report the CPUs and APICs of the MADT.

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::logln;

/// Physical memory is identity-mapped (first 4 GiB), so mapping is the identity.
#[derive(Clone, Copy)]
struct Identity;

impl AcpiHandler for Identity {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // SAFETY: the boot page tables identity-map the first 4 GiB, where the BIOS
        // puts the ACPI tables; the pointer is non-null for every table address.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(physical_address as *mut T).expect("ACPI table at address 0"),
                size,
                size,
                *self,
            )
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Report the ACPI tables and the MADT's processors and APICs.
pub fn report() {
    // SAFETY: scanning the EBDA and BIOS ROM area, which are identity-mapped.
    let tables = match unsafe { AcpiTables::search_for_rsdp_bios(Identity) } {
        Ok(t) => t,
        Err(e) => {
            logln!("acpi: no usable RSDP: {e:?}");
            return;
        }
    };
    let mut sigs = alloc::string::String::new();
    for h in tables.headers() {
        sigs.push_str(h.signature.as_str());
        sigs.push(' ');
    }
    logln!("acpi: tables: {}", sigs.trim_end());
    let madt = match tables.find_table::<Madt>() {
        Ok(m) => m,
        Err(e) => {
            logln!("acpi: no MADT: {e:?}");
            return;
        }
    };
    let (mut cpus, mut ioapics) = (0, 0);
    logln!("acpi: local APIC at {:#x}", {
        madt.get().local_apic_address
    });
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(l) => {
                cpus += 1;
                logln!(
                    "acpi: cpu {} apic id {} {}",
                    l.processor_id,
                    l.apic_id,
                    if { l.flags } & 1 != 0 {
                        "enabled"
                    } else {
                        "disabled"
                    }
                );
            }
            MadtEntry::LocalX2Apic(l) => {
                cpus += 1;
                logln!("acpi: cpu uid {} x2apic id {}", { l.processor_uid }, {
                    l.x2apic_id
                });
            }
            MadtEntry::IoApic(io) => {
                ioapics += 1;
                logln!(
                    "acpi: I/O APIC id {} at {:#x}, GSI base {}",
                    io.io_apic_id,
                    { io.io_apic_address },
                    { io.global_system_interrupt_base }
                );
            }
            MadtEntry::InterruptSourceOverride(o) => {
                logln!("acpi: IRQ {} -> GSI {}", o.irq, {
                    o.global_system_interrupt
                });
            }
            _ => {}
        }
    }
    logln!("acpi: {cpus} CPU(s), {ioapics} I/O APIC(s)");
}
