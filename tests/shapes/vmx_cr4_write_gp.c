#include "rt.h"
/* MOV to CR4 with a bit the vCPU does not support (VMXE: its CPUID reports no
 * VMX; bit 15: reserved) raises #GP on the CPU and changes nothing. A hypervisor
 * that installs such a value makes the next VM entry fail (or hands the guest
 * VMX). The #GP handler counts the fault and skips the 3-byte MOV. */
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
        "    add $8, %rsp\n"
        "    addq $3, (%rsp)\n" /* skip `mov %rax, %crN` (0f 22 /r) */
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

static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %%rax, %%cr4" : : "a"(v) : "memory"); }

int main(void) {
    install_idt();
    u64 cr4 = read_cr4(), before;

    before = gp_count;
    write_cr4(cr4 | (1 << 13)); /* VMXE */
    report("cr4_vmxe_gp", gp_count - before);
    report("cr4_kept", read_cr4() == cr4);

    before = gp_count;
    write_cr4(cr4 | (1 << 15)); /* reserved */
    report("cr4_bit15_gp", gp_count - before);
    report("cr4_kept", read_cr4() == cr4);

    write_cr4(cr4); /* allowed: unchanged */
    report("gp_total", gp_count);
    return 0;
}
