"""The dispatcher, driven the way the port handler is: call ID in, registers out.

A stand-in vCPU holds the registers; the real guest-level checks are in
test_conformance.py. Here every call in the spec and every legacy number is
enumerated, which a guest run cannot do cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, strategies as st

from vmikit.abi import load_spec
from vmikit.abi.model import U64_MASK
from vmikit.engine import ControlState, DescriptorTable, Segment, StopRun
from vmikit.hypervisor import ExperimentalCalls, HypercallError, Hypervisor
from vmikit.kvm.structs import KvmRegs
from vmikit.memory import GuestMemory, Region

SPEC = load_spec()
ERR = {name: value & U64_MASK for name, value in SPEC.errors.items()}
NULL_SEG = Segment(selector=0, base=0, limit=0, type=0, present=False)


@dataclass
class StandInVcpu:
    regs: KvmRegs = field(default_factory=KvmRegs)
    control: ControlState = field(default_factory=lambda: ControlState(
        cr0=0x80000011, cr2=0, cr3=0x1000, cr4=0x20, efer=0x500,
        gdt=DescriptorTable(0, 0), idt=DescriptorTable(0, 0), ldt=NULL_SEG, tr=NULL_SEG))
    msrs: dict[int, int] = field(default_factory=lambda: {0x10: 12345, 0xC0000080: 0x500})
    dirty: int = 0

    def cpl(self) -> int:
        return 0  # the kernel: these tests call as the guest kernel

    def mark_regs_dirty(self) -> None:
        self.dirty += 1

    def get_control(self) -> ControlState:
        return self.control

    def set_control(self, **changes: object) -> None:
        self.control = ControlState(**{**self.control.__dict__, **{k: v for k, v in changes.items() if v is not None}})

    def get_msr(self, index: int) -> int | None:
        return self.msrs.get(index)

    def set_msr(self, index: int, value: int) -> bool:
        self.msrs[index] = value
        return True

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return (leaf, subleaf, 7, 9)


@pytest.fixture()
def hv() -> tuple[Hypervisor, StandInVcpu]:
    memory = GuestMemory()
    memory.add(Region(0, 0x10000))
    vcpu = StandInVcpu()
    hypervisor = Hypervisor(SPEC)
    hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
    return hypervisor, vcpu


def call(hv: tuple[Hypervisor, StandInVcpu], call_id: int, *args: int) -> tuple[int, tuple[int, int, int, int]]:
    hypervisor, vcpu = hv
    vcpu.regs.rdi, vcpu.regs.rsi, vcpu.regs.rdx = (list(args) + [0, 0, 0])[:3]
    hypervisor.on_hypercall(0xF8, 4, call_id)
    r = vcpu.regs
    return r.rax, (r.r8, r.r9, r.r10, r.r11)


def test_every_spec_call_has_a_handler(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    from vmikit.hypervisor.cpu import UNIMPLEMENTED

    hypervisor, _ = hv
    missing = {c.qualified_name for c in SPEC.calls() if hypervisor.route_for(c.call_id()) is None}
    assert missing == UNIMPLEMENTED
    query_call = SPEC.by_name("Query.QueryCall").call_id()
    for name in UNIMPLEMENTED:
        assert call(hv, query_call, SPEC.by_name(name).call_id()) == (0, (0, 0, 0, 0))


@pytest.mark.parametrize("number", sorted(SPEC.legacy))
def test_legacy_number_reaches_the_family_handler(hv: tuple[Hypervisor, StandInVcpu], number: int) -> None:
    hypervisor, _ = hv
    family_call = SPEC.legacy[number]
    legacy_route = hypervisor.route_for(number << 16)
    assert legacy_route is hypervisor.route_for(family_call.call_id())
    from vmikit.hypervisor.cpu import UNIMPLEMENTED

    assert (legacy_route is None) == (family_call.qualified_name in UNIMPLEMENTED)


@pytest.mark.parametrize("number", sorted(SPEC.legacy_only))
def test_legacy_only_numbers_are_not_supported(hv: tuple[Hypervisor, StandInVcpu], number: int) -> None:
    assert call(hv, number << 16)[0] == ERR["NOT_SUPPORTED"]


def test_legacy_and_family_ids_give_the_same_answer(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    family = SPEC.by_name("CPU.CPUID").call_id()
    assert call(hv, family, 4, 2) == call(hv, 0 << 24 | 0 << 16, 4, 2) == (0, (4, 2, 7, 9))
    assert call(hv, SPEC.by_name("CPU.GetCR3").call_id())[1][0] == 0x1000
    assert call(hv, 21 << 16)[1][0] == 0x1000  # legacy GetCR3


@given(reserved=st.integers(1, 0xFF), annotation=st.integers(0, 0xFF))
def test_reserved_bits_give_the_documented_error(reserved: int, annotation: int) -> None:
    memory = GuestMemory()
    memory.add(Region(0, 0x1000))
    vcpu = StandInVcpu()
    hypervisor = Hypervisor(SPEC)
    hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
    for c in (SPEC.by_name("CPU.GetCR0"), SPEC.by_name("MMU.SetPTE")):
        status, _ = call((hypervisor, vcpu), c.call_id() | reserved << 8 | annotation, 0x100, 5)
        assert status == ERR["RESERVED_BITS"]
    assert memory.read_u64(0x100) == 0  # and nothing happened


@pytest.mark.parametrize("call_id", [0x07000000, 0x01FF0000, 0x03FE0000, 0x04200000, 0xFF010000, 0x00FF0000])
def test_unknown_family_or_call_is_not_supported(hv: tuple[Hypervisor, StandInVcpu], call_id: int) -> None:
    assert call(hv, call_id)[0] == ERR["NOT_SUPPORTED"]


@given(annotation=st.integers(1, 0xFF))
def test_unknown_annotation_bits_leave_behaviour_unchanged(annotation: int) -> None:
    outcomes = []
    for ann in (0, annotation):
        memory = GuestMemory()
        memory.add(Region(0, 0x1000))
        vcpu = StandInVcpu()
        hypervisor = Hypervisor(SPEC)
        hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
        status, results = call((hypervisor, vcpu), SPEC.by_name("MMU.SetPTE").call_id(ann), 0x208, 0xABC007)
        cpuid = call((hypervisor, vcpu), SPEC.by_name("CPU.CPUID").call_id(ann), 1, 0)
        outcomes.append((status, results, memory.read(0, 0x1000), cpuid))
    assert outcomes[0] == outcomes[1]


def test_wrong_access_size_is_invalid_argument(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    hypervisor, vcpu = hv
    hypervisor.on_hypercall(0xF8, 1, 0x01)
    assert vcpu.regs.rax == ERR["INVALID_ARGUMENT"]


def test_bad_addresses_are_rejected(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    set_pte = SPEC.by_name("MMU.SetPTE").call_id()
    for ptep in (0x10000, 0x3, 1 << 63, U64_MASK):
        assert call(hv, set_pte, ptep, 1)[0] == ERR["BAD_ADDRESS"]


def test_query_family(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    get_version, has_family, query_call = (SPEC.by_name(n).call_id() for n in
                                           ("Query.GetVersion", "Query.HasFamily", "Query.QueryCall"))
    assert call(hv, get_version)[1][0] == SPEC.version.packed
    assert call(hv, has_family, 0x03)[1][0] == 1
    assert call(hv, has_family, 0x42)[1][0] == 0
    assert call(hv, has_family, 0x100)[0] == ERR["INVALID_ARGUMENT"]
    assert call(hv, query_call, SPEC.by_name("MMU.SetPTE").call_id())[1][0] == 0x100 | 0x01
    assert call(hv, query_call, SPEC.by_name("CPU.GetCR0").call_id(0x01))[1][0] == 0x100
    assert call(hv, query_call, 0x03770000)[1][0] == 0
    assert call(hv, query_call, 0x03000100)[0] == ERR["RESERVED_BITS"]


def test_annotations_ignored_mode_reports_none_honoured() -> None:
    hypervisor = Hypervisor(SPEC, honour_annotations=False)
    route = hypervisor.route_for(SPEC.by_name("MMU.SetPTE").call_id())
    assert route is not None and route.annotations_honoured == 0


def test_experimental_call_registered_from_python() -> None:
    calls = ExperimentalCalls()

    @calls.register(0x07, "MulAdd")
    def mul_add(ctx: object, a: int, b: int, c: int) -> tuple[int, ...]:
        if a == 0:
            raise HypercallError("INVALID_ARGUMENT")
        return (a * b + c, 42)

    memory = GuestMemory()
    memory.add(Region(0, 0x1000))
    vcpu = StandInVcpu()
    hypervisor = Hypervisor(SPEC, experimental=calls)
    hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
    assert call((hypervisor, vcpu), 0xFF070000, 6, 7, 1) == (0, (43, 42, 0, 0))
    assert call((hypervisor, vcpu), 0xFF070000, 0, 7, 1)[0] == ERR["INVALID_ARGUMENT"]
    assert call((hypervisor, vcpu), SPEC.by_name("Query.HasFamily").call_id(), 0xFF)[1][0] == 1
    assert hypervisor.stats()["Experimental.MulAdd"]["calls"] == 2


def test_a_crashing_handler_does_not_crash_the_hypervisor(capsys: pytest.CaptureFixture[str]) -> None:
    calls = ExperimentalCalls()

    @calls.register(0x01, "Buggy")
    def buggy(ctx: object, a: int, b: int, c: int) -> tuple[int, ...]:
        return (1 // a,)

    memory = GuestMemory()
    memory.add(Region(0, 0x1000))
    vcpu = StandInVcpu()
    hypervisor = Hypervisor(SPEC, experimental=calls)
    hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
    assert call((hypervisor, vcpu), 0xFF010000, 0)[0] == ERR["INVALID_ARGUMENT"]
    assert "Experimental.Buggy raised ZeroDivisionError" in capsys.readouterr().err


def test_shutdown_stops_the_run_with_the_code(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    with pytest.raises(StopRun) as stop:
        call(hv, SPEC.by_name("CPU.Shutdown").call_id(), 9)
    assert stop.value.code == 9


def test_msr_writes_outside_the_allowed_set_are_refused(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    wrmsr, rdmsr = SPEC.by_name("CPU.WRMSR").call_id(), SPEC.by_name("CPU.RDMSR").call_id()
    assert call(hv, wrmsr, 0x1B, 0)[0] == ERR["PERMISSION"]  # APIC base
    assert call(hv, wrmsr, 0xC0000080, 0)[0] == ERR["PERMISSION"]  # clearing EFER.LME
    assert call(hv, wrmsr, 0xC0000102, 0x1234)[0] == 0
    assert call(hv, rdmsr, 0xC0000102) == (0, (0x1234, 0, 0, 0))
    assert call(hv, rdmsr, 0xDEAD)[0] == ERR["INVALID_ARGUMENT"]


def test_batch_with_a_bad_entry_applies_nothing(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    from vmikit.hypervisor.mmu import BATCH_ENTRY

    hypervisor, vcpu = hv
    memory = hypervisor._ctx.memory  # type: ignore[union-attr]
    queued = SPEC.by_name("MMU.SetPTE").call_id(0x01)
    entries = [(queued, 0, 0x2000 + 8 * i, 0x5000 | i, 0) for i in range(5)]
    entries[3] = (queued, 0, 0xFFFF_0000, 1, 0)  # outside RAM
    memory.write(0x8000, b"".join(BATCH_ENTRY.pack(*e) for e in entries))
    status, results = call(hv, SPEC.by_name("MMU.FlushQueue").call_id(), 0x8000, 5)
    assert status == ERR["BATCH_INVALID"]
    assert results[:2] == (3, ERR["BAD_ADDRESS"])
    assert memory.read(0x2000, 40) == bytes(40)
    entries[3] = (queued, 0, 0x2018, 0x5003, 0)
    memory.write(0x8000, b"".join(BATCH_ENTRY.pack(*e) for e in entries))
    assert call(hv, SPEC.by_name("MMU.FlushQueue").call_id(), 0x8000, 5) == (0, (5, 0, 0, 0))
    assert [memory.read_u64(0x2000 + 8 * i) for i in range(5)] == [0x5000 | i for i in range(5)]


def test_non_canonical_addresses_never_translate() -> None:
    """Found by fuzzing: a GDT base with bit 54 set walked as if it were canonical (the CPU would #GP)."""
    from vmikit.hypervisor.walk import translate

    memory = GuestMemory()
    memory.add(Region(0, 0x10000))
    memory.write_u64(0x1000, 0x2000 | 0x3)  # PML4[0] -> PDPT
    memory.write_u64(0x2000, 0x0 | 0x83)  # PDPT[0]: 1 GiB identity page
    assert translate(memory, 0x80000011, 0x1000, 0x133000) == 0x133000
    assert translate(memory, 0x80000011, 0x1000, 0x0040_0000_0013_3000) is None
    assert translate(memory, 0x80000011, 0x1000, 0xFFFF_0000_0000_0000) is None



def test_query_call_says_what_has_no_native_fallback_when_deprivileged(hv: tuple[Hypervisor, StandInVcpu]) -> None:
    hypervisor, _ = hv
    query = SPEC.by_name("Query.QueryCall").call_id()
    not_native = SPEC.constants["QUERY_NOT_NATIVE"].value
    ids = {n: SPEC.by_name(n).call_id() for n in ("CPU.EnableInterrupts", "CPU.RDPMC", "CPU.RDTSC")}
    assert all(not call(hv, query, i)[1][0] & not_native for i in ids.values())  # ring 0: every native path works
    assert hypervisor.execution is not None
    hypervisor.execution.deprivileged = True
    assert call(hv, query, ids["CPU.EnableInterrupts"])[1][0] & not_native
    assert call(hv, query, ids["CPU.RDPMC"])[1][0] == not_native  # not implemented, and no rdpmc at ring 3
    assert not call(hv, query, ids["CPU.RDTSC"])[1][0] & not_native  # rdtsc works at ring 3


HIGH = 0xDEAD_BEEF << 32  # bits a 32-bit argument ignores (its type says so)


@pytest.mark.parametrize(("name", "args"), [
    ("CPU.RDMSR", (0x10,)), ("CPU.CPUID", (1, 0)), ("Query.HasFamily", (0x03,)),
    ("Query.QueryCall", (SPEC.by_name("MMU.SetPTE").call_id(),)), ("MMU.FlushTLB", (0,)),
    ("MMU.FlushQueue", (0x1000, 0)), ("MMU.AllocatePage", (0x3000, 1)), ("Segmentation.SetGDT", (0x2000, 0xFF)),
    ("EventChannel.Poll", (0,)),
])
def test_the_upper_half_of_a_32_bit_argument_is_ignored(name: str, args: tuple[int, ...]) -> None:
    """Issue 12 finding 10: a u32 argument with bit 32 or above set was refused by RDMSR, GetDR,
    HasFamily, AllocatePage, FlushQueue, SetGDT and FlushTLB; the spec says the upper half is
    ignored. Each call answers the same with and without those bits."""
    call_ = SPEC.by_name(name)
    high = tuple(a | HIGH if SPEC.types[arg.type].bits == 32 else a for a, arg in zip(args, call_.args))
    assert high != args
    answers = []
    for values in (args, high):
        memory = GuestMemory()
        memory.add(Region(0, 0x10000))
        vcpu = StandInVcpu()
        hypervisor = Hypervisor(SPEC)
        hypervisor.attach(memory, vcpu)  # type: ignore[arg-type]
        answers.append(call((hypervisor, vcpu), call_.call_id(), *values))
    assert answers[0] == answers[1]
