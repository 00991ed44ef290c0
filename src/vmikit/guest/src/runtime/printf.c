/*
 * A small printf.  One formatter writes through a sink, so printf (serial
 * port) and snprintf (buffer) share every line of formatting code.
 */
#include "lib.h"

struct sink {
	void (*put)(struct sink *s, char c);
	char *buf;     /* snprintf: destination */
	size_t size;   /* snprintf: capacity including the NUL */
	size_t count;  /* characters produced so far (stored or not) */
};

void console_putc(char c)
{
	/* Both QEMU's UART and the VMM accept a byte at once: no LSR polling. */
	outb((uint8_t)c, PORT_SERIAL);
}

void console_write(const char *s)
{
	while (*s)
		console_putc(*s++);
}

static void put_console(struct sink *s, char c)
{
	console_putc(c);
	s->count++;
}

static void put_buffer(struct sink *s, char c)
{
	if (s->count + 1 < s->size)
		s->buf[s->count] = c;
	s->count++;
}

static void emit_padded(struct sink *s, const char *prefix, const char *digits,
			size_t ndigits, int width, int left, int zero)
{
	size_t plen = strlen(prefix);
	int pad = width - (int)(plen + ndigits);

	if (!left && !zero)
		for (; pad > 0; pad--)
			s->put(s, ' ');
	while (*prefix)
		s->put(s, *prefix++);
	if (!left && zero)
		for (; pad > 0; pad--)
			s->put(s, '0');
	while (ndigits--)
		s->put(s, *digits++);
	for (; left && pad > 0; pad--)
		s->put(s, ' ');
}

static void emit_number(struct sink *s, unsigned long long v, int negative,
			unsigned base, int upper, const char *prefix, int width,
			int left, int zero)
{
	const char *xdigits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24]; /* 2^64 in octal needs 22 digits */
	size_t n = sizeof(tmp);

	do {
		tmp[--n] = xdigits[v % base];
		v /= base;
	} while (v);
	emit_padded(s, negative ? "-" : prefix, tmp + n, sizeof(tmp) - n, width,
		    left, zero);
}

static int format(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			s->put(s, *fmt);
			continue;
		}
		fmt++;

		int left = 0, zero = 0, width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '-')
				left = 1;
			else if (*fmt == '0')
				zero = 1;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			if (width < 0) {
				left = 1;
				width = -width;
			}
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		for (;; fmt++) {
			if (*fmt == 'l')
				lng++;
			else if (*fmt == 'z')
				lng = 2; /* size_t is unsigned long long-sized here */
			else if (*fmt != 'h') /* short/char: promoted to int anyway */
				break;
		}

		unsigned long long u;
		long long d;
		switch (*fmt) {
		case 'd':
		case 'i':
			d = lng >= 2 ? va_arg(ap, long long)
			  : lng == 1 ? va_arg(ap, long)
				     : va_arg(ap, int);
			/* Negate in unsigned arithmetic: LLONG_MIN has no positive twin. */
			u = d < 0 ? -(unsigned long long)d : (unsigned long long)d;
			emit_number(s, u, d < 0, 10, 0, "", width, left, zero);
			break;
		case 'u':
		case 'x':
		case 'X':
		case 'o':
			u = lng >= 2 ? va_arg(ap, unsigned long long)
			  : lng == 1 ? va_arg(ap, unsigned long)
				     : va_arg(ap, unsigned int);
			emit_number(s, u, 0, *fmt == 'u' ? 10 : *fmt == 'o' ? 8 : 16,
				    *fmt == 'X', "", width, left, zero);
			break;
		case 'p':
			u = (uintptr_t)va_arg(ap, void *);
			emit_number(s, u, 0, 16, 0, "0x", width, left, zero);
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);
			emit_padded(s, "", &c, 1, width, left, 0);
			break;
		}
		case 's': {
			const char *str = va_arg(ap, const char *);
			if (!str)
				str = "(null)";
			emit_padded(s, "", str, strlen(str), width, left, 0);
			break;
		}
		case '%':
			s->put(s, '%');
			break;
		case '\0': /* lone '%' at the end */
			return (int)s->count;
		default: /* unknown conversion: print it verbatim so the bug is visible */
			s->put(s, '%');
			s->put(s, *fmt);
			break;
		}
	}
	return (int)s->count;
}

int vprintf(const char *fmt, va_list ap)
{
	struct sink s = { .put = put_console };
	return format(&s, fmt, ap);
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

/* C99 semantics: returns the length the full output would have had. */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { .put = put_buffer, .buf = buf, .size = size };
	int n = format(&s, fmt, ap);
	if (size)
		buf[s.count < size ? s.count : size - 1] = '\0';
	return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
