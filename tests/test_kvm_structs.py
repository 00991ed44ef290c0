"""Every ctypes KVM structure against the kernel's own numbers.

Two independent witnesses: the ioctl request numbers as <linux/kvm.h> defines
them (which encode the argument size), and a C program compiled against the
installed header that prints sizes and offsets.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmikit.kvm import api, ioctl, structs

# (Python constant, ctypes struct, header macro). The header computes the request from sizeof(struct).
IOCTLS = [
    ("KVM_GET_SUPPORTED_CPUID", structs.KvmCpuid2),
    ("KVM_SET_USER_MEMORY_REGION", structs.KvmUserspaceMemoryRegion),
    ("KVM_SET_IDENTITY_MAP_ADDR", ctypes.c_uint64),
    ("KVM_GET_REGS", structs.KvmRegs),
    ("KVM_SET_REGS", structs.KvmRegs),
    ("KVM_GET_SREGS", structs.KvmSregs),
    ("KVM_SET_SREGS", structs.KvmSregs),
    ("KVM_GET_MSRS", structs.KvmMsrs),
    ("KVM_SET_MSRS", structs.KvmMsrs),
    ("KVM_SET_CPUID2", structs.KvmCpuid2),
    ("KVM_GET_VCPU_EVENTS", structs.KvmVcpuEvents),
    ("KVM_GET_DEBUGREGS", structs.KvmDebugregs),
    ("KVM_SET_DEBUGREGS", structs.KvmDebugregs),
    ("KVM_IRQ_LINE", structs.KvmIrqLevel),
    ("KVM_CREATE_PIT2", structs.KvmPitConfig),
    ("KVM_GET_MP_STATE", structs.KvmMpState),
    ("KVM_SET_MP_STATE", structs.KvmMpState),
    ("KVM_GET_LAPIC", structs.KvmLapicState),
    ("KVM_SET_GUEST_DEBUG", structs.KvmGuestDebug),
]
PLAIN_IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
                "KVM_CREATE_VCPU", "KVM_SET_TSS_ADDR", "KVM_RUN", "KVM_GET_TSC_KHZ", "KVM_CREATE_IRQCHIP"]

# Published request numbers (x86-64), as a witness that needs no compiler.
KNOWN = {
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
}

STRUCT_SIZES = {  # C name -> ctypes struct
    "kvm_regs": structs.KvmRegs, "kvm_sregs": structs.KvmSregs, "kvm_segment": structs.KvmSegment,
    "kvm_dtable": structs.KvmDtable, "kvm_vcpu_events": structs.KvmVcpuEvents,
    "kvm_sync_regs": structs.KvmSyncRegs, "kvm_userspace_memory_region": structs.KvmUserspaceMemoryRegion,
    "kvm_cpuid2": structs.KvmCpuid2, "kvm_cpuid_entry2": structs.KvmCpuidEntry2,
    "kvm_msrs": structs.KvmMsrs, "kvm_debugregs": structs.KvmDebugregs, "kvm_msr_entry": structs.KvmMsrEntry, "kvm_run": structs.KvmRun,
    "kvm_irq_level": structs.KvmIrqLevel, "kvm_pit_config": structs.KvmPitConfig, "kvm_mp_state": structs.KvmMpState,
    "kvm_lapic_state": structs.KvmLapicState, "kvm_guest_debug": structs.KvmGuestDebug,
}
RUN_OFFSETS = ["immediate_exit", "exit_reason", "kvm_valid_regs", "kvm_dirty_regs", "s"]


@pytest.mark.parametrize("name,struct", IOCTLS)
def test_struct_size_matches_ioctl_number(name: str, struct: type) -> None:
    request = getattr(api, name)
    assert ioctl.ioc_size(request) == ctypes.sizeof(struct)
    if name in KNOWN:
        assert request == KNOWN[name]
        assert ioctl.ioc_size(KNOWN[name]) == ctypes.sizeof(struct)


def test_sizes_documented_in_design() -> None:
    assert ctypes.sizeof(structs.KvmSegment) == 24  # the classic hand-written mistake is 16
    assert structs.KvmRun.s.offset == 304


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or <linux/kvm.h> missing (apt-get install gcc linux-libc-dev)")
    lines = ["#include <linux/kvm.h>", "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
    for cname in STRUCT_SIZES:
        lines.append(f'printf("sizeof_{cname} %zu\\n", sizeof(struct {cname}));')
    for field in RUN_OFFSETS:
        lines.append(f'printf("run_{field} %zu\\n", offsetof(struct kvm_run, {field}));')
    for name, _ in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for name in PLAIN_IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("kvmh")
    (work / "facts.c").write_text("\n".join(lines))
    subprocess.run([gcc, "-o", str(work / "facts"), str(work / "facts.c")], check=True)
    out = subprocess.run([str(work / "facts")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("cname", sorted(STRUCT_SIZES))
def test_struct_size_matches_kernel_header(header_facts: dict[str, int], cname: str) -> None:
    assert ctypes.sizeof(STRUCT_SIZES[cname]) == header_facts[f"sizeof_{cname}"]


@pytest.mark.parametrize("field", RUN_OFFSETS)
def test_kvm_run_offsets_match_kernel_header(header_facts: dict[str, int], field: str) -> None:
    assert getattr(structs.KvmRun, field).offset == header_facts[f"run_{field}"]


@pytest.mark.parametrize("name", [n for n, _ in IOCTLS] + PLAIN_IOCTLS)
def test_ioctl_number_matches_kernel_header(header_facts: dict[str, int], name: str) -> None:
    assert getattr(api, name) == header_facts[name]
