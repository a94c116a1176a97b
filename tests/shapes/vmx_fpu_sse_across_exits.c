#include "rt.h"
/* The guest's x87 and SSE state survives every exit: XMM0-15, MXCSR and the x87
 * stack are set before a loop of exiting instructions (port I/O, CPUID, RDTSC,
 * which cluster in the dynamic modes) and read back after it, while the
 * hypervisor, whose own code uses SSE, handles each exit and runs the clusters.
 * The guest's CPUID offers no XSAVE, so the FXSAVE state is all the state it has.
 * The C code is built without SSE or x87 (-mgeneral-regs-only): only the inline
 * assembly touches those registers. The KVM backend's instruction emulator cannot
 * run SSE (PLATFORM.md): there (no `avex` hypervisor signature in CPUID leaf
 * 0x40000000) the guest only says so. */
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }
static inline u64 read_tsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

#define XMM(n) "movdqu " #n "*16(%0), %%xmm" #n "\n\t"
#define XMM_OUT(n) "movdqu %%xmm" #n ", " #n "*16(%1)\n\t"

static u64 in[32] __attribute__((aligned(16)));
static u64 out[32] __attribute__((aligned(16)));
static u64 x87_out[2];

int main(void) {
    u32 r[4];
    cpuid(0x40000000, 0, r);
    if (r[1] != 0x78657661) { /* "avex": the VT-x hypervisor */
        report("not_vmx", 1);
        return 0;
    }
    /* CR0: MP set, EM and TS clear; CR4: OSFXSR and OSXMMEXCPT. */
    write_cr0((read_cr0() & ~((1ull << 2) | (1ull << 3))) | (1ull << 1));
    write_cr4(read_cr4() | (1ull << 9) | (1ull << 10));
    for (int i = 0; i < 32; i++)
        in[i] = 0x0123456789abcdefull * (u64)(i + 1) ^ ((u64)i << 56);
    u32 mxcsr_in = 0x1f80 | (3u << 13); /* all masked, round toward zero */
    __asm__ volatile(XMM(0) XMM(1) XMM(2) XMM(3) XMM(4) XMM(5) XMM(6) XMM(7)
                     XMM(8) XMM(9) XMM(10) XMM(11) XMM(12) XMM(13) XMM(14) XMM(15)
                     "ldmxcsr %1\n\t"
                     "finit\n\t"
                     "fldpi\n\t"
                     "fld1\n\t"
                     : : "r"(in), "m"(mxcsr_in) : "memory");
    u64 sum = 0;
    for (u32 i = 0; i < 64; i++) {
        outb(0x80, (u8)i);
        sum += inb(COM1 + 5);
        outb(COM1 + 7, (u8)sum);
        cpuid(i & 1, 0, r);
        sum += read_tsc() & 1;
    }
    u32 mxcsr_out = 0;
    __asm__ volatile(XMM_OUT(0) XMM_OUT(1) XMM_OUT(2) XMM_OUT(3) XMM_OUT(4) XMM_OUT(5)
                     XMM_OUT(6) XMM_OUT(7) XMM_OUT(8) XMM_OUT(9) XMM_OUT(10) XMM_OUT(11)
                     XMM_OUT(12) XMM_OUT(13) XMM_OUT(14) XMM_OUT(15)
                     "stmxcsr %0\n\t"
                     "fstpl 0(%2)\n\t"
                     "fstpl 8(%2)\n\t"
                     : "=m"(mxcsr_out) : "r"(out), "r"(x87_out) : "memory");
    u64 same = 0;
    for (int i = 0; i < 32; i++)
        same += out[i] == in[i];
    report("xmm_qwords_kept", same);
    report("mxcsr", mxcsr_out);
    report("st0_one", x87_out[0]);
    report("st1_pi", x87_out[1]);
    return 0;
}
