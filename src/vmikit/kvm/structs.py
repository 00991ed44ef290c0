"""ctypes mirrors of the KVM structures vmikit uses (x86-64, <linux/kvm.h>).

Sizes are checked against the ioctl numbers in tests/test_kvm_structs.py.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_uint8 as u8, c_uint16 as u16, c_uint32 as u32, c_uint64 as u64


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
        ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class _EventException(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _EventInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _EventNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _EventSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _EventException), ("interrupt", _EventInterrupt), ("nmi", _EventNmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _EventSmi),
        ("triple_fault_pending", u8), ("reserved", u8 * 26), ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class KvmSyncRegs(ctypes.Structure):
    _fields_ = [("regs", KvmRegs), ("sregs", KvmSregs), ("events", KvmVcpuEvents)]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class KvmGuestDebug(ctypes.Structure):
    """struct kvm_guest_debug (KVM_SET_GUEST_DEBUG): KVM_GUESTDBG_* flags and DR0-DR7 for hardware breakpoints."""

    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
        ("memory_size", u64), ("userspace_addr", u64),
    ]


KVM_MEM_READONLY = 1 << 1


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class KvmCpuid2(ctypes.Structure):
    """Header only; entries follow it in memory (see cpuid2_buffer)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_buffer(nent: int) -> tuple[ctypes.Array[c_char], KvmCpuid2, ctypes.Array[KvmCpuidEntry2]]:
    """One buffer holding a kvm_cpuid2 header followed by ``nent`` entries."""
    buf = ctypes.create_string_buffer(ctypes.sizeof(KvmCpuid2) + nent * ctypes.sizeof(KvmCpuidEntry2))
    header = KvmCpuid2.from_buffer(buf)
    header.nent = nent
    entries = (KvmCpuidEntry2 * nent).from_buffer(buf, ctypes.sizeof(KvmCpuid2))
    return buf, header, entries


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrs(ctypes.Structure):
    """Header only; entries follow it in memory (see msrs_buffer)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(indices: list[int]) -> tuple[ctypes.Array[c_char], ctypes.Array[KvmMsrEntry]]:
    buf = ctypes.create_string_buffer(ctypes.sizeof(KvmMsrs) + len(indices) * ctypes.sizeof(KvmMsrEntry))
    KvmMsrs.from_buffer(buf).nmsrs = len(indices)
    entries = (KvmMsrEntry * len(indices)).from_buffer(buf, ctypes.sizeof(KvmMsrs))
    for entry, index in zip(entries, indices):
        entry.index = index
    return buf, entries


# --- in-kernel interrupt controllers and PIT ---------------------------------


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1  # an AP before INIT/SIPI
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3

KVM_LAPIC_REGS_SIZE = 0x400


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", c_char * KVM_LAPIC_REGS_SIZE)]


# --- struct kvm_run -------------------------------------------------------


class _ExitIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _ExitMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _ExitDebug(ctypes.Structure):
    """struct kvm_debug_exit_arch (KVM_EXIT_DEBUG): the exception (1 = #DB, 3 = #BP), its RIP, DR6, DR7."""

    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _ExitUnion(ctypes.Union):
    _fields_ = [
        ("io", _ExitIo), ("mmio", _ExitMmio), ("fail_entry", _ExitFailEntry),
        ("internal", _ExitInternal), ("padding", c_char * 256),
        ("debug", _ExitDebug),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _SyncUnion(ctypes.Union):
    _fields_ = [("regs", KvmSyncRegs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class KvmRun(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
        ("cr8", u64), ("apic_base", u64),
        ("exit", _ExitUnion),
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
        ("s", _SyncUnion),
    ]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# Exit reasons (the subset vmikit distinguishes).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "unknown", KVM_EXIT_EXCEPTION: "exception", KVM_EXIT_IO: "io",
    KVM_EXIT_DEBUG: "debug", KVM_EXIT_HLT: "hlt", KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_SHUTDOWN: "shutdown", KVM_EXIT_FAIL_ENTRY: "fail_entry", KVM_EXIT_INTR: "intr",
    KVM_EXIT_INTERNAL_ERROR: "internal_error", KVM_EXIT_SYSTEM_EVENT: "system_event",
}

KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
