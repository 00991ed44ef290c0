"""The incremental page-table auditor (pagetables.Auditor, Mmu.auditor()) that `vmikit fuzz` runs
after every call that may change memory: each audit must report exactly what a full audit of the
tables as they are then reports, however the tables, the counts or the registered set changed,
including by writes that bypass the validator (a hypervisor bug, a guest store).

The reference below is the full auditor as it was before it became incremental (an element-by-
element walk of every registered table), kept here so both the new full audit and the incremental
one are compared against an independent implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dispatch import SPEC, StandInVcpu
from test_pagetables import SHADOW, memory, table

from vmikit.fuzz.runner import HypercallWatch
from vmikit.hypervisor import Hypervisor
from vmikit.hypervisor.mmu import DirectMmu, ShadowMmu
from vmikit.hypervisor.pagetables import (ADDR_MASK, ENTRIES, ERRORS, RW, SIZE_OF_LEAF, U64, A, D, P, PageTables,
                                         is_leaf, with_accessed_dirty)

SET_PTE = SPEC.by_name("MMU.SetPTE").call_id()
GET_VERSION = SPEC.by_name("Query.GetVersion").call_id()


def reference_audit(m: DirectMmu) -> list[str]:
    """The auditor before it was incremental (vmikit 0712342), verbatim in substance."""
    t: PageTables = m.tables
    problems: list[str] = []
    refs = np.zeros_like(t.refs)
    writable = {size: np.zeros_like(counts) for size, counts in t.writable.items()}
    for tbl, level in sorted(t.level.items()):
        values = t.entries(tbl)
        errors = t.check_many(np.full(ENTRIES, level), values)
        # Since a3af478: a valid entry of a table the guest cannot write needs its A/D bits set.
        lacking = np.zeros(ENTRIES, bool)
        if t.set_accessed_dirty:
            lacking = (with_accessed_dirty(np.full(ENTRIES, level), values) != values) & (errors == 0)
        for index in np.flatnonzero((errors != 0) | lacking)[:5]:
            problems.append(f"table {tbl:#x} (level {level}) entry {index}: {int(values[index]):#x} "
                            + (f"breaks {ERRORS[errors[index]]}" if errors[index]
                               else "lacks the A/D bits a read-only table needs"))
        for i in np.flatnonzero(values & U64(P)):
            value = int(values[i])
            if value & ADDR_MASK >= t.limit:
                continue
            if is_leaf(level, value):
                if value & RW:
                    size = SIZE_OF_LEAF[level]
                    writable[size][(value & ADDR_MASK) // size] += 1
            else:
                refs[(value & ADDR_MASK) >> 12] += 1
    level = [0] * (len(t.level_of) + 1)
    for tbl, lv in t.level.items():
        level[tbl >> 12] = lv
    kinds = t._kind4.tolist() + [0]
    if (t.level_of.tolist() != level[:-1] or t.fast_level.tolist() != [lv << 12 for lv in level]
            or t.fast_facts.tolist() != [(k * 5 + lv) << 8 for k, lv in zip(kinds, level)]):
        problems.append("per-frame level tables disagree with the registered tables")
    if not np.array_equal(refs, t.refs):
        problems.append("reference counts disagree with the tables")
    if any(not np.array_equal(writable[s], t.writable[s]) for s in writable):
        problems.append("writable-mapping counts disagree with the tables")
    if isinstance(m, ShadowMmu):
        for tbl, page in m.shadow.items():
            level = t.level[tbl]
            want = [m._shadow_value(level, int(v)) for v in t.entries(tbl)]
            if want != [int(v) for v in t.entries(page)]:
                problems.append(f"shadow of table {tbl:#x} disagrees with it")
    return problems


def _mmu(shadow: bool) -> DirectMmu:
    m = ShadowMmu(memory(), SHADOW, 0x100000) if shadow else DirectMmu(memory())
    for n, level in enumerate((4, 3, 2, 1, 1)):
        assert m.allocate(table(n), level) is None
    for n in range(3):
        m.apply_pte(table(n), table(n + 1) | P | RW)
    m.apply_pte(table(2) + 8, table(4) | P | RW)
    return m


TABLES = list(range(8))  # table(0..4) registered by _mmu, 5..7 free pool pages
FRAMES = [table(n) for n in TABLES] + [0x300000, 0x301000, 0x400000, 0xC0000, 0x7FF000, 0x800000, 0]
FLAGS = [0, P, P | RW, P | RW | A | D, P | 0x80, P | RW | 0x80, P | A]

op = st.one_of(
    # a validated update (SetPTE): applied only if the validator accepts it
    st.tuples(st.just("set"), st.sampled_from(TABLES), st.integers(0, 511), st.sampled_from(FRAMES), st.sampled_from(FLAGS)),
    # registration changes
    st.tuples(st.just("allocate"), st.sampled_from(TABLES), st.integers(1, 4)),
    st.tuples(st.just("release"), st.sampled_from(TABLES)),
    # writes that bypass the validator: into a table, into a shadow page; counts and the level map corrupted
    st.tuples(st.just("forge"), st.sampled_from(TABLES), st.integers(0, 511), st.sampled_from(FRAMES), st.sampled_from(FLAGS)),
    st.tuples(st.just("forge-shadow"), st.integers(0, 7), st.integers(0, 511), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("miscount"), st.sampled_from(["refs", "writable", "level_of"]),
              st.sampled_from([f for f in FRAMES if f < 0x800000])),
    st.tuples(st.just("audit")),
)


def _apply(m: DirectMmu, step: tuple) -> None:  # type: ignore[type-arg]
    kind = step[0]
    if kind == "set":
        _, n, index, frame, flags = step
        ptep = table(n) + 8 * index
        if m.check_pte(ptep, frame | flags) is None:
            m.apply_pte(ptep, frame | flags)
    elif kind == "allocate":
        m.allocate(table(step[1]), step[2])
    elif kind == "release":
        m.release(table(step[1]))
    elif kind == "forge":
        _, n, index, frame, flags = step
        m.memory.write_u64(table(n) + 8 * index, frame | flags)
    elif kind == "forge-shadow" and isinstance(m, ShadowMmu):
        _, k, index, value = step
        m.memory.write_u64(SHADOW + 0x100000 - 0x1000 * (k + 1) + 8 * index, value)
    elif kind == "miscount":
        _, which, frame = step
        if which == "refs":
            m.tables.refs[frame >> 12] += 1
        elif which == "writable":
            m.tables.writable[0x1000][frame >> 12] += 1
        else:
            m.tables.level_of[frame >> 12] ^= 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shadow=st.booleans(), steps=st.lists(op, min_size=1, max_size=25))
def test_incremental_audit_reports_what_a_full_audit_reports(shadow: bool, steps: list[tuple]) -> None:  # type: ignore[type-arg]
    m = _mmu(shadow)
    incremental = m.auditor()
    assert incremental.audit() == reference_audit(m) == []
    for step in steps:
        _apply(m, step)
        try:
            want = reference_audit(m)
        except KeyError:  # a corrupted shadow map can trip the reference walk itself
            continue
        assert m.audit() == want  # the full audit, from scratch
        assert incremental.audit() == want, step


def test_a_violation_planted_in_an_untouched_table_is_found() -> None:
    """Several clean audits, then a forged entry in a table no call touched since: the next
    incremental audit finds it (content, not the update path, tells it what changed)."""
    m = _mmu(shadow=False)
    auditor = m.auditor()
    for _ in range(3):
        assert auditor.audit() == []
    m.apply_pte(table(3) + 16, 0x300000 | P | RW)  # touches table 3 only
    assert auditor.audit() == []
    m.memory.write_u64(table(1) + 8 * 7, table(0) | P | RW)  # PDPT entry -> the PML4: WRONG_LEVEL
    problems = auditor.audit()
    assert any(p.startswith(f"table {table(1):#x} (level 3) entry 7") and "WRONG_LEVEL" in p for p in problems)
    assert "reference counts disagree with the tables" in problems
    assert problems == reference_audit(m) == m.audit()


def test_a_miscount_elsewhere_is_found() -> None:
    m = _mmu(shadow=False)
    auditor = m.auditor()
    assert auditor.audit() == []
    m.tables.writable[0x1000][0x500] += 1  # a frame no table maps
    assert auditor.audit() == ["writable-mapping counts disagree with the tables"]
    m.tables.writable[0x1000][0x500] -= 1
    assert auditor.audit() == []


# --- the watch: incremental audits during a run, a full one at the end ---------------------------

def _watch(shadow: bool = False, full_every: int = 1000) -> tuple[HypercallWatch, DirectMmu, StandInVcpu]:
    m = _mmu(shadow)
    vcpu = StandInVcpu()
    hv = Hypervisor(SPEC, mmu=m)
    hv.attach(m.memory, vcpu)  # type: ignore[arg-type]
    return HypercallWatch(hv, vcpu, audit_every=1, full_every=full_every), m, vcpu


def _call(watch: HypercallWatch, vcpu: StandInVcpu, call_id: int, a0: int = 0, a1: int = 0) -> int:
    vcpu.regs.rdi, vcpu.regs.rsi, vcpu.regs.rdx = a0, a1, 0
    watch.on_hypercall(0xF8, 4, call_id)
    return vcpu.regs.rax


@pytest.mark.parametrize("shadow", [False, True])
def test_watch_names_the_call_after_which_an_untouched_table_went_bad(shadow: bool) -> None:
    watch, m, vcpu = _watch(shadow)
    for k in range(5):
        assert _call(watch, vcpu, SET_PTE, table(3) + 8 * k, 0x300000 | P | RW) == 0
    assert watch.audits == 5 and watch.audit_problems == [] and watch.offences == []
    m.memory.write_u64(table(4) + 8, table(0) | P | RW)  # a writable mapping of the PML4, behind the validator's back
    assert _call(watch, vcpu, GET_VERSION) == 0  # Query: no audit after it
    assert watch.audit_problems == []
    assert _call(watch, vcpu, SET_PTE, table(3), 0x301000 | P) == 0  # touches table 3, not 4
    assert watch.offences and watch.offences[0].reason == "page-table invariant broken (auditor)"
    assert watch.offences[0].call == "MMU.SetPTE"
    assert any(f"table {table(4):#x} (level 1) entry 1" in p and "PERMISSION" in p for p in watch.audit_problems)
    watch.finish()  # the last audit runs in full too, and agrees
    assert watch.full_audits == 1 and watch.disagreements == 0


def test_watch_cross_checks_with_full_audits() -> None:
    watch, m, vcpu = _watch(full_every=2)
    for k in range(4):
        _call(watch, vcpu, SET_PTE, table(3) + 8 * k, 0x300000 | P)
    assert watch.audits == 4 and watch.full_audits == 2 and watch.disagreements == 0

    class Blind:  # an incremental auditor that misses everything
        def audit(self) -> list[str]:
            return []

    watch._auditor = Blind()
    m.memory.write_u64(table(4) + 8, table(0) | P | RW)
    _call(watch, vcpu, SET_PTE, table(3), 0)  # audit 5: incremental only, blind
    assert watch.audit_problems == []
    watch.finish()  # audit 6: full as well
    assert watch.disagreements == 1
    assert any("PERMISSION" in p for p in watch.audit_problems)
    assert any(o.reason == "the incremental auditor disagrees with a full audit" for o in watch.offences)
