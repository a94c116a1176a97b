/* The runtime of the shape guests: small guests written as drivers are, compiled
 * by gcc at test time (tests/support/shapes.rs), each a regression case for a
 * shape that once made a clustered run differ from mode `off`. Boot ABI:
 * guest-kernels/README.md (64-bit, 4 GiB identity-mapped, COM1 console, a byte
 * written to port 0xf4 ends the run with that status). */
#pragma once
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3f8
#define DEBUG_EXIT 0xf4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 sub, u32 r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* COM1 output as Linux's 8250 console does it: poll LSR.THRE before each byte. */
static inline void putc_com1(char c) {
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}
static inline void puts_com1(const char *s) {
    for (; *s; s++) {
        if (*s == '\n')
            putc_com1('\r');
        putc_com1(*s);
    }
}
static inline void puthex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++)
        buf[2 + i] = digits[(v >> (60 - 4 * i)) & 0xf];
    buf[18] = 0;
    puts_com1(buf);
}
/* "name=0x...\n" */
static inline void report(const char *name, u64 v) {
    puts_com1(name);
    putc_com1('=');
    puthex(v);
    puts_com1("\n");
}
static inline __attribute__((noreturn)) void exit_with(u8 status) {
    outb(DEBUG_EXIT, status);
    for (;;)
        __asm__ volatile("hlt");
}

/* Each shape defines main; its return value is the run's status. */
int main(void);
