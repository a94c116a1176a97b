#include "rt.h"
/* The guest remaps 2 MiB pages of its boot identity map, then flushes them with
 * INVLPG next to port I/O (which a cluster runs in the engine; a global page, so
 * only INVLPG or a full flush drops it) or with MOV CR3 (which exits and the
 * hypervisor completes through the engine), and reads the page natively. With
 * VPID the CPU keeps the guest's TLB entries across VM exits and entries, so the
 * hypervisor must flush them itself when the engine runs the INVLPG or the MOV
 * CR3; otherwise the read sees the old page. A LOCK-prefixed add (which the engine
 * leaves to the CPU) ends each cluster before the native read. */
#define VA_INVLPG 0x800000ull /* PDE 4 of the first PD: a global page */
#define VA_CR3 0xc00000ull    /* PDE 6: not global (MOV CR3 keeps global pages) */
#define PA_X 0x800000ull      /* holds 'X' */
#define PA_Y 0xa00000ull      /* holds 'Y' */
#define PDE_2M 0x83ull        /* present, writable, 2 MiB */
#define PDE_GLOBAL 0x100ull

static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }
static inline void end_cluster(u32 *p) { __asm__ volatile("lock addl $1, %0" : "+m"(*p) : : "memory"); }
static inline u8 peek(u64 va) { return *(volatile u8 *)va; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }

int main(void) {
    static u32 ticks;
    u64 *pml4 = (u64 *)(read_cr3() & ~0xfffull);
    u64 *pdpt = (u64 *)(pml4[0] & 0x000ffffffffff000ull);
    u64 *pd = (u64 *)(pdpt[0] & 0x000ffffffffff000ull);
    *(volatile u8 *)PA_Y = 'Y'; /* through the identity map of PA_Y */
    *(volatile u8 *)PA_X = 'X'; /* VA maps PA_X at first */
    u64 cr4 = read_cr4();
    write_cr4(cr4 | (1 << 7)); /* PGE */
    pd[VA_CR3 >> 21] = PA_X | PDE_2M;
    write_cr3(read_cr3());
    u8 seen[16];
    for (int i = 0; i < 8; i++) {
        peek(VA_INVLPG); /* the TLB holds the page VA maps now */
        pd[VA_INVLPG >> 21] = ((i & 1) ? PA_X : PA_Y) | PDE_2M | PDE_GLOBAL;
        u8 lsr = inb(COM1 + 5);
        invlpg(VA_INVLPG);
        outb(COM1 + 7, lsr);
        end_cluster(&ticks);
        seen[2 * i] = peek(VA_INVLPG);

        peek(VA_CR3);
        pd[VA_CR3 >> 21] = ((i & 1) ? PA_X : PA_Y) | PDE_2M;
        write_cr3(read_cr3());
        end_cluster(&ticks);
        seen[2 * i + 1] = peek(VA_CR3);
    }
    pd[VA_INVLPG >> 21] = PA_X | PDE_2M;
    pd[VA_CR3 >> 21] = VA_CR3 | PDE_2M;
    write_cr4(cr4); /* PGE off: flushes everything */
    for (int i = 0; i < 16; i++)
        putc_com1(seen[i]);
    puts_com1("\n");
    return 0;
}
