#include "rt.h"
/* Linux's per-CPU accesses right after an exiting instruction (sched_clock:
 * RDTSC, then `incl %gs:disp(%rip)` on the preempt count): a cluster that starts
 * at the RDTSC must address gs base + RIP-relative displacement, from the RIP of
 * the instruction after it. */
static volatile u64 decoy[4];
static volatile u64 target[4];

int main(void) {
    u64 gs = (u64)target - (u64)decoy;
    wrmsr(0xc0000101, gs); /* GS base */
    for (int i = 0; i < 5; i++) {
        u32 lo, hi, seen;
        __asm__ volatile("rdtsc\n\t"
                         "incl %%gs:decoy(%%rip)\n\t"
                         "movl %%gs:decoy(%%rip), %2\n\t"
                         : "=a"(lo), "=d"(hi), "=r"(seen)
                         :
                         : "memory");
        report("seen", seen);
    }
    report("target", target[0]);
    report("decoy", decoy[0]);
    wrmsr(0xc0000101, 0);
    return 0;
}
