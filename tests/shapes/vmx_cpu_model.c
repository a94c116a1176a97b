#include "rt.h"
/* What a kernel asks of the virtual CPU before it trusts it (Linux does each):
 * an MSR the hypervisor does not model raises #GP on WRMSR and RDMSR (so
 * wrmsr_safe/rdmsr_safe see the failure instead of a value that was never
 * there); CPUID hides what is not virtualised (VMX, x2APIC, TSC-deadline, the
 * local APIC, XSAVE), sets the hypervisor bit, names the hypervisor in leaf
 * 0x40000000, and gives the TSC's rate as a crystal with a 1:1 ratio (leaf 0x15).
 * The #GP handler skips the 2-byte RDMSR/WRMSR. */
#define GP_SKIP_BYTES 2
#include "gp_skip.h"

/* rdmsr() has no memory clobber: read the count the handler changes afresh. */
static u64 gp_now(void) { return *(volatile u64 *)&gp_count; }

int main(void) {
    install_idt();
    u32 msr = 0x4b564d99; /* no CPU has it */
    u64 before = gp_now();
    wrmsr(msr, 0x1234);
    report("wrmsr_gp", gp_now() - before);
    before = gp_now();
    (void)rdmsr(msr);
    report("rdmsr_gp", gp_now() - before);

    u32 r[4];
    cpuid(1, 0, r);
    report("vmx", (r[2] >> 5) & 1);
    report("x2apic", (r[2] >> 21) & 1);
    report("tsc_deadline", (r[2] >> 24) & 1);
    report("xsave", (r[2] >> 26) & 1);
    report("hypervisor", (r[2] >> 31) & 1);
    report("apic", (r[3] >> 9) & 1);
    cpuid(0x40000000, 0, r);
    report("hv_max", r[0]);
    report("hv_sig", ((u64)r[2] << 32) | r[1]);
    report("hv_sig_hi", r[3]);
    cpuid(0x15, 0, r);
    report("tsc_ratio", ((u64)r[1] << 32) | r[0]);
    report("crystal_hz", r[2]);
    return 0;
}
