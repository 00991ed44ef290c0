"""File-descriptor level handles on /dev/kvm: the system, one VM, one vCPU.

ioctls go through libc via ctypes (the GIL is released during KVM_RUN, so a
watchdog thread can kick the vCPU). Errors come back as OSError with errno.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Final

from vmikit.errors import HostError
from vmikit.kvm import ioctl as ioc
from vmikit.kvm.structs import (
    KVM_MEM_READONLY, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
    KvmCpuid2, KvmDebugregs, KvmDtable, KvmGuestDebug, KvmIrqLevel, KvmLapicState, KvmMpState, KvmMsrs, KvmPitConfig, KvmRegs,
    KvmRun, KvmSregs, KvmUserspaceMemoryRegion, KvmVcpuEvents, cpuid2_buffer, msrs_buffer,
)

KVM_API_VERSION_EXPECTED: Final = 12


class KvmMsi(ctypes.Structure):
    """struct kvm_msi (KVM_SIGNAL_MSI): one MSI write, delivered by the in-kernel LAPICs."""

    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32), ("data", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


IOAPIC_NUM_PINS: Final = 24
KVM_IRQCHIP_IOAPIC: Final = 2  # kvm_irqchip.chip_id of the in-kernel IOAPIC (0, 1: the PICs)


class KvmIoapicState(ctypes.Structure):
    _fields_ = [("base_address", ctypes.c_uint64), ("ioregsel", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("irr", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("redirtbl", ctypes.c_uint64 * IOAPIC_NUM_PINS)]


class _IrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("ioapic", KvmIoapicState)]


class KvmIrqchip(ctypes.Structure):
    """struct kvm_irqchip (KVM_GET_IRQCHIP); only the IOAPIC member is spelled out."""

    _fields_ = [("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("chip", _IrqchipUnion)]


# System ioctls.
KVM_GET_API_VERSION = ioc.io(0x00)
KVM_CREATE_VM = ioc.io(0x01)
KVM_CHECK_EXTENSION = ioc.io(0x03)
KVM_GET_VCPU_MMAP_SIZE = ioc.io(0x04)
KVM_GET_SUPPORTED_CPUID = ioc.iowr(0x05, KvmCpuid2)
# VM ioctls.
KVM_CREATE_VCPU = ioc.io(0x41)
KVM_SET_USER_MEMORY_REGION = ioc.iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = ioc.io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = ioc.iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = ioc.io(0x60)
KVM_IRQ_LINE = ioc.iow(0x61, KvmIrqLevel)
KVM_GET_IRQCHIP = ioc.iowr(0x62, KvmIrqchip)
KVM_SIGNAL_MSI = ioc.iow(0xA5, KvmMsi)
KVM_CREATE_PIT2 = ioc.iow(0x77, KvmPitConfig)
# vCPU ioctls.
KVM_RUN = ioc.io(0x80)
KVM_GET_REGS = ioc.ior(0x81, KvmRegs)
KVM_SET_REGS = ioc.iow(0x82, KvmRegs)
KVM_GET_SREGS = ioc.ior(0x83, KvmSregs)
KVM_SET_SREGS = ioc.iow(0x84, KvmSregs)
KVM_GET_MSRS = ioc.iowr(0x88, KvmMsrs)
KVM_SET_MSRS = ioc.iow(0x89, KvmMsrs)
KVM_SET_CPUID2 = ioc.iow(0x90, KvmCpuid2)
KVM_GET_LAPIC = ioc.ior(0x8E, KvmLapicState)
KVM_GET_MP_STATE = ioc.ior(0x98, KvmMpState)
KVM_SET_MP_STATE = ioc.iow(0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = ioc.ior(0x9F, KvmVcpuEvents)
KVM_GET_DEBUGREGS = ioc.ior(0xA1, KvmDebugregs)
KVM_SET_DEBUGREGS = ioc.iow(0xA2, KvmDebugregs)
KVM_GET_TSC_KHZ = ioc.io(0xA3)
KVM_SET_GUEST_DEBUG = ioc.iow(0x9B, KvmGuestDebug)

# Capabilities vmikit needs (KVM_CHECK_EXTENSION numbers).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SYNC_REGS = 74
KVM_CAP_READONLY_MEM = 81
KVM_CAP_PIT2 = 33
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_SIGNAL_MSI = 77

REQUIRED_CAPS: Final = {
    "USER_MEMORY": KVM_CAP_USER_MEMORY,
    "EXT_CPUID": KVM_CAP_EXT_CPUID,
    "SYNC_REGS": KVM_CAP_SYNC_REGS,
    "READONLY_MEM": KVM_CAP_READONLY_MEM,
    "IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    "IRQCHIP": KVM_CAP_IRQCHIP,  # the board's LAPIC, IOAPIC and PICs
    "PIT2": KVM_CAP_PIT2,
}
OPTIONAL_CAPS: Final = {"SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR, "GET_TSC_KHZ": KVM_CAP_GET_TSC_KHZ,
                         "SIGNAL_MSI": KVM_CAP_SIGNAL_MSI}  # PCI devices' MSIs (docs/board.md)

SYNC_MASK: Final = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def kvm_ioctl(fd: int, request: int, arg: int | ctypes._CData | ctypes.Array[ctypes.c_char] | None = None) -> int:
    """ioctl(fd, request, arg); retries on EINTR except for KVM_RUN (whose EINTR means "kicked")."""
    if arg is None or isinstance(arg, int):
        ptr: int | None = arg
    else:
        ptr = ctypes.addressof(arg)
    while True:
        ret = _ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err == errno.EINTR and request != KVM_RUN:
            continue
        raise OSError(err, os.strerror(err))


DEFAULT_DEVICE: Final = "/dev/kvm"


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, device: str = DEFAULT_DEVICE) -> None:
        self.device = device
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(
                f"{device} does not exist: KVM is not available on this host",
                "load the kvm module (modprobe kvm_intel or kvm_amd) or run on a machine with hardware virtualization",
            ) from None
        except PermissionError:
            raise HostError(
                f"no permission to open {device}",
                f"run as root or add your user to the group that owns {device} (usually 'kvm')",
            ) from None
        except OSError as exc:
            raise HostError(f"cannot open {device}: {exc.strerror}", "check that it is the KVM device") from None
        try:
            self.api_version = kvm_ioctl(self.fd, KVM_GET_API_VERSION)
        except OSError as exc:
            os.close(self.fd)
            raise HostError(f"{device} does not answer KVM_GET_API_VERSION ({exc.strerror})",
                            "point --device at the real KVM device") from None
        if self.api_version != KVM_API_VERSION_EXPECTED:
            os.close(self.fd)
            raise HostError(f"{device} speaks KVM API {self.api_version}, vmikit needs {KVM_API_VERSION_EXPECTED}",
                            "use a Linux kernel with the stable KVM API")

    def check_extension(self, cap: int) -> int:
        return kvm_ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def missing_caps(self) -> list[str]:
        return [name for name, cap in REQUIRED_CAPS.items() if self.check_extension(cap) <= 0]

    def vcpu_mmap_size(self) -> int:
        return kvm_ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> tuple[ctypes.Array[ctypes.c_char], KvmCpuid2]:
        nent = 128
        while True:
            buf, header, _ = cpuid2_buffer(nent)
            try:
                kvm_ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
                return buf, header
            except OSError as exc:
                if exc.errno != errno.E2BIG or nent >= 4096:
                    raise
                nent *= 2

    def create_vm(self) -> KvmVm:
        return KvmVm(self, kvm_ioctl(self.fd, KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._next_slot = 0
        self._scratch: tuple[int, mmap.mmap, int] | None = None

    def set_memory_region(self, gpa: int, size: int, host_addr: int, readonly: bool) -> int:
        region = KvmUserspaceMemoryRegion(
            slot=self._next_slot, flags=KVM_MEM_READONLY if readonly else 0,
            guest_phys_addr=gpa, memory_size=size, userspace_addr=host_addr,
        )
        kvm_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        self._next_slot += 1
        return region.slot

    def zap_translations(self, scratch_gpa: int) -> None:
        """Make KVM drop every translation it has cached for this VM (its shadow page tables).

        Deleting a memory slot makes x86 KVM zap all shadow pages (the default SLOT_ZAP_ALL
        quirk); a one-page scratch slot kept for this, deleted and re-created, is the cheapest
        slot to do it with. Measured on kvm_pvm: 115-380 us (docs/execution-model.md).
        """
        if self._scratch is None:
            buf = mmap.mmap(-1, mmap.PAGESIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._scratch = (self._next_slot, buf, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
            self._next_slot += 1
            self._scratch_region(scratch_gpa, mmap.PAGESIZE)
        self._scratch_region(scratch_gpa, 0)  # the deletion is what zaps
        self._scratch_region(scratch_gpa, mmap.PAGESIZE)

    def _scratch_region(self, gpa: int, size: int) -> None:
        assert self._scratch is not None
        slot, _buf, addr = self._scratch
        kvm_ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, KvmUserspaceMemoryRegion(
            slot=slot, flags=KVM_MEM_READONLY, guest_phys_addr=gpa, memory_size=size, userspace_addr=addr))

    def set_tss_addr(self, addr: int) -> None:
        kvm_ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        kvm_ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """KVM's own LAPIC (per vCPU, at 0xFEE00000), IOAPIC (0xFEC00000) and the two 8259 PICs,
        with the default routing: GSI 0-15 to both the PICs and IOAPIC pins 0-15. Before any vCPU."""
        kvm_ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit(self) -> None:
        """KVM's 8254 PIT on ports 0x40-0x43 (and the speaker gate at 0x61), wired to GSI 0."""
        kvm_ioctl(self.fd, KVM_CREATE_PIT2, KvmPitConfig(flags=0))

    def irq_line(self, irq: int, level: bool) -> None:
        kvm_ioctl(self.fd, KVM_IRQ_LINE, KvmIrqLevel(irq=irq, level=int(level)))

    def signal_msi(self, address: int, data: int) -> bool:
        """Deliver an MSI write to the in-kernel LAPICs; False if no LAPIC accepted it (KVM's 0)."""
        msi = KvmMsi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32 & 0xFFFFFFFF, data=data & 0xFFFFFFFF)
        return kvm_ioctl(self.fd, KVM_SIGNAL_MSI, msi) > 0

    def ioapic_redirection(self) -> list[int]:
        """The in-kernel IOAPIC's 24 redirection table entries, as the guest last wrote them."""
        chip = KvmIrqchip(chip_id=KVM_IRQCHIP_IOAPIC)
        kvm_ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return list(chip.chip.ioapic.redirtbl)

    def create_vcpu(self, index: int) -> KvmVcpu:
        return KvmVcpu(self, kvm_ioctl(self.fd, KVM_CREATE_VCPU, index))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVcpu:
    """A vCPU with its kvm_run page mapped; registers travel through sync_regs."""

    def __init__(self, vm: KvmVm, fd: int) -> None:
        self.vm = vm
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = KvmRun.from_buffer(self._map)
        self.run_addr = ctypes.addressof(self.run_struct)
        # Ask KVM to copy registers out on every exit, so a port exit needs no KVM_GET_REGS.
        self.run_struct.kvm_valid_regs = SYNC_MASK
        self.regs: KvmRegs = self.run_struct.s.regs.regs

    def set_cpuid(self, buf: ctypes.Array[ctypes.c_char]) -> None:
        kvm_ioctl(self.fd, KVM_SET_CPUID2, buf)

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        kvm_ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        kvm_ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        kvm_ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        kvm_ioctl(self.fd, KVM_SET_SREGS, sregs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf, entries = msrs_buffer(indices)
        got = kvm_ioctl(self.fd, KVM_GET_MSRS, buf)
        return {entries[i].index: entries[i].data for i in range(got)}

    def set_msrs(self, values: dict[int, int]) -> int:
        buf, entries = msrs_buffer(list(values))
        for entry in entries:
            entry.data = values[entry.index]
        return kvm_ioctl(self.fd, KVM_SET_MSRS, buf)

    def get_events(self) -> KvmVcpuEvents:
        events = KvmVcpuEvents()
        kvm_ioctl(self.fd, KVM_GET_VCPU_EVENTS, events)
        return events

    def mp_state(self) -> int:
        state = KvmMpState()
        kvm_ioctl(self.fd, KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        kvm_ioctl(self.fd, KVM_SET_MP_STATE, KvmMpState(mp_state=mp_state))

    def get_lapic(self) -> bytes:
        state = KvmLapicState()
        kvm_ioctl(self.fd, KVM_GET_LAPIC, state)
        return bytes(state.regs)

    def get_debugregs(self) -> KvmDebugregs:
        dregs = KvmDebugregs()
        kvm_ioctl(self.fd, KVM_GET_DEBUGREGS, dregs)
        return dregs

    def set_debugregs(self, dregs: KvmDebugregs) -> None:
        kvm_ioctl(self.fd, KVM_SET_DEBUGREGS, dregs)

    def tsc_khz(self) -> int:
        return kvm_ioctl(self.fd, KVM_GET_TSC_KHZ)

    def set_guest_debug(self, control: int, debugreg: tuple[int, ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` is KVM_GUESTDBG_* flags, ``debugreg`` DR0-DR7 (hardware breakpoints)."""
        dbg = KvmGuestDebug(control=control)
        for i, value in enumerate(debugreg[:8]):
            dbg.debugreg[i] = value
        kvm_ioctl(self.fd, KVM_SET_GUEST_DEBUG, dbg)

    def close(self) -> None:
        if self.fd >= 0:
            del self.regs, self.run_struct
            try:
                self._map.close()
            except BufferError:
                pass  # a view still lives (say, in a traceback): the page goes with its last view
            os.close(self.fd)
            self.fd = -1


# Re-exported for callers that build descriptor tables.
__all__ = ["Kvm", "KvmVm", "KvmVcpu", "kvm_ioctl", "KvmDtable", "KVM_RUN"]
