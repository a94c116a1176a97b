/* printk(): format a record and hand it to every enabled console's write(), as
 * Linux's console_unlock() -> call_console_drivers() does (one record per call,
 * through the console's function pointer). vsnprintf() knows what the guests
 * use: %d %i %u %x %X %c %s %p %%, the flags '0' and '-', a width, and the
 * length modifiers hh h l ll z. */
#include "kernel.h"

static struct console *console_drivers;
unsigned long printk_bytes;

void register_console(struct console *con)
{
	if (con->setup && con->setup(con, NULL) != 0)
		return;
	con->flags |= CON_ENABLED;
	con->next = console_drivers;
	console_drivers = con;
}

static void call_console_drivers(const char *text, unsigned int len)
{
	struct console *con;

	for (con = console_drivers; con; con = con->next) {
		if (!(con->flags & CON_ENABLED) || !con->write)
			continue;
		con->write(con, text, len);
	}
}

struct printf_spec {
	unsigned char base;
	unsigned char zeropad;
	unsigned char left;
	unsigned char upper;
	unsigned char is_signed;
	int width;
};

/* Append one character if it fits; always count it. */
static char *put(char *buf, const char *end, char c)
{
	if (buf < end)
		*buf = c;
	return buf + 1;
}

static char *pad(char *buf, const char *end, int n, char c)
{
	while (n-- > 0)
		buf = put(buf, end, c);
	return buf;
}

static char *number(char *buf, const char *end, unsigned long long num, struct printf_spec spec)
{
	static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";
	const char *digits = spec.upper ? upper : lower;
	char tmp[24];
	int i = 0, len;
	char sign = 0;

	if (spec.is_signed && (long long)num < 0) {
		sign = '-';
		num = -(long long)num;
	}
	do {
		tmp[i++] = digits[num % spec.base];
		num /= spec.base;
	} while (num);
	len = i + (sign != 0);
	if (!spec.left && !spec.zeropad)
		buf = pad(buf, end, spec.width - len, ' ');
	if (sign)
		buf = put(buf, end, sign);
	if (!spec.left && spec.zeropad)
		buf = pad(buf, end, spec.width - len, '0');
	while (i)
		buf = put(buf, end, tmp[--i]);
	if (spec.left)
		buf = pad(buf, end, spec.width - len, ' ');
	return buf;
}

static char *string(char *buf, const char *end, const char *s, struct printf_spec spec)
{
	int len;

	if (!s)
		s = "(null)";
	len = (int)strlen(s);
	if (!spec.left)
		buf = pad(buf, end, spec.width - len, ' ');
	while (*s)
		buf = put(buf, end, *s++);
	if (spec.left)
		buf = pad(buf, end, spec.width - len, ' ');
	return buf;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list args)
{
	char *str = buf;
	const char *end = buf + size;

	for (; *fmt; fmt++) {
		struct printf_spec spec = { .base = 10 };
		int qualifier = 0;
		unsigned long long num;

		if (*fmt != '%') {
			str = put(str, end, *fmt);
			continue;
		}
		fmt++;
		for (;; fmt++) {
			if (*fmt == '0')
				spec.zeropad = 1;
			else if (*fmt == '-')
				spec.left = 1;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			spec.width = spec.width * 10 + (*fmt++ - '0');
		while (*fmt == 'h' || *fmt == 'l' || *fmt == 'z') {
			qualifier = *fmt == 'h' ? qualifier - 1 : qualifier + 1;
			fmt++;
		}

		switch (*fmt) {
		case 'c':
			str = pad(str, end, spec.left ? 0 : spec.width - 1, ' ');
			str = put(str, end, (char)va_arg(args, int));
			str = pad(str, end, spec.left ? spec.width - 1 : 0, ' ');
			continue;
		case 's':
			str = string(str, end, va_arg(args, const char *), spec);
			continue;
		case 'p':
			spec.base = 16;
			spec.zeropad = 1;
			spec.width = 16;
			str = number(str, end, (unsigned long)va_arg(args, void *), spec);
			continue;
		case '%':
			str = put(str, end, '%');
			continue;
		case 'd':
		case 'i':
			spec.is_signed = 1;
			break;
		case 'u':
			break;
		case 'X':
			spec.upper = 1;
			/* fall through */
		case 'x':
			spec.base = 16;
			break;
		case '\0':
			fmt--;
			continue;
		default:
			/* Unknown conversion: print it as it is. */
			str = put(str, end, '%');
			str = put(str, end, *fmt);
			continue;
		}

		if (qualifier >= 1)
			num = qualifier >= 2 ? va_arg(args, unsigned long long) : va_arg(args, unsigned long);
		else
			num = va_arg(args, unsigned int);
		if (spec.is_signed) {
			if (qualifier <= -2)
				num = (signed char)num;
			else if (qualifier == -1)
				num = (short)num;
			else if (qualifier == 0)
				num = (int)num;
		} else if (qualifier <= -2) {
			num = (unsigned char)num;
		} else if (qualifier == -1) {
			num = (unsigned short)num;
		}
		str = number(str, end, num, spec);
	}
	if (size > 0)
		*(str < end ? str : (char *)end - 1) = '\0';
	return (int)(str - buf);
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(buf, size, fmt, args);
	va_end(args);
	return n;
}

int printk(const char *fmt, ...)
{
	static char textbuf[1024];
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(textbuf, sizeof(textbuf), fmt, args);
	va_end(args);
	if (n > (int)sizeof(textbuf) - 1)
		n = sizeof(textbuf) - 1;
	call_console_drivers(textbuf, (unsigned int)n);
	printk_bytes += n;
	return n;
}
