/* uart_console_write(), as in Linux's drivers/tty/serial/serial_core.c: the
 * driver's putchar callback per character, "\n" sent as "\r\n". */
#include "serial.h"

void uart_console_write(struct uart_port *port, const char *s, unsigned int count,
			void (*putchar)(struct uart_port *, unsigned char))
{
	unsigned int i;

	for (i = 0; i < count; i++, s++) {
		if (*s == '\n')
			putchar(port, '\r');
		putchar(port, *s);
	}
}
