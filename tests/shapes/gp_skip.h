/* A #GP handler for the shape guests that test refused writes: it counts the
 * fault and resumes GP_SKIP_BYTES further (the faulting instruction's length), as
 * a kernel's wrmsr_safe-style accessors do. Define GP_SKIP_BYTES, then include
 * this after rt.h; call install_idt() first thing. */
#pragma once
#include "rt.h"

#ifndef GP_SKIP_BYTES
#error "define GP_SKIP_BYTES (the length of the instruction expected to #GP)"
#endif
#define GP_STR2(x) #x
#define GP_STR(x) GP_STR2(x)

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
        "    addq $" GP_STR(GP_SKIP_BYTES) ", (%rsp)\n"
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
