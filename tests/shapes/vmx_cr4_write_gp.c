#include "rt.h"
/* MOV to CR4 with a bit the vCPU does not support (VMXE: its CPUID reports no
 * VMX; bit 15: reserved) raises #GP on the CPU and changes nothing. A hypervisor
 * that installs such a value makes the next VM entry fail (or hands the guest
 * VMX). The #GP handler counts the fault and skips the 3-byte MOV. */
#define GP_SKIP_BYTES 3
#include "gp_skip.h"

static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %%rax, %%cr4" : : "a"(v) : "memory"); }

int main(void) {
    install_idt();
    u64 cr4 = read_cr4(), before;

    before = gp_count;
    write_cr4(cr4 | (1 << 13)); /* VMXE */
    report("cr4_vmxe_gp", gp_count - before);
    report("cr4_kept", read_cr4() == cr4);

    before = gp_count;
    write_cr4(cr4 | (1 << 15)); /* reserved */
    report("cr4_bit15_gp", gp_count - before);
    report("cr4_kept", read_cr4() == cr4);

    write_cr4(cr4); /* allowed: unchanged */
    report("gp_total", gp_count);
    return 0;
}
