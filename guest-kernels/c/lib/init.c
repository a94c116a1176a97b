/* start_kernel(): bring up the console (as Linux's console_init() runs the
 * console initcalls), run the guest, and end through isa-debug-exit. */
#include "io.h"
#include "kernel.h"

/* isa-debug-exit: an OUT of a byte V ends the run with status V. */
#define DEBUG_EXIT_PORT 0xf4

void serial8250_console_init(void);

void __noreturn avex_exit(int status)
{
	outb((u8)status, DEBUG_EXIT_PORT);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void __noreturn panic(const char *fmt, ...)
{
	char buf[256];
	va_list args;

	va_start(args, fmt);
	vsnprintf(buf, sizeof(buf), fmt, args);
	va_end(args);
	printk("Kernel panic - not syncing: %s\n", buf);
	avex_exit(EXIT_PANIC);
}

void __noreturn start_kernel(void);

void __noreturn start_kernel(void)
{
	serial8250_console_init();
	avex_exit(guest_main());
}
