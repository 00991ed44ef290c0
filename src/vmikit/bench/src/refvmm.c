/*
 * refvmm: the C reference VMM of `vmikit bench` (docs/bench.md).
 *
 * The smallest KVM exit loop that runs vmikit's bench guest: one vCPU, one
 * memory slot, the registers through sync_regs (as the Python VMM does), and
 * the board's ports -- 0x3f8 console (to stdout), 0x3fd line status, 0xf4 exit,
 * 0xf8 hypercall (answered RAX = 0, results 0; no dispatch at all), anything
 * else dropped.  Its cost per exit is the floor the Python VMM is compared with.
 *
 *   refvmm IMAGE ENTRY INFO_ADDR MEM_MIB
 *
 * IMAGE is guest memory from address 0 as vmikit's own loader lays it out
 * (multiboot info, ROM, kernel); the vCPU starts in the multiboot state:
 * 32-bit flat protected mode, EAX = 0x2BADB002, EBX = INFO_ADDR.
 * On exit: stdout has the guest's console, stderr one line
 * "REFVMM status=S exits=N hypercalls=H wall_ns=W tsc_khz=K".
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "refvmm: %s: %s\n", what, strerror(errno));
	exit(100);
}

static struct kvm_segment flat(uint16_t selector, uint8_t type)
{
	struct kvm_segment s = { .base = 0, .limit = 0xFFFFFFFF, .selector = selector, .type = type,
				 .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
	return s;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: refvmm IMAGE ENTRY INFO_ADDR MEM_MIB\n");
		return 100;
	}
	uint64_t entry = strtoull(argv[2], NULL, 0), info = strtoull(argv[3], NULL, 0);
	size_t mem_size = (size_t)strtoull(argv[4], NULL, 0) << 20;

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000ul) < 0)
		die("KVM_SET_TSS_ADDR");
	uint64_t idmap = 0xFFFBC000ull;
	if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0)
		die("KVM_SET_IDENTITY_MAP_ADDR");

	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	int img = open(argv[1], O_RDONLY);
	if (img < 0)
		die("open image");
	struct stat st;
	if (fstat(img, &st) < 0 || (size_t)st.st_size > mem_size)
		die("image size");
	for (size_t done = 0; done < (size_t)st.st_size;) {
		ssize_t n = read(img, mem + done, (size_t)st.st_size - done);
		if (n <= 0)
			die("read image");
		done += (size_t)n;
	}
	close(img);
	struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
						      .userspace_addr = (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	int nent = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = (uint32_t)nent;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs = flat(0x08, 0xB);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat(0x10, 0x3);
	sregs.cr0 = 0x11;
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = entry, .rax = 0x2BADB002, .rbx = info, .rflags = 0x2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
	int tsc_khz = ioctl(vcpu, KVM_GET_TSC_KHZ, 0);

	run->kvm_valid_regs = KVM_SYNC_X86_REGS;
	static char out[1 << 16];
	size_t nout = 0;
	uint64_t exits = 0, hypercalls = 0;
	int status = -1;
	uint64_t start = now_ns();
	uint64_t user_ns = 0, returned = 0; /* the VMM's own time: from each KVM_RUN return to the next call */
	while (status < 0) {
		if (returned)
			user_ns += now_ns() - returned;
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		returned = now_ns();
		exits++;
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			if (run->io.direction == KVM_EXIT_IO_OUT) {
				if (run->io.port == 0xF8) {
					struct kvm_regs *r = &run->s.regs.regs;
					hypercalls++;
					r->rax = 0;
					r->r8 = r->r9 = r->r10 = r->r11 = 0;
					run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
				} else if (run->io.port == 0x3F8) {
					for (uint32_t i = 0; i < run->io.count && nout < sizeof(out); i++)
						out[nout++] = (char)data[i * run->io.size];
				} else if (run->io.port == 0xF4) {
					uint32_t code = 0;
					memcpy(&code, data, run->io.size < 4 ? run->io.size : 4);
					status = (int)(code & 0xFF);
				}
			} else {
				memset(data, run->io.port == 0x3FD ? 0x60 : 0xFF, (size_t)run->io.size * run->io.count);
			}
			break;
		}
		case KVM_EXIT_MMIO:
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xFF, sizeof(run->mmio.data));
			break;
		default:
			fwrite(out, 1, nout, stdout);
			fprintf(stderr, "refvmm: unexpected exit reason %u after %llu exits\n", run->exit_reason,
				(unsigned long long)exits);
			return 101;
		}
	}
	uint64_t wall = now_ns() - start;
	fwrite(out, 1, nout, stdout);
	fflush(stdout);
	fprintf(stderr, "REFVMM status=%d exits=%llu hypercalls=%llu wall_ns=%llu tsc_khz=%d user_ns=%llu\n", status,
		(unsigned long long)exits, (unsigned long long)hypercalls, (unsigned long long)wall, tsc_khz,
		(unsigned long long)user_ns);
	return status;
}
