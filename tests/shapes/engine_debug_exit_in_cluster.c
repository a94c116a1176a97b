#include "rt.h"
/* A write to the debug-exit port in the middle of a clustered loop of console
 * writes. The VMM stops the guest at that write, so no byte written after it may
 * appear: a cluster that ran on past the exit request printed the rest of the
 * line and the next iterations. The iteration that exits is read from a volatile
 * so gcc keeps one loop with the exit inside it. */
static volatile int exit_at = 20;

int main(void) {
    outb(COM1 + 3, 0x03);
    for (int i = 0; i < 26; i++) {
        outb(COM1, (u8)('a' + i));
        if (i == exit_at)
            outb(DEBUG_EXIT, 0);
        outb(COM1, (u8)('A' + i));
        outb(COM1, '\n');
    }
    puts_com1("the guest ran on after its exit request\n");
    return 1;
}
