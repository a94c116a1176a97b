/* The 8250/16550 UART driver's structures, after Linux's include/linux/serial_core.h
 * and serial_8250.h: a port reached only through its serial_in/serial_out
 * function pointers, which set_io_from_upio() picks from the port's iotype. */
#ifndef AVEX_SERIAL_H
#define AVEX_SERIAL_H

#include "kernel.h"

/* Registers (offsets before regshift). */
#define UART_RX 0
#define UART_TX 0
#define UART_DLL 0
#define UART_IER 1
#define UART_DLM 1
#define UART_IIR 2
#define UART_FCR 2
#define UART_EFR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define UART_MSR 6
#define UART_SCR 7

#define UART_IER_UUE 0x40
#define UART_FCR_ENABLE_FIFO 0x01
#define UART_FCR_CLEAR_RCVR 0x02
#define UART_FCR_CLEAR_XMIT 0x04
#define UART_FCR_R_TRIG_10 0x80
#define UART_FCR7_64BYTE 0x20
#define UART_LCR_DLAB 0x80
#define UART_LCR_WLEN8 0x03
#define UART_LCR_CONF_MODE_B 0xbf
#define UART_MCR_DTR 0x01
#define UART_MCR_RTS 0x02
#define UART_MCR_OUT2 0x08
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_LSR_BRK_ERROR_BITS 0x1e
#define UART_MSR_CTS 0x10
#define BOTH_EMPTY (UART_LSR_TEMT | UART_LSR_THRE)

/* iotype */
#define UPIO_PORT 0
#define UPIO_MEM 2
#define UPIO_MEM32 3

/* flags */
#define UPF_SKIP_TEST (1UL << 6)
#define UPF_CONS_FLOW (1UL << 23)
#define UPF_BOOT_AUTOCONF (1UL << 28)

/* type */
#define PORT_UNKNOWN 0
#define PORT_16450 2
#define PORT_16550 3
#define PORT_16550A 4
#define PORT_16750 8

/* capabilities */
#define UART_CAP_FIFO (1 << 8)
#define UART_CAP_AFE (1 << 11)
#define UART_CAP_UUE (1 << 12)

struct uart_port {
	unsigned long iobase;
	unsigned char *membase;
	unsigned int (*serial_in)(struct uart_port *, int);
	void (*serial_out)(struct uart_port *, int, int);
	unsigned int irq;
	unsigned int uartclk;
	unsigned int fifosize;
	unsigned char regshift;
	unsigned char iotype;
	unsigned int line;
	unsigned long flags;
	unsigned int type;
};

struct uart_8250_port {
	struct uart_port port;
	unsigned short capabilities;
	unsigned char ier;
	unsigned char lcr;
	unsigned char mcr;
	unsigned char fcr;
	unsigned short lsr_saved_flags;
	unsigned short lsr_save_mask;
	unsigned char msr_saved_flags;
	unsigned int canary;
};

static inline struct uart_8250_port *up_to_u8250p(struct uart_port *p)
{
	return (struct uart_8250_port *)p;
}

static inline unsigned int serial_in(struct uart_8250_port *up, int offset)
{
	return up->port.serial_in(&up->port, offset);
}

static inline void serial_out(struct uart_8250_port *up, int offset, int value)
{
	up->port.serial_out(&up->port, offset, value);
}

static inline unsigned int serial_port_in(struct uart_port *up, int offset)
{
	return up->serial_in(up, offset);
}

static inline void serial_port_out(struct uart_port *up, int offset, int value)
{
	up->serial_out(up, offset, value);
}

/* drivers/serial_core.c */
void uart_console_write(struct uart_port *port, const char *s, unsigned int count,
			void (*putchar)(struct uart_port *, unsigned char));

/* drivers/8250_port.c */
void serial8250_set_defaults(struct uart_8250_port *up);
int serial8250_config_port(struct uart_8250_port *up);
void serial8250_set_termios(struct uart_8250_port *up, unsigned int baud);
void serial8250_console_write(struct uart_8250_port *up, const char *s, unsigned int count);
const char *serial8250_type_name(unsigned int type);

#endif
