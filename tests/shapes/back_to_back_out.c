#include "rt.h"
/* Two identical port writes back to back, and Linux's slow-I/O delay (four
 * `out %al,$0x80`), each after an IN so a cluster can start there: on a host
 * where an OUT has completed when it reaches user space, a backend that finds the
 * exiting instruction by matching bytes at RIP takes the next, identical OUT. */
int main(void) {
    u64 sum = 0;
    outb(COM1 + 3, 0x03);
    for (int round = 0; round < 8; round++) {
        u8 lcr = inb(COM1 + 3);
        __asm__ volatile("mov %0, %%dx\n\tout %%al, (%%dx)\n\tout %%al, (%%dx)"
                         : : "i"(COM1 + 7), "a"((u8)(0x40 + round)) : "dx");
        __asm__ volatile("out %%al, $0x80\n\tout %%al, $0x80\n\tout %%al, $0x80\n\tout %%al, $0x80"
                         : : "a"(lcr));
        sum = sum * 31 + inb(COM1 + 7) + lcr;
    }
    report("scratch", sum);
    return 0;
}
