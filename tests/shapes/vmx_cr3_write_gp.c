#include "rt.h"
/* MOV to CR3 with a bit at or above MAXPHYADDR (CPUID 0x80000008) raises #GP in
 * 64-bit mode and changes nothing. A hypervisor that installs it makes the next VM
 * entry fail. The #GP handler counts the fault and skips the 3-byte MOV. */
#define GP_SKIP_BYTES 3
#include "gp_skip.h"

static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %%rax, %%cr3" : : "a"(v) : "memory"); }

int main(void) {
    install_idt();
    u64 cr3 = read_cr3(), before;
    u32 r[4];
    cpuid(0x80000008, 0, r);
    u32 maxphyaddr = r[0] & 0xff;
    for (u32 bit = maxphyaddr; bit < maxphyaddr + 3 && bit < 63; bit++) {
        before = gp_count;
        write_cr3(cr3 | (1ull << bit));
        report("cr3_above_maxphyaddr_gp", gp_count - before);
        report("cr3_kept", read_cr3() == cr3);
    }
    write_cr3(cr3); /* allowed: same tables */
    report("gp_total", gp_count);
    return 0;
}
