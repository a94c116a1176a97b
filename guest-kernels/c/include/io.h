/* Port I/O as Linux's arch/x86/include/asm/io.h has it (value first, port second). */
#ifndef AVEX_IO_H
#define AVEX_IO_H

#include "kernel.h"

static inline void outb(u8 value, u16 port)
{
	__asm__ volatile("outb %b0, %w1" : : "a"(value), "Nd"(port));
}

static inline void outw(u16 value, u16 port)
{
	__asm__ volatile("outw %w0, %w1" : : "a"(value), "Nd"(port));
}

static inline void outl(u32 value, u16 port)
{
	__asm__ volatile("outl %0, %w1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 value;
	__asm__ volatile("inb %w1, %b0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u16 inw(u16 port)
{
	u16 value;
	__asm__ volatile("inw %w1, %w0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline u32 inl(u16 port)
{
	u32 value;
	__asm__ volatile("inl %w1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

/* native_io_delay: a write to the unused POST port 0x80. */
static inline void io_delay(void)
{
	outb(0, 0x80);
}

/* MMIO accessors, for the 8250's UPIO_MEM ports. */
static inline u8 readb(const volatile void *addr)
{
	return *(const volatile u8 *)addr;
}

static inline void writeb(u8 value, volatile void *addr)
{
	*(volatile u8 *)addr = value;
}

static inline u32 readl(const volatile void *addr)
{
	return *(const volatile u32 *)addr;
}

static inline void writel(u32 value, volatile void *addr)
{
	*(volatile u32 *)addr = value;
}

#endif
