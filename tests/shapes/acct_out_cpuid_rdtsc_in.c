#include "rt.h"
/* A loop of `out; cpuid; rdtsc; in`. On KVM here only the OUT and the IN reach
 * avex (KVM runs CPUID and RDTSC in the kernel), so a clustered run avoids at most
 * 2 exits a round, not 4: the accounting regression case (tests/acct.rs). */
#define ROUNDS 200
int main(void) {
    u64 sum = 0;
    for (u32 round = 0; round < ROUNDS; round++) {
        u32 a = 0, b, c = 0, d;
        u8 v;
        __asm__ volatile("mov %[port], %%dx\n\t"
                         "out %%al, (%%dx)\n\t"
                         "cpuid\n\t"
                         "rdtsc\n\t"
                         "mov %[port], %%dx\n\t"
                         "in (%%dx), %%al\n\t"
                         "mov %%al, %[v]"
                         : "+a"(a), "=b"(b), "+c"(c), "=d"(d), [v] "=m"(v)
                         : [port] "i"(COM1 + 7)
                         : "memory");
        (void)b;
        sum = sum * 31 + v + round;
    }
    report("rounds", ROUNDS);
    report("scratch", sum);
    return 0;
}
