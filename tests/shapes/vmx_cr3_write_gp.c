#include "rt.h"
/* MOV to CR3 with a bit at or above MAXPHYADDR (CPUID 0x80000008) raises #GP in
 * 64-bit mode and changes nothing. A hypervisor that installs it makes the next VM
 * entry fail. The #GP handler counts the fault and skips the 3-byte MOV. */
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

static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %%rax, %%cr3" : : "a"(v) : "memory"); }

int main(void) {
    install_idt();
    u64 cr3 = read_cr3(), before;
    u32 r[4];
    cpuid(0x80000008, 0, r);
    u32 maxphyaddr = r[0] & 0xff;
    for (u32 bit = maxphyaddr; bit < maxphyaddr + 3 && bit < 63; bit++) {
        before = gp_count;
        write_cr3(cr3 | (1ull << bit));
        report("cr3_above_maxphyaddr_gp", gp_count - before);
        report("cr3_kept", read_cr3() == cr3);
    }
    write_cr3(cr3); /* allowed: same tables */
    report("gp_total", gp_count);
    return 0;
}
