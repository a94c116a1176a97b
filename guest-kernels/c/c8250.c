/* c8250: a console-bound workload on the 8250 console driver. Prints a table of
 * 256 lines, one printk() each (number, a multiplicative hash, the running
 * CRC-32 of the hashes so far, a running sum), so that its exits are the
 * driver's: per line IER read, cleared and restored, and per character an LSR
 * poll and a THR write, each through the port's function pointers. */
#include "serial.h"

#define LINES 256

struct uart_8250_port *serial8250_console_port(void);

/* Bitwise CRC-32 (IEEE, reflected), continued from crc. */
static u32 crc32_le(u32 crc, const u8 *p, unsigned int len)
{
	crc = ~crc;
	while (len--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320 & -(crc & 1));
	}
	return ~crc;
}

int guest_main(void)
{
	struct uart_8250_port *up = serial8250_console_port();
	u32 crc = 0, sum = 0;

	printk("c8250: ttyS%u at I/O 0x%lx (irq = %u, base_baud = %u) is a %s\n", up->port.line,
	       up->port.iobase, up->port.irq, up->port.uartclk / 16,
	       serial8250_type_name(up->port.type));
	for (u32 i = 0; i < LINES; i++) {
		u32 x = i * 2654435761u;
		u8 bytes[4] = { x, x >> 8, x >> 16, x >> 24 };

		crc = crc32_le(crc, bytes, sizeof(bytes));
		sum = (sum + (x >> 20)) % 1000000;
		printk("%03u %08x %08x %6u\n", i, x, crc, sum);
	}
	printk("c8250: %u lines, %lu bytes\n", LINES, printk_bytes);
	printk("c8250: ok\n");
	return EXIT_OK;
}
