#include "rt.h"
/* MOV to and from CR8 next to port I/O, in a loop that clusters: a value the
 * engine writes inside a cluster must be the one native code reads afterwards,
 * and a value native code writes must be the one a cluster reads. A LOCK-prefixed
 * add (which the engine leaves to the CPU) ends each cluster before the native
 * part. */
static inline void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" : : "r"(v) : "memory"); }
static inline u64 read_cr8(void) { u64 v; __asm__ volatile("mov %%cr8, %0" : "=r"(v) : : "memory"); return v; }
static inline void barrier_native(u32 *p) { __asm__ volatile("lock addl $1, %0" : "+m"(*p) : : "memory"); }

int main(void) {
    static u32 ticks;
    u64 in_cluster[7], native[7], after_native[7];
    for (u64 i = 1; i <= 6; i++) {
        u8 lsr = inb(COM1 + 5);
        write_cr8(i);
        outb(COM1 + 7, lsr);
        in_cluster[i] = read_cr8();
        barrier_native(&ticks);
        native[i] = read_cr8();
        write_cr8(7 - i);
        barrier_native(&ticks);
        outb(COM1 + 7, (u8)i);
        after_native[i] = read_cr8();
        outb(COM1 + 7, (u8)after_native[i]);
    }
    write_cr8(0);
    for (int i = 1; i <= 6; i++) {
        report("in_cluster", in_cluster[i]);
        report("native", native[i]);
        report("after_native", after_native[i]);
    }
    report("ticks", ticks);
    return 0;
}
