#include "rt.h"
/* REP OUTSB/INSB next to single IN/OUT on the same port, the buffers straddling a
 * page boundary: KVM exits once per element or per chunk (count 1 at the page
 * end), with RIP left on the REP instruction until the last one. Every exit must
 * be attributed to the string instruction, never to the IN/OUT beside it. */
static u8 buf[2][8192] __attribute__((aligned(4096)));

int main(void) {
    u64 sum = 0;
    outb(COM1 + 3, 0x03);
    for (int i = 0; i < 8192; i++)
        buf[0][i] = (u8)(i * 7 + 1);
    for (int round = 0; round < 6; round++) {
        const u8 *src = &buf[0][4096 - 3 + round];
        u8 *dst = &buf[1][4096 - 2 + round];
        u64 n = 5;
        u8 lcr = inb(COM1 + 3);
        __asm__ volatile("out %%al, (%%dx)\n\t"
                         "rep outsb\n\t"
                         "in (%%dx), %%al"
                         : "+S"(src), "+c"(n), "+a"(lcr)
                         : "d"((u16)(COM1 + 7))
                         : "memory");
        n = 3;
        __asm__ volatile("in (%%dx), %%al\n\t"
                         "rep insb\n\t"
                         "out %%al, (%%dx)"
                         : "+D"(dst), "+c"(n), "+a"(lcr)
                         : "d"((u16)(COM1 + 7))
                         : "memory");
        sum = sum * 31 + lcr + buf[1][4096 - 2 + round] + buf[1][4096 + round] + (u64)(src - &buf[0][0]) +
              (u64)(dst - &buf[1][0]);
    }
    report("sum", sum);
    return 0;
}
