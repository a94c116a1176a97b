#include "rt.h"
/* WRMSR of a non-canonical address to the MSRs that hold linear addresses
 * (FS/GS base, kernel GS base, LSTAR, SYSENTER ESP/EIP) raises #GP on the CPU and
 * leaves the MSR unchanged. A hypervisor that installs the value instead makes the
 * next VM entry fail. The guest installs an IDT whose #GP handler counts the fault
 * and skips the 2-byte WRMSR, as a kernel's wrmsr_safe does. */
struct gate {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));
static struct gate idt[32] __attribute__((aligned(16)));
u64 gp_count;
void gp_stub(void);
__asm__(".text\n"
        "gp_stub:\n"
        "    add $8, %rsp\n" /* error code */
        "    addq $2, (%rsp)\n" /* skip the WRMSR */
        "    incq gp_count(%rip)\n"
        "    iretq\n");

static void install_idt(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 h = (u64)gp_stub;
    idt[13] = (struct gate){(u16)h, cs, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0};
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof idt - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

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
