#include "rt.h"
/* WRMSR of a non-canonical address to the MSRs that hold linear addresses
 * (FS/GS base, kernel GS base, LSTAR, SYSENTER ESP/EIP) raises #GP on the CPU and
 * leaves the MSR unchanged. A hypervisor that installs the value instead makes the
 * next VM entry fail. The guest installs an IDT whose #GP handler counts the fault
 * and skips the 2-byte WRMSR, as a kernel's wrmsr_safe does. */
#define GP_SKIP_BYTES 2
#include "gp_skip.h"

static const u32 msrs[] = {0xc0000100, 0xc0000101, 0xc0000102, 0xc0000082, 0x175, 0x176};

int main(void) {
    install_idt();
    for (unsigned i = 0; i < sizeof msrs / sizeof msrs[0]; i++) {
        u32 m = msrs[i];
        u64 good = 0xffff800000001000ull + 0x1000 * i;
        wrmsr(m, good);
        u64 before = gp_count;
        wrmsr(m, 0x0000800000000000ull + i); /* not canonical */
        report("msr", m);
        report("gp", gp_count - before);
        report("kept", rdmsr(m) == good);
        wrmsr(m, 0);
    }
    report("gp_total", gp_count);
    return 0;
}
