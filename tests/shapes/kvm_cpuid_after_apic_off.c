#include "rt.h"
/* CPUID leaf 1 next to port I/O (so it runs inside clusters), before and after
 * the guest clears IA32_APIC_BASE.EN: EDX bit 9 (APIC) must follow the MSR, as
 * the CPU's (and KVM's) CPUID does, in every mode. */
#define IA32_APIC_BASE 0x1b

static u32 apic_bit(void) {
    u32 r[4];
    cpuid(1, 0, r);
    return (r[3] >> 9) & 1;
}

int main(void) {
    u64 seen = 0;
    outb(COM1 + 3, 0x03);
    for (int round = 0; round < 8; round++) {
        u8 lcr = inb(COM1 + 3);
        if (round == 4)
            wrmsr(IA32_APIC_BASE, rdmsr(IA32_APIC_BASE) & ~(1ull << 11));
        seen = seen * 4 + apic_bit();
        outb(COM1 + 7, lcr);
    }
    report("apic_bits", seen);
    report("apic_base_en", (rdmsr(IA32_APIC_BASE) >> 11) & 1);
    return 0;
}
