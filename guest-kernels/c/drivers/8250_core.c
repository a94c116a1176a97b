/* The 8250 console, after Linux's 8250_core.c: the legacy ISA ports from a
 * platform table (SERIAL_PORT_DFNS), each port's accessors set up from its
 * iotype, and the "ttyS" console, set up from "console=ttyS0,115200n8". */
#include "serial.h"

#define BASE_BAUD (1843200 / 16)
#define STD_COMX_FLAGS (UPF_BOOT_AUTOCONF | UPF_SKIP_TEST)

struct old_serial_port {
	unsigned int baud_base;
	unsigned int port;
	unsigned int irq;
	unsigned long flags;
	unsigned char io_type;
};

static const struct old_serial_port old_serial_port[] = {
	{ BASE_BAUD, 0x3f8, 4, STD_COMX_FLAGS, UPIO_PORT }, /* ttyS0 */
	{ BASE_BAUD, 0x2f8, 3, STD_COMX_FLAGS, UPIO_PORT }, /* ttyS1 */
	{ BASE_BAUD, 0x3e8, 4, STD_COMX_FLAGS, UPIO_PORT }, /* ttyS2 */
	{ BASE_BAUD, 0x2e8, 3, STD_COMX_FLAGS, UPIO_PORT }, /* ttyS3 */
};

static struct uart_8250_port serial8250_ports[ARRAY_SIZE(old_serial_port)];

/* The kernel command line's console= option. */
static const char console_options[] = "115200n8";

static void serial8250_isa_init_ports(void)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(old_serial_port); i++) {
		struct uart_8250_port *up = &serial8250_ports[i];
		struct uart_port *port = &up->port;

		port->line = i;
		port->iobase = old_serial_port[i].port;
		port->irq = old_serial_port[i].irq;
		port->uartclk = old_serial_port[i].baud_base * 16;
		port->flags = old_serial_port[i].flags;
		port->iotype = old_serial_port[i].io_type;
		serial8250_set_defaults(up);
	}
}

static void univ8250_console_write(struct console *co, const char *s, unsigned int count)
{
	serial8250_console_write(&serial8250_ports[co->index], s, count);
}

/* "115200n8": the baud rate; parity and bits are always n8 here. */
static unsigned int uart_parse_baud(const char *options)
{
	unsigned int baud = 0;

	while (*options >= '0' && *options <= '9')
		baud = baud * 10 + (*options++ - '0');
	return baud ? baud : 9600;
}

static int univ8250_console_setup(struct console *co, const char *options)
{
	struct uart_8250_port *up;

	if (co->index < 0 || co->index >= (int)ARRAY_SIZE(serial8250_ports))
		return -1;
	up = &serial8250_ports[co->index];
	if (serial8250_config_port(up) != 0)
		return -1;
	serial8250_set_termios(up, uart_parse_baud(options ? options : console_options));
	return 0;
}

static struct console univ8250_console = {
	.name = "ttyS",
	.write = univ8250_console_write,
	.setup = univ8250_console_setup,
	.index = 0,
};

void serial8250_console_init(void)
{
	serial8250_isa_init_ports();
	register_console(&univ8250_console);
}

/* The console port, for a guest that reports what it drives. */
struct uart_8250_port *serial8250_console_port(void)
{
	return &serial8250_ports[univ8250_console.index];
}
