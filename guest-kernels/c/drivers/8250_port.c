/* The 8250/16550 port driver, after Linux's drivers/tty/serial/8250/8250_port.c:
 * register access through the port's serial_in/serial_out (chosen at run time by
 * set_io_from_upio()), UART autoconfiguration, line setup, and the console write
 * path: IER saved and cleared, uart_console_write() with
 * serial8250_console_putchar() -> wait_for_xmitr() per character, wait for the
 * transmitter to empty, IER restored. */
#include "io.h"
#include "serial.h"

struct serial8250_config {
	const char *name;
	unsigned short fifo_size;
	unsigned char fcr;
	unsigned int flags;
};

static const struct serial8250_config uart_config[] = {
	[PORT_UNKNOWN] = { "unknown", 1, 0, 0 },
	[1] = { "8250", 1, 0, 0 },
	[PORT_16450] = { "16450", 1, 0, 0 },
	[PORT_16550] = { "16550", 1, 0, 0 },
	[PORT_16550A] = { "16550A", 16, UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10, UART_CAP_FIFO },
	[5] = { "unknown", 1, 0, 0 },
	[6] = { "unknown", 1, 0, 0 },
	[7] = { "unknown", 1, 0, 0 },
	[PORT_16750] = { "TI16750", 64, UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10 | UART_FCR7_64BYTE,
			 UART_CAP_FIFO | UART_CAP_AFE },
};

const char *serial8250_type_name(unsigned int type)
{
	return type < ARRAY_SIZE(uart_config) ? uart_config[type].name : "unknown";
}

static unsigned int io_serial_in(struct uart_port *p, int offset)
{
	offset = offset << p->regshift;
	return inb(p->iobase + offset);
}

static void io_serial_out(struct uart_port *p, int offset, int value)
{
	offset = offset << p->regshift;
	outb(value, p->iobase + offset);
}

static unsigned int mem_serial_in(struct uart_port *p, int offset)
{
	offset = offset << p->regshift;
	return readb(p->membase + offset);
}

static void mem_serial_out(struct uart_port *p, int offset, int value)
{
	offset = offset << p->regshift;
	writeb(value, p->membase + offset);
}

static unsigned int mem32_serial_in(struct uart_port *p, int offset)
{
	offset = offset << p->regshift;
	return readl(p->membase + offset);
}

static void mem32_serial_out(struct uart_port *p, int offset, int value)
{
	offset = offset << p->regshift;
	writel(value, p->membase + offset);
}

static void set_io_from_upio(struct uart_port *p)
{
	switch (p->iotype) {
	case UPIO_MEM:
		p->serial_in = mem_serial_in;
		p->serial_out = mem_serial_out;
		break;
	case UPIO_MEM32:
		p->serial_in = mem32_serial_in;
		p->serial_out = mem32_serial_out;
		break;
	default:
		p->serial_in = io_serial_in;
		p->serial_out = io_serial_out;
		break;
	}
}

void serial8250_set_defaults(struct uart_8250_port *up)
{
	up->lsr_save_mask = UART_LSR_BRK_ERROR_BITS;
	set_io_from_upio(&up->port);
}

static void serial8250_clear_IER(struct uart_8250_port *up)
{
	if (up->capabilities & UART_CAP_UUE)
		serial_out(up, UART_IER, UART_IER_UUE);
	else
		serial_out(up, UART_IER, 0);
}

static void serial8250_clear_fifos(struct uart_8250_port *p)
{
	if (p->capabilities & UART_CAP_FIFO) {
		serial_out(p, UART_FCR, UART_FCR_ENABLE_FIFO);
		serial_out(p, UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT);
		serial_out(p, UART_FCR, 0);
	}
}

/* A 16450 has a scratch register, an 8250 has not. */
static void autoconfig_8250(struct uart_8250_port *up)
{
	unsigned char scratch, status1, status2;

	up->port.type = 1;
	scratch = serial_in(up, UART_SCR);
	serial_out(up, UART_SCR, 0xa5);
	status1 = serial_in(up, UART_SCR);
	serial_out(up, UART_SCR, 0x5a);
	status2 = serial_in(up, UART_SCR);
	serial_out(up, UART_SCR, scratch);
	if (status1 == 0xa5 && status2 == 0x5a)
		up->port.type = PORT_16450;
}

/* A working FIFO: a 16550A, unless the 64-byte FIFO bit sticks only with DLAB
 * set (a TI16750). */
static void autoconfig_16550a(struct uart_8250_port *up)
{
	unsigned char status1, status2;

	up->port.type = PORT_16550A;
	up->capabilities |= UART_CAP_FIFO;

	serial_out(up, UART_LCR, 0);
	serial_out(up, UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE);
	status1 = serial_in(up, UART_IIR) >> 5;
	serial_out(up, UART_FCR, UART_FCR_ENABLE_FIFO);
	serial_out(up, UART_LCR, UART_LCR_DLAB);
	serial_out(up, UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE);
	status2 = serial_in(up, UART_IIR) >> 5;
	serial_out(up, UART_FCR, UART_FCR_ENABLE_FIFO);
	serial_out(up, UART_LCR, 0);
	if (status1 == 6 && status2 == 7) {
		up->port.type = PORT_16750;
		up->capabilities |= UART_CAP_AFE;
	}
}

