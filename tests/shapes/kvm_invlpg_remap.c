#include "rt.h"
/* A page remapped and invalidated with INVLPG next to port I/O (so inside
 * clusters), then read through its virtual address: every read must see the page
 * the PTE names now. The engine's INVLPG must reach the vCPU's TLB (on KVM: a
 * flush KVM performs before the guest runs again). */
#define VA 0x0000008000000000ull /* PML4 slot 1: unused by the boot ABI's map */

static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[512] __attribute__((aligned(4096)));
static volatile u64 pt[512] __attribute__((aligned(4096)));
static u64 pages[2][512] __attribute__((aligned(4096)));

static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }
static inline u64 read_cr3(void) {
    u64 v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

int main(void) {
    u64 *pml4 = (u64 *)(read_cr3() & ~0xfffull);
    volatile u64 *va = (volatile u64 *)VA;
    u64 sum = 0;
    outb(COM1 + 3, 0x03);
    if (pml4[1] & 1) {
        report("pml4_slot_1_in_use", pml4[1]);
        return 1;
    }
    pages[0][0] = 0x1111;
    pages[1][0] = 0x2222;
    pd[0] = (u64)pt | 3;
    pdpt[0] = (u64)pd | 3;
    pml4[1] = (u64)pdpt | 3;
    pt[0] = (u64)pages[0] | 3;
    sum = *va;
    for (int round = 1; round <= 8; round++) {
        u8 lcr = inb(COM1 + 3);
        pt[0] = (u64)pages[round & 1] | 3;
        invlpg(VA);
        outb(COM1 + 7, lcr);
        sum = sum * 31 + *va;
        (void)inb(COM1 + 7);
    }
    report("sum", sum);
    report("last", *va);
    pml4[1] = 0;
    invlpg(VA);
    return 0;
}
