#include "rt.h"
/* A console write shaped like Linux's 8250 console under its port spinlock, as
 * the stock 6.1 kernel runs it once its paravirt calls are patched:
 * _raw_spin_lock_irqsave is `pushfq; pop; cli; incl preempt; xor %eax,%eax;
 * mov $1,%edx; lock cmpxchg %edx,(lock); jne`, _raw_spin_unlock_irqrestore is
 * `movb $0,(lock); test $0x200,flags; je 1f; sti; 1: decl preempt`. Between them
 * the UART's IER is saved and cleared, LSR polled, a byte written and IER
 * restored, with a little arithmetic (lock xadd, one-operand mul, bswap) in the
 * gaps. Every clustering mode must print the bytes mode off prints, with the
 * spinlock inside the clusters. Interrupts are on (the PIC masked, so none come)
 * so the unlock's STI runs. */

static volatile u32 port_lock;
static volatile u32 preempt_count;
static volatile u32 ticket;

static inline __attribute__((always_inline)) u64 spin_lock_irqsave(void) {
    u64 flags;
    __asm__ volatile("pushfq\n\t"
                     "pop %0\n\t"
                     "cli\n\t"
                     "incl %2\n\t"
                     "1: xor %%eax, %%eax\n\t"
                     "mov $1, %%edx\n\t"
                     "lock cmpxchg %%edx, %1\n\t"
                     "jne 1b"
                     : "=&r"(flags), "+m"(port_lock), "+m"(preempt_count)
                     :
                     : "rax", "rdx", "memory", "cc");
    return flags;
}

static inline __attribute__((always_inline)) void spin_unlock_irqrestore(u64 flags) {
    __asm__ volatile("movb $0, %0\n\t"
                     "test $0x200, %k2\n\t"
                     "je 1f\n\t"
                     "sti\n\t"
                     "1: decl %1"
                     : "+m"(port_lock), "+m"(preempt_count)
                     : "r"(flags)
                     : "memory", "cc");
}

/* One byte as serial8250_console_write sends it, under the port lock. */
static u64 console_putc(char c, u64 sum) {
    u64 flags = spin_lock_irqsave();
    u8 ier = inb(COM1 + 1);
    outb(COM1 + 1, 0);
    u32 t = 1;
    __asm__ volatile("lock xaddl %0, %1" : "+r"(t), "+m"(ticket) : : "memory", "cc");
    for (int i = 0; i < 1000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
    u64 hi, lo = sum ^ (u64)(u8)c;
    __asm__("mulq %3" : "=a"(lo), "=d"(hi) : "0"(lo), "rm"(0x9e3779b97f4a7c15ull) : "cc");
    sum = lo ^ hi ^ __builtin_bswap32(t);
    outb(COM1 + 1, ier);
    spin_unlock_irqrestore(flags);
    return sum;
}

int main(void) {
    static const char hex[] = "0123456789abcdef";
    /* Mask both PICs: interrupts on, none delivered (there is no IDT). */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    __asm__ volatile("sti");
    u64 sum = 0;
    for (int line = 0; line < 12; line++) {
        const char *s = "spin ";
        for (; *s; s++)
            sum = console_putc(*s, sum);
        sum = console_putc(hex[line >> 4], sum);
        sum = console_putc(hex[line & 15], sum);
        sum = console_putc(' ', sum);
        for (int k = 0; k < 8; k++)
            sum = console_putc(hex[(sum >> (4 * k)) & 15], sum);
        sum = console_putc('\r', sum);
        sum = console_putc('\n', sum);
    }
    u64 flags;
    __asm__ volatile("pushfq; pop %0" : "=r"(flags));
    report("if", (flags >> 9) & 1);
    report("ticket", ticket);
    report("preempt", preempt_count);
    report("sum", sum);
    return 0;
}
