/* The multiboot command line as `key=value` and `word` tokens separated by spaces. */
#include "lib.h"

static const char *cmdline(void)
{
	const struct multiboot_info *mbi = boot_info;
	if (!mbi || !(mbi->flags & MULTIBOOT_INFO_CMDLINE) || !mbi->cmdline)
		return "";
	return (const char *)(uintptr_t)mbi->cmdline;
}

/* Calls visit(token, length) for each token until it returns non-zero; returns that value. */
static int each_token(int (*visit)(const char *tok, size_t len, void *arg), void *arg)
{
	const char *s = cmdline();
	while (*s) {
		while (*s == ' ')
			s++;
		const char *tok = s;
		while (*s && *s != ' ')
			s++;
		if (s > tok) {
			int found = visit(tok, (size_t)(s - tok), arg);
			if (found)
				return found;
		}
	}
	return 0;
}

struct find {
	const char *key;
	const char *start, *end;
};

static int match_key(const char *tok, size_t len, void *arg)
{
	struct find *f = arg;
	size_t klen = strlen(f->key);
	if (len > klen && memcmp(tok, f->key, klen) == 0 && tok[klen] == '=') {
		f->start = tok + klen + 1;
		f->end = tok + len;
		return 1;
	}
	return 0;
}

int cmdline_find(const char *key, const char **start, const char **end)
{
	struct find f = { key, NULL, NULL };
	if (!each_token(match_key, &f))
		return 0;
	*start = f.start;
	*end = f.end;
	return 1;
}

uint64_t cmdline_u64(const char *key, uint64_t def)
{
	const char *v, *end;
	uint64_t n = 0, base = 10;
	if (!cmdline_find(key, &v, &end))
		return def;
	if (end - v > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X'))
		v += 2, base = 16;
	if (v == end)
		return def;
	for (; v < end; v++) {
		unsigned d;
		if (*v >= '0' && *v <= '9')
			d = (unsigned)(*v - '0');
		else if (base == 16 && (*v | 0x20) >= 'a' && (*v | 0x20) <= 'f')
			d = (unsigned)((*v | 0x20) - 'a' + 10);
		else
			return def; /* malformed: the default, never half a number */
		n = n * base + d;
	}
	return n;
}

static int match_word(const char *tok, size_t len, void *arg)
{
	const char *word = arg;
	return len == strlen(word) && memcmp(tok, word, len) == 0;
}

int cmdline_has(const char *word)
{
	return each_token(match_word, (void *)word);
}
