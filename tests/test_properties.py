"""Properties (hypothesis) of the three parsers a guest feeds: the call-ID decoder, the page-table
validator and the batch parser. tests/test_pagetables.py already runs a state machine of
registrations and updates over chosen frames; here the inputs are arbitrary 64-bit values and bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dispatch import ERR, StandInVcpu
from test_pagetables import SHADOW, memory, table

from vmikit.abi import load_spec
from vmikit.abi.callid import CALLID_MAX, CallId, encode
from vmikit.hypervisor import Hypervisor
from vmikit.hypervisor.mmu import BATCH_ENTRY, DirectMmu, ShadowMmu
from vmikit.hypervisor.pagetables import RW, A, D, P, PageTables

SPEC = load_spec()
U64 = st.integers(0, 2**64 - 1)
FLUSH_QUEUE = SPEC.by_name("MMU.FlushQueue").call_id()
SET_PTE = SPEC.by_name("MMU.SetPTE").call_id()
BATCH_AT = 0x1000  # in the low RAM region of test_pagetables.memory()
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- call IDs ----------------------------------------------------------------------------------

@given(st.integers(0, CALLID_MAX))
def test_callid_decode_encode_round_trip(value: int) -> None:
    cid = CallId.decode(value)
    assert cid.encode() == value == int(cid)
    assert all(0 <= f <= 0xFF for f in (cid.family, cid.call, cid.reserved, cid.annotation))
    assert cid.without_annotation().encode() == value & ~0xFF
    assert cid.with_annotation(0x5A).annotation == 0x5A


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=CALLID_MAX + 1), st.booleans()))
def test_callid_decode_rejects_what_is_not_32_bits(value: int) -> None:
    with pytest.raises(ValueError):
        CallId.decode(value)


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_callid_encode_fields(family: int, call: int, annotation: int) -> None:
    value = encode(family, call, annotation)
    assert (value >> 24, value >> 16 & 0xFF, value >> 8 & 0xFF, value & 0xFF) == (family, call, 0, annotation)


@given(st.integers(0, CALLID_MAX))
def test_dispatcher_answers_every_call_id_with_a_spec_error(value: int) -> None:
    """Any 32-bit ID with hostile arguments: a documented status, never an exception."""
    hv, vcpu = _hypervisor(DirectMmu(memory()))
    if value & 0xFF00:
        assert _call(hv, vcpu, value, 0, 0)[0] == ERR["RESERVED_BITS"]
    if value >> 16 == 0x010E:  # CPU.Shutdown stops the run by design
        return
    status, _ = _call(hv, vcpu, value, 2**64 - 1, 2**63)
    assert status in set(ERR.values()) and hv.handler_failures == []


# --- the page-table validator -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tables() -> PageTables:
    m = DirectMmu(memory())
    for n, level in enumerate((4, 3, 2, 1)):
        assert m.allocate(table(n), level) is None
    return m.tables


@FAST
@given(level=st.integers(-2, 7), value=U64)
def test_check_never_raises_and_names_a_spec_error(tables: PageTables, level: int, value: int) -> None:
    error = tables.check(level, value)
    assert error is None or error in SPEC.errors


@FAST
@given(n=st.integers(0, 3), index=st.integers(0, 511), value=U64, shadow=st.booleans())
def test_accepted_entries_keep_the_audit_clean(n: int, index: int, value: int, shadow: bool) -> None:
    m = ShadowMmu(memory(), SHADOW, 0x100000) if shadow else DirectMmu(memory())
    for k, level in enumerate((4, 3, 2, 1)):
        assert m.allocate(table(k), level) is None
    ptep = table(n) + 8 * index
    if m.check_pte(ptep, value) is None:
        m.apply_pte(ptep, value)
    assert m.audit() == []


@FAST
@given(ptep=U64, value=U64)
def test_check_pte_never_raises_for_any_address(ptep: int, value: int) -> None:
    m = DirectMmu(memory())
    error = m.check_pte(ptep, value)
    assert error is None or error in SPEC.errors


# --- the batch parser (MMU.FlushQueue) --------------------------------------------------------------

def _hypervisor(mmu: DirectMmu) -> tuple[Hypervisor, StandInVcpu]:
    vcpu = StandInVcpu()
    hv = Hypervisor(SPEC, mmu=mmu)
    hv.attach(mmu.memory, vcpu)  # type: ignore[arg-type]
    return hv, vcpu


def _call(hv: Hypervisor, vcpu: StandInVcpu, call_id: int, a0: int, a1: int) -> tuple[int, tuple[int, ...]]:
    vcpu.regs.rdi, vcpu.regs.rsi, vcpu.regs.rdx = a0, a1, 0
    hv.on_hypercall(0xF8, 4, call_id)
    r = vcpu.regs
    return r.rax, (r.r8, r.r9, r.r10, r.r11)


def _mmu_with_tables() -> DirectMmu:
    m = DirectMmu(memory())
    for k, level in enumerate((4, 3, 2, 1, 1)):
        assert m.allocate(table(k), level) is None
    m.apply_pte(table(2), table(3) | P | RW)
    return m


def _tables_snapshot(m: DirectMmu) -> bytes:
    return m.memory.read(table(0), 5 * 0x1000)


@FAST
@given(raw=st.binary(max_size=40 * 32), count=st.integers(0, 300))
def test_arbitrary_bytes_as_a_batch_never_raise_and_change_nothing_if_refused(raw: bytes, count: int) -> None:
    m = _mmu_with_tables()
    hv, vcpu = _hypervisor(m)
    m.memory.write(BATCH_AT, raw)
    before = _tables_snapshot(m)
    status, _ = _call(hv, vcpu, FLUSH_QUEUE, BATCH_AT, count)
    assert hv.handler_failures == [] and status in set(ERR.values())
    if status != 0:
        assert _tables_snapshot(m) == before
    assert m.audit() == []


entry = st.tuples(
    st.sampled_from([SET_PTE, SET_PTE | 1, SPEC.by_name("MMU.SetLongPTE").call_id(), SET_PTE | 0x100,
                     SPEC.by_name("CPU.GetCR0").call_id(), 0xFFFFFFFF]),
    st.sampled_from([0, 0, 0, 1]),  # reserved word
    st.one_of(st.builds(lambda t, i: table(t) + 8 * i, st.integers(0, 4), st.integers(0, 511)), U64),
    st.one_of(st.builds(lambda f, fl: f | fl, st.sampled_from([table(3), table(4), 0x300000, 0xC0000, 0x400000]),
                        st.sampled_from([0, P, P | RW, P | RW | A | D, P | 0x80])), U64),
    U64,
)


@FAST
@given(entries=st.lists(entry, min_size=1, max_size=20))
def test_a_batch_applies_all_or_nothing(entries: list[tuple[int, int, int, int, int]]) -> None:
    m = _mmu_with_tables()
    hv, vcpu = _hypervisor(m)
    m.memory.write(BATCH_AT, b"".join(BATCH_ENTRY.pack(*e) for e in entries))
    before = _tables_snapshot(m)
    status, results = _call(hv, vcpu, FLUSH_QUEUE, BATCH_AT, len(entries))
    assert hv.handler_failures == []
    if status == 0:
        assert results[0] == len(entries)
        last: dict[int, int] = {}
        for _, _, ptep, value, _ in entries:
            last[ptep] = value
        for ptep, value in last.items():
            assert m.memory.read_u64(ptep) & ~(A | D) == value & ~(A | D)
    else:
        assert status == ERR["BATCH_INVALID"]
        assert results[0] < len(entries) and results[1] & 2**63  # the index and a (negative) error
        assert _tables_snapshot(m) == before
    assert m.audit() == []
