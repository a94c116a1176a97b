#include "rt.h"
/* An `in (%dx),%al` immediately followed by a single `insb` on the same port, the
 * INSB reached by a jump: a single INSB exits with count 1 as an IN does, and a
 * backend that finds the exiting instruction by matching the bytes before RIP
 * takes the IN; the instructions after the INSB then run twice. */
static u8 buf[16];

int main(void) {
    u64 sum = 0, after = 0;
    outb(COM1 + 3, 0x03);
    for (int round = 0; round < 8; round++) {
        outb(COM1 + 7, (u8)(0x30 + round));
        u8 *dst = buf + round;
        u32 al = 0;
        __asm__ volatile("jmp 2f\n\t"
                         "1: in (%%dx), %%al\n\t"
                         "2: insb\n\t"
                         "inc %[after]\n\t"
                         "in (%%dx), %%al"
                         : "+D"(dst), [after] "+r"(after), "+a"(al)
                         : "d"((u16)(COM1 + 7))
                         : "memory");
        sum = sum * 31 + buf[round] + (al & 0xff) + (u64)(dst - buf);
    }
    report("after", after);
    report("sum", sum);
    return 0;
}
