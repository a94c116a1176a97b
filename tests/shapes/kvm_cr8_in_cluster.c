#include "rt.h"
/* MOV to CR8 next to port I/O, so that it runs inside a cluster: the value must
 * reach the vCPU (on KVM, kvm_run's cr8 is loaded into the vCPU at every KVM_RUN
 * when there is no in-kernel APIC), and reads of CR8 after the cluster, native or
 * not, must see it. */
static inline u64 read_cr8(void) {
    u64 v;
    __asm__ volatile("mov %%cr8, %0" : "=r"(v));
    return v;
}
static inline void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" : : "r"(v) : "memory"); }

int main(void) {
    u64 seen = 0, after = 0;
    outb(COM1 + 3, 0x03);
    for (u64 v = 1; v <= 6; v++) {
        u8 lcr = inb(COM1 + 3);
        write_cr8(v);
        outb(COM1 + 7, lcr);
        seen = seen * 16 + read_cr8();
        (void)inb(COM1 + 7);
    }
    after = read_cr8();
    report("seen", seen);
    report("after", after);
    report("at_report", read_cr8());
    write_cr8(0);
    return 0;
}
