/* Thin wrappers around privileged and special x86-64 instructions. */
#ifndef VMIKIT_X86_H
#define VMIKIT_X86_H

#include <stdint.h>

#define MSR_EFER   0xC0000080u
#define EFER_LME   (1u << 8)
#define EFER_LMA   (1u << 10)
#define CR0_PE     (1ul << 0)
#define CR0_PG     (1ul << 31)
#define CR4_PAE    (1ul << 5)

/* Tells the compiler memory may have changed; emits no instruction. */
#define barrier() __asm__ __volatile__("" ::: "memory")

static inline void outb(uint8_t value, uint16_t port)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(uint16_t value, uint16_t port)
{
	__asm__ __volatile__("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(uint32_t value, uint16_t port)
{
	__asm__ __volatile__("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;
	__asm__ __volatile__("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint16_t inw(uint16_t port)
{
	uint16_t value;
	__asm__ __volatile__("inw %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t value;
	__asm__ __volatile__("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline uint64_t rdmsr(uint32_t index)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
	return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t index, uint64_t value)
{
	__asm__ __volatile__("wrmsr"
			     : : "c"(index), "a"((uint32_t)value), "d"((uint32_t)(value >> 32))
			     : "memory");
}

#define DEFINE_CR_ACCESSORS(n)                                                  \
	static inline uint64_t read_cr##n(void)                                 \
	{                                                                       \
		uint64_t value;                                                 \
		__asm__ __volatile__("mov %%cr" #n ", %0" : "=r"(value));       \
		return value;                                                   \
	}                                                                       \
	static inline void write_cr##n(uint64_t value)                          \
	{                                                                       \
		__asm__ __volatile__("mov %0, %%cr" #n : : "r"(value) : "memory"); \
	}

DEFINE_CR_ACCESSORS(0)
DEFINE_CR_ACCESSORS(2)
DEFINE_CR_ACCESSORS(3)
DEFINE_CR_ACCESSORS(4)
#undef DEFINE_CR_ACCESSORS

static inline void invlpg(const void *addr)
{
	__asm__ __volatile__("invlpg (%0)" : : "r"(addr) : "memory");
}

struct cpuid_result {
	uint32_t eax, ebx, ecx, edx;
};

static inline struct cpuid_result cpuid(uint32_t leaf, uint32_t subleaf)
{
	struct cpuid_result r;
	__asm__ __volatile__("cpuid"
			     : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			     : "a"(leaf), "c"(subleaf));
	return r;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cli(void) { __asm__ __volatile__("cli" ::: "memory"); }
static inline void sti(void) { __asm__ __volatile__("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ __volatile__("hlt" ::: "memory"); }

/* Operand of lidt/sidt/lgdt/sgdt in long mode. */
struct descriptor_ptr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

static inline void lidt(const struct descriptor_ptr *p)
{
	__asm__ __volatile__("lidt %0" : : "m"(*p) : "memory");
}

static inline struct descriptor_ptr sidt(void)
{
	struct descriptor_ptr p;
	__asm__ __volatile__("sidt %0" : "=m"(p));
	return p;
}

static inline struct descriptor_ptr sgdt(void)
{
	struct descriptor_ptr p;
	__asm__ __volatile__("sgdt %0" : "=m"(p));
	return p;
}

#endif