/* Linux's autoconfig(): is there a UART, and which? Returns 0 if one answered. */
int serial8250_config_port(struct uart_8250_port *up)
{
	struct uart_port *port = &up->port;
	unsigned char scratch, scratch2, scratch3, save_lcr, save_mcr, status1;

	if (!port->iobase && !port->membase)
		return -1;
	up->capabilities = 0;

	/* IER: the low four bits must clear and set. */
	scratch = serial_in(up, UART_IER);
	serial_out(up, UART_IER, 0);
	scratch2 = serial_in(up, UART_IER) & 0x0f;
	serial_out(up, UART_IER, 0x0f);
	scratch3 = serial_in(up, UART_IER) & 0x0f;
	serial_out(up, UART_IER, scratch);
	if (scratch2 != 0 || scratch3 != 0x0f)
		return -1;

	save_mcr = serial_in(up, UART_MCR);
	save_lcr = serial_in(up, UART_LCR);

	if (!(port->flags & UPF_SKIP_TEST)) {
		serial_out(up, UART_MCR, 0x10 | 0x0a); /* loopback, OUT2 and RTS */
		status1 = serial_in(up, UART_MSR) & 0xf0;
		serial_out(up, UART_MCR, save_mcr);
		if (status1 != 0x90)
			return -1;
	}

	serial_out(up, UART_LCR, UART_LCR_CONF_MODE_B);
	serial_out(up, UART_EFR, 0);
	serial_out(up, UART_LCR, 0);

	serial_out(up, UART_FCR, UART_FCR_ENABLE_FIFO);
	switch (serial_in(up, UART_IIR) >> 6) {
	case 0:
		autoconfig_8250(up);
		break;
	case 1:
		port->type = PORT_UNKNOWN;
		break;
	case 2:
		port->type = PORT_16550;
		break;
	case 3:
		autoconfig_16550a(up);
		break;
	}

	serial_out(up, UART_LCR, save_lcr);
	port->fifosize = uart_config[port->type].fifo_size;
	up->capabilities = uart_config[port->type].flags;

	/* Reset the UART. */
	serial_out(up, UART_MCR, save_mcr);
	serial8250_clear_fifos(up);
	serial_in(up, UART_RX);
	serial8250_clear_IER(up);
	return 0;
}

void serial8250_set_termios(struct uart_8250_port *up, unsigned int baud)
{
	unsigned int quot = up->port.uartclk / (16 * baud);

	up->lcr = UART_LCR_WLEN8;
	up->fcr = uart_config[up->port.type].fcr;
	serial_out(up, UART_LCR, up->lcr | UART_LCR_DLAB);
	serial_out(up, UART_DLL, quot & 0xff);
	serial_out(up, UART_DLM, quot >> 8 & 0xff);
	serial_out(up, UART_LCR, up->lcr);
	if (up->fcr & UART_FCR_ENABLE_FIFO)
		serial_out(up, UART_FCR, up->fcr);
	up->mcr = UART_MCR_DTR | UART_MCR_RTS;
	serial_out(up, UART_MCR, up->mcr);
}

/* LSR, with the error bits a read clears kept for the receive path. */
static unsigned int serial_lsr_in(struct uart_8250_port *up)
{
	unsigned int lsr = up->lsr_saved_flags;

	lsr |= serial_in(up, UART_LSR);
	up->lsr_saved_flags = lsr & up->lsr_save_mask;
	return lsr;
}

/* Wait for the transmitter (bits: THRE, or both empty): at most 10000 LSR reads,
 * an I/O delay between them, then for CTS if the console uses flow control. */
static void wait_for_xmitr(struct uart_8250_port *up, int bits)
{
	unsigned int status, tmout = 10000;

	for (;;) {
		status = serial_lsr_in(up);
		if ((status & bits) == bits)
			break;
		if (--tmout == 0)
			break;
		io_delay();
	}

	if (up->port.flags & UPF_CONS_FLOW) {
		for (tmout = 1000000; tmout; tmout--) {
			unsigned int msr = serial_in(up, UART_MSR);

			up->msr_saved_flags |= msr & 0x0f;
			if (msr & UART_MSR_CTS)
				break;
			io_delay();
		}
	}
}

static void serial8250_console_putchar(struct uart_port *port, unsigned char ch)
{
	struct uart_8250_port *up = up_to_u8250p(port);

	wait_for_xmitr(up, UART_LSR_THRE);
	serial_port_out(port, UART_TX, ch);
}

static void serial8250_modem_status(struct uart_8250_port *up)
{
	serial_in(up, UART_MSR);
	up->msr_saved_flags = 0;
}

void serial8250_console_write(struct uart_8250_port *up, const char *s, unsigned int count)
{
	struct uart_port *port = &up->port;
	unsigned int ier;

	/* First save the IER, then disable the interrupts. */
	ier = serial_port_in(port, UART_IER);
	serial8250_clear_IER(up);

	/* A scratch value that changed: the port lost power; set it up again. */
	if (up->canary && up->canary != serial_port_in(port, UART_SCR)) {
		serial8250_set_termios(up, up->port.uartclk / 16);
		up->canary = 0;
	}

	uart_console_write(port, s, count, serial8250_console_putchar);

	/* Finally, wait for the transmitter to empty and restore the IER. */
	wait_for_xmitr(up, BOTH_EMPTY);
	serial_port_out(port, UART_IER, ier);

	if (up->msr_saved_flags)
		serial8250_modem_status(up);
}
