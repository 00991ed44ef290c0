/*
 * hello: a smoke test of the runtime.  Every PASS line must read the same on
 * KVM and on QEMU, so messages name no sizes, addresses or timings.
 *
 * A kernel the hypervisor deprivileged (vmi_deprivileged(): ring 3, see
 * docs/execution-model.md) reads EFER, CR0, CR4 and its IDT register through
 * the VMI layer: there rdmsr and mov from CRn raise #GP, and sidt names the
 * hypervisor's IDT, not the runtime's.
 */
#include "lib.h"
#include "vmi.h"

#define NPAGES 8

static int check_fmt(const char *expect, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static int check_fmt(const char *expect, const char *fmt, ...)
{
	char buf[64];
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (strcmp(buf, expect) != 0 || n != (int)strlen(expect)) {
		printf("  format \"%s\": got \"%s\" (%d), expected \"%s\"\n", fmt, buf, n, expect);
		return 0;
	}
	return 1;
}

static void test_printf(void)
{
	int ok = 1;

	ok &= check_fmt("42 -7 0", "%d %i %d", 42, -7, 0);
	ok &= check_fmt("4294967295", "%u", 4294967295u);
	ok &= check_fmt("deadbeef DEADBEEF", "%x %X", 0xdeadbeefu, 0xdeadbeefu);
	ok &= check_fmt("123456789abcdef0", "%lx", 0x123456789abcdef0ul);
	ok &= check_fmt("ffffffffffffffff", "%llx", ~0ull);
	ok &= check_fmt("18446744073709551615", "%lu", ~0ul);
	ok &= check_fmt("-9223372036854775808", "%ld", (long)(1ul << 63));
	ok &= check_fmt("str c %", "%s %c %%", "str", 'c');
	ok &= check_fmt("0x1000", "%p", (void *)0x1000);
	ok &= check_fmt("[   42][00042][42   ]", "[%5d][%05d][%-5d]", 42, 42, 42);
	ok &= check_fmt("[-0042][0000ff][  ab]", "[%05d][%06x][%4s]", -42, 0xff, "ab");
	const char *volatile null_string = NULL; /* volatile: hide it from -Wformat */
	ok &= check_fmt("(null)", "%s", null_string);
	report(ok, "snprintf formats %%d %%i %%u %%x %%lx %%llx %%lu %%ld %%s %%c %%p %%%% with width and zero-pad");

	char small[4];
	int n = snprintf(small, sizeof(small), "%s", "abcdef");
	report(n == 6 && strcmp(small, "abc") == 0, "snprintf truncates, NUL-terminates and returns the full length");
}

static void test_string(void)
{
	char a[16], b[16];

	memset(a, 'x', sizeof(a));
	memcpy(b, a, sizeof(b));
	a[15] = b[15] = '\0';
	int ok = memcmp(a, b, sizeof(a)) == 0 && strlen(a) == 15;
	b[3] = 'y';
	ok &= memcmp(a, b, sizeof(a)) < 0 && memcmp(b, a, sizeof(a)) > 0;
	report(ok, "memset, memcpy, memcmp and strlen agree");
}

static void test_memory_map(void)
{
	const struct multiboot_info *mbi = boot_info;
	int found = 0;

	if (mbi && (mbi->flags & MULTIBOOT_INFO_MMAP)) {
		uint64_t p = mbi->mmap_addr, end = p + mbi->mmap_length;
		while (p + sizeof(struct multiboot_mmap_entry) <= end) {
			const struct multiboot_mmap_entry *e = (const void *)(uintptr_t)p;
			if (e->type == MULTIBOOT_MEMORY_AVAILABLE && e->base + e->len > 0x100000)
				found = 1;
			p += (uint64_t)e->size + sizeof(e->size);
		}
	}
	report(found, "memory map has usable RAM above 1 MiB");
}

static int page_is_zero(const uint8_t *p)
{
	for (size_t i = 0; i < PAGE_SIZE; i++)
		if (p[i])
			return 0;
	return 1;
}

static void test_allocator(void)
{
	uint8_t *pages[NPAGES];
	int ok = 1, safe = 1;

	for (int i = 0; i < NPAGES; i++) {
		pages[i] = alloc_page();
		if (!pages[i]) {
			ok = 0;
			break;
		}
		uintptr_t a = (uintptr_t)pages[i];
		ok &= (a & (PAGE_SIZE - 1)) == 0 && page_is_zero(pages[i]);
		safe &= a >= (uintptr_t)__kernel_end && a >= 0x100000 &&
			(uintptr_t)boot_info - a >= PAGE_SIZE;
		for (int j = 0; j < i; j++)
			ok &= pages[j] != pages[i];
		memset(pages[i], 0xA5, PAGE_SIZE); /* dirty it: reuse must re-zero */
	}
	report(ok, "page allocator returns distinct page-aligned zeroed pages");
	report(ok && safe, "page allocator stays clear of low memory, the kernel and boot info");
	if (!ok)
		return;

	uint8_t *victim = pages[NPAGES / 2];
	free_page(victim);
	uint8_t *again = alloc_page();
	report(again == victim && page_is_zero(again), "page allocator reuses freed pages, zeroed");
	for (int i = 0; i < NPAGES; i++)
		free_page(pages[i]);
}

static uint64_t efer(void)
{
	uint64_t v = 0;
	if (!vmi_deprivileged())
		return rdmsr(MSR_EFER);
	return vmi_rdmsr(MSR_EFER, &v) == VMI_ERR_OK ? v : 0;
}

static uint64_t cr0(void) { return vmi_deprivileged() ? vmi_get_cr0() : read_cr0(); }
static uint64_t cr4(void) { return vmi_deprivileged() ? vmi_get_cr4() : read_cr4(); }

static uint32_t idt_limit(void)
{
	uint64_t base = 0;
	uint32_t limit = 0;
	if (!vmi_deprivileged())
		return sidt().limit;
	return vmi_get_idt(&base, &limit) == VMI_ERR_OK && base ? limit : 0;
}

void kmain(uint32_t magic, uint32_t mbinfo)
{
	(void)mbinfo;
	printf("vmikit hello guest\n");

	report(magic == MULTIBOOT_BOOTLOADER_MAGIC && boot_info != NULL, "multiboot magic seen");
	report((efer() & EFER_LMA) != 0, "long mode active (EFER.LMA set)");
	report((cr0() & CR0_PG) && (cr4() & CR4_PAE), "paging enabled with PAE");

	report(idt_limit() == 256 * 16 - 1, "IDT loaded with 256 gates");

	test_memory_map();
	test_allocator();
	test_string();
	test_printf();

	exit(report_summary());
}
