/* The C guests' runtime: types, the printk console, string helpers, exit.
 * A freestanding, Linux-shaped miniature: guests print through printk(), which
 * hands each formatted record to every registered console's write() (here the
 * 8250 console of drivers/8250_*.c), and end through the isa-debug-exit port. */
#ifndef AVEX_KERNEL_H
#define AVEX_KERNEL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define noinline __attribute__((noinline))
#define __noreturn __attribute__((noreturn))
#define __printf(a, b) __attribute__((format(printf, a, b)))

/* Exit statuses (guest-kernels/README.md, "Boot ABI"). */
#define EXIT_OK 0
#define EXIT_FAILED 1
#define EXIT_PANIC 2

/* The guest's own entry, called by start_kernel() once the console is up; its
 * return value is the exit status. */
int guest_main(void);

/* lib/printk.c */
struct console {
	const char *name;
	void (*write)(struct console *, const char *, unsigned int);
	int (*setup)(struct console *, const char *options);
	short flags;
	short index;
	struct console *next;
};
#define CON_ENABLED 4

void register_console(struct console *con);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list args);
int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
int printk(const char *fmt, ...) __printf(1, 2);
/* Bytes printk has handed to the consoles so far. */
extern unsigned long printk_bytes;

/* lib/init.c */
void __noreturn avex_exit(int status);
void __noreturn panic(const char *fmt, ...) __printf(1, 2);

/* lib/string.c */
void *memset(void *s, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif
