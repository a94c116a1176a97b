#include "rt.h"
/* String port I/O with a 32-bit address size in 64-bit code (`addr32 rep
 * outsb`, `addr32 rep insb`, `addr32 outsb`) with garbage in the upper halves of
 * RSI, RDI and RCX: the CPU uses ESI/EDI/ECX and writes them back zero-extended.
 * A hypervisor that completes the exit itself must do the same. */
static char msg[] = "addr32 rep outsb\n";
static u8 buf[8];

int main(void) {
    u64 rsi = 0xdeadbeef00000000ull | (u32)(u64)msg;
    u64 rcx = 0x1234567800000000ull | (sizeof msg - 1);
    __asm__ volatile("addr32 rep outsb" : "+S"(rsi), "+c"(rcx) : "d"(COM1) : "memory");
    report("rsi_hi", rsi >> 32);
    report("rsi_moved", (u32)rsi - (u32)(u64)msg);
    report("rcx", rcx);

    u64 rdi = 0xfeedface00000000ull | (u32)(u64)buf;
    rcx = 0x8765432100000000ull | 2;
    __asm__ volatile("addr32 rep insb" : "+D"(rdi), "+c"(rcx) : "d"(COM1 + 5) : "memory");
    report("rdi_hi", rdi >> 32);
    report("rdi_moved", (u32)rdi - (u32)(u64)buf);
    report("rcx", rcx);
    report("lsr", buf[0] | (u64)buf[1] << 8);

    rsi = 0xabcdef0100000000ull | (u32)(u64)msg;
    __asm__ volatile("addr32 outsb" : "+S"(rsi) : "d"(COM1 + 7) : "memory");
    report("rsi_hi", rsi >> 32);
    report("rsi_moved", (u32)rsi - (u32)(u64)msg);
    return 0;
}
