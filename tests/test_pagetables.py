"""The page-table rules of docs/paging.md, checked on the validator itself (no guest needed).

Each rule is broken once and must give its documented error and change nothing;
a hypothesis state machine then throws random updates at direct and shadow
paging and the auditor must find every invariant intact after each step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmikit.hypervisor.context import HypercallError
from test_dispatch import ERR, SPEC, StandInVcpu, call
from vmikit.hypervisor import Hypervisor
from vmikit.hypervisor import mmu as mmu_module
from vmikit.hypervisor.mmu import BATCH_ENTRY
from vmikit.hypervisor.mmu import DirectMmu, ShadowMmu, TrapMmu
from vmikit.hypervisor.pagetables import ERRORS, EVERYTHING, A, D, P, PS, RW
from vmikit.memory import GuestMemory, Region

POOL = 0x200000
RAM_END = 0x800000
ROM = 0xC0000
SHADOW = 0x1000000


def memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add(Region(0, 0xA0000))
    mem.add(Region(ROM, 0x8000, readonly=True, kind="rom"))
    mem.add(Region(0x100000, POOL - 0x100000))
    mem.add(Region(POOL, 0x200000, readonly=True, name="pool"))
    mem.add(Region(POOL + 0x200000, RAM_END - POOL - 0x200000))
    mem.add(Region(SHADOW, 0x100000, kind="private"))
    return mem


def table(n: int) -> int:
    return POOL + n * 0x1000


@pytest.fixture(params=["direct", "shadow"])
def mmu(request: pytest.FixtureRequest) -> DirectMmu:
    mem = memory()
    m = ShadowMmu(mem, SHADOW, 0x100000) if request.param == "shadow" else DirectMmu(mem)
    for n, level in enumerate((4, 3, 2, 1)):
        assert m.allocate(table(n), level) is None
    for n in range(3):  # PML4[0] -> PDPT -> PD -> PT
        assert m.check_pte(table(n), table(n + 1) | P | RW) is None
        m.apply_pte(table(n), table(n + 1) | P | RW)
    m.load_cr3(table(0))
    return m


def snapshot(m: DirectMmu) -> bytes:
    return m.memory.read(POOL, 0x100000) + m.memory.read(SHADOW, 0x100000)


BROKEN = [  # (what, table index, entry value, error)
    ("leaf maps beyond RAM", 3, (RAM_END + 0x1000) | P, "BAD_ADDRESS"),
    ("leaf maps hypervisor memory", 3, SHADOW | P, "BAD_ADDRESS"),
    ("writable leaf maps a table", 3, table(1) | P | RW, "PERMISSION"),
    ("writable leaf maps the ROM", 3, ROM | P | RW, "PERMISSION"),
    ("2 MiB writable leaf covers tables", 2, POOL | P | RW | PS, "PERMISSION"),
    ("non-leaf to an unregistered page", 1, 0x300000 | P | RW, "NOT_PAGE_TABLE"),
    ("non-leaf to a wrong-level table", 1, table(3) | P | RW, "WRONG_LEVEL"),
    ("PS in a PML4 entry", 0, table(1) | P | PS, "RESERVED_PTE_BITS"),
    ("2 MiB leaf with low frame bits", 2, 0x402000 | P | PS, "RESERVED_PTE_BITS"),
    ("2 MiB leaf across the ROM hole", 2, 0 | P | PS, "BAD_ADDRESS"),
    ("bits above MAXPHYADDR", 3, (1 << 50) | 0x300000 | P, "RESERVED_PTE_BITS"),
]


@pytest.mark.parametrize("what,index,value,error", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_rule_gives_its_error_and_changes_nothing(mmu: DirectMmu, what: str, index: int, value: int,
                                                       error: str) -> None:
    before = snapshot(mmu)
    assert mmu.check_pte(table(index) + 8, value) == error
    assert snapshot(mmu) == before
    assert mmu.audit() == []


def test_valid_updates_are_applied_with_accessed_and_dirty(mmu: DirectMmu) -> None:
    assert mmu.check_pte(table(3) + 8, 0x300000 | P | RW) is None
    mmu.apply_pte(table(3) + 8, 0x300000 | P | RW)
    stored = mmu.memory.read_u64(table(3) + 8)
    assert stored & ~(A | D) == 0x300000 | P | RW
    assert mmu.check_pte(table(3) + 16, ROM | P) is None  # the ROM read-only is fine
    assert mmu.audit() == []


def test_cr3_loads_only_registered_roots(mmu: DirectMmu) -> None:
    with pytest.raises(HypercallError) as err:
        mmu.load_cr3(0x300000)
    assert err.value.error == "NOT_PAGE_TABLE"
    with pytest.raises(HypercallError) as err:
        mmu.load_cr3(table(1))
    assert err.value.error == "WRONG_LEVEL"


def test_release_in_use_is_refused(mmu: DirectMmu) -> None:
    assert mmu.release(table(2)) == "IN_USE"  # referenced by the PDPT
    assert mmu.release(table(0)) == "IN_USE"  # loaded in CR3
    mmu.apply_pte(table(2), 0)  # unlink the PT
    assert mmu.release(table(3)) is None
    assert mmu.release(table(3)) == "NOT_PAGE_TABLE"
    assert mmu.audit() == []


def test_registering_a_page_mapped_writable_is_refused(mmu: DirectMmu) -> None:
    mmu.apply_pte(table(3) + 8, 0x300000 | P | RW)
    assert mmu.allocate(0x300000, 1) == "PERMISSION"
    mmu.apply_pte(table(3) + 8, 0x300000 | P)  # read-only now
    assert mmu.allocate(0x300000, 1) is None


def test_shadow_cr3_points_at_the_shadow_and_get_returns_the_guest_root() -> None:
    mem = memory()
    m = ShadowMmu(mem, SHADOW, 0x100000)
    assert m.allocate(table(0), 4) is None
    hardware = m.load_cr3(table(0))
    assert SHADOW <= hardware < SHADOW + 0x100000
    assert m.guest_cr3(hardware) == table(0)


def test_trap_learns_levels_top_down_and_refuses_bad_stores() -> None:
    mem = memory()
    m = TrapMmu(mem, (POOL, 0x100000))
    m.on_guest_store(table(0), 8, table(1) | P | RW)  # a root, linking a PDPT
    m.on_guest_store(table(1) + 4, 4, 0)  # a partial store, still valid
    m.on_guest_store(table(1), 8, table(2) | P | RW)
    m.on_guest_store(table(2), 8, table(3) | P | RW)
    m.on_guest_store(table(3), 8, 0x300000 | P | RW)
    assert m.tables.level == {table(0): 4, table(1): 3, table(2): 2, table(3): 1}
    before = snapshot(m)
    m.on_guest_store(table(3) + 8, 8, table(0) | P | RW)  # writable alias of a table
    assert snapshot(m) == before and m.refused["PERMISSION"] == 1
    assert m.emulated == 5 and m.audit() == []


class RandomUpdates(RuleBasedStateMachine):
    """Random registrations, updates and releases; rejected ones must change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.mmu = ShadowMmu(memory(), SHADOW, 0x100000)

    @rule(n=st.integers(0, 15), level=st.integers(0, 5))
    def allocate(self, n: int, level: int) -> None:
        before = snapshot(self.mmu)
        if self.mmu.allocate(table(n), level) is not None:
            assert snapshot(self.mmu) == before

    @rule(n=st.integers(0, 15))
    def release(self, n: int) -> None:
        self.mmu.release(table(n))

    @rule(n=st.integers(0, 15), index=st.integers(0, 511),
          frame=st.sampled_from([table(i) for i in range(16)] + [0x300000, ROM, SHADOW, RAM_END, 0x400000, 0]),
          flags=st.integers(0, 0xFFF), high=st.sampled_from([0, 1 << 63, 1 << 51]))
    def update(self, n: int, index: int, frame: int, flags: int, high: int) -> None:
        ptep = table(n) + 8 * index
        value = high | frame | flags
        before = snapshot(self.mmu)
        if self.mmu.check_pte(ptep, value) is None:
            self.mmu.apply_pte(ptep, value)
        else:
            assert snapshot(self.mmu) == before

    @invariant()
    def audit_is_clean(self) -> None:
        assert self.mmu.audit() == []


RandomUpdates.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_random_updates_keep_every_invariant = RandomUpdates.TestCase


VALUES = st.builds(lambda frame, flags, high: high | frame | flags,
                   st.sampled_from([table(i) for i in range(6)] + [0x300000, 0x400000, 0x402000, ROM, SHADOW,
                                                                  RAM_END, 0, POOL, 1 << 40]),
                   st.integers(0, 0xFFF), st.sampled_from([0, 1 << 63, 1 << 51, 1 << 47]))


@given(st.lists(st.tuples(st.integers(1, 4), VALUES), min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_batch_check_equals_the_single_entry_check(entries: list[tuple[int, int]]) -> None:
    import numpy as np

    mem = memory()
    tables = DirectMmu(mem).tables
    for n, level in enumerate((4, 3, 2, 1)):
        tables.register(table(n), level)
    levels = np.array([lv for lv, _ in entries])
    values = np.array([v for _, v in entries], dtype=np.uint64)
    codes = tables.check_many(levels, values)
    assert [ERRORS[c] for c in codes] == [tables.check(lv, v) for lv, v in entries]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 511), VALUES), min_size=1, max_size=40,
                unique_by=lambda e: (e[0], e[1])))
@settings(max_examples=100, deadline=None)
def test_batch_apply_equals_applying_one_by_one(entries: list[tuple[int, int, int]]) -> None:
    import numpy as np

    outcomes = []
    for batched in (False, True):
        mem = memory()
        m = ShadowMmu(mem, SHADOW, 0x100000)
        for n, level in enumerate((4, 3, 2, 1)):
            assert m.allocate(table(n), level) is None
        valid = [(table(n) + 8 * i, v) for n, i, v in entries if m.check_pte(table(n) + 8 * i, v) is None]
        pteps = np.array([p for p, _ in valid], dtype=np.uint64)
        values = np.array([v for _, v in valid], dtype=np.uint64)
        assert m.check_batch(pteps, values) is None
        if batched:
            vector_min, mmu_module.VECTOR_MIN = mmu_module.VECTOR_MIN, 0  # the array path, however small
            try:
                assert m.check_batch(pteps, values) is None
                m.apply_batch(pteps, values)
            finally:
                mmu_module.VECTOR_MIN = vector_min
        else:
            for p, v in valid:
                m.apply_pte(p, v)
        assert m.audit() == []
        outcomes.append((snapshot(m), m.tables.refs.tolist(), {s: c.tolist() for s, c in m.tables.writable.items()}))
    assert outcomes[0] == outcomes[1]


@given(st.lists(st.tuples(st.sampled_from([0x03000001, 0x03010001, 0x03000000, 0x01040000, 0x03000101, 0x00260000]),
                          st.sampled_from([0, 0, 0, 1]), st.integers(0, 3), st.integers(0, 511), VALUES),
                min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_small_and_large_batch_paths_agree(entries: list[tuple[int, int, int, int, int]]) -> None:
    """FlushQueue checks small batches entry by entry and large ones as arrays, and tries the C
    batch kernel first when it is on: the same outcome every way."""
    outcomes = []
    for vector_min, kernel in ((10_000, False), (0, False), (0, True)):
        mem = memory()
        m = DirectMmu(mem, batch_kernel=kernel)
        for n, level in enumerate((4, 3, 2, 1)):
            assert m.allocate(table(n), level) is None
        hv = Hypervisor(SPEC, mmu=m)
        vcpu = StandInVcpu()
        hv.attach(mem, vcpu)  # type: ignore[arg-type]
        mem.write(0x100000, b"".join(BATCH_ENTRY.pack(cid, res, table(n) + 8 * i, v, 0)
                                     for cid, res, n, i, v in entries))
        saved, mmu_module.VECTOR_MIN = mmu_module.VECTOR_MIN, vector_min
        try:
            result = call((hv, vcpu), SPEC.by_name("MMU.FlushQueue").call_id(), 0x100000, len(entries))
        finally:
            mmu_module.VECTOR_MIN = saved
        outcomes.append((result, snapshot(m), m.tables.refs.tolist()))
    assert outcomes[0] == outcomes[1]


# --- the FlushQueue fast path (PageTables.check_fast/apply_fast) ---------------------------

SET_PTE_QUEUED = SPEC.by_name("MMU.SetPTE").call_id() | 0x01  # the queue annotation
FLUSH_QUEUE = SPEC.by_name("MMU.FlushQueue").call_id()
BATCH_AT = 0x100000


def _flush(m: DirectMmu, entries: list[tuple[int, int, int]]) -> tuple[Hypervisor, int, tuple[int, ...]]:
    """FlushQueue of (call ID, entry address, value) entries; (hypervisor, status, results)."""
    hv = Hypervisor(SPEC, mmu=m)
    vcpu = StandInVcpu()
    hv.attach(m.memory, vcpu)  # type: ignore[arg-type]
    m.memory.write(BATCH_AT, b"".join(BATCH_ENTRY.pack(cid & 0xFFFFFFFF, cid >> 32, p, v, 0) for cid, p, v in entries))
    status, results = call((hv, vcpu), FLUSH_QUEUE, BATCH_AT, len(entries))
    return hv, status, results


def _fresh(style: str, kernel: bool | None = None) -> DirectMmu:
    """Tables of levels 4, 3, 2, 1, 1, 2; ``kernel``: FlushQueue's C batch kernel on or off
    (None: as VMIKIT_BATCH_KERNEL says)."""
    mem = memory()
    m = ShadowMmu(mem, SHADOW, 0x100000, batch_kernel=kernel) if style == "shadow" else DirectMmu(mem, batch_kernel=kernel)
    for n, level in enumerate((4, 3, 2, 1, 1, 2)):
        assert m.allocate(table(n), level) is None
    return m


def _state(m: DirectMmu) -> tuple[bytes, list[int], dict[int, list[int]], object]:
    stale = set(m.take_stale())  # what must be flushed: everything, or these frames
    return (snapshot(m), m.tables.refs.tolist(), {s: c.tolist() for s, c in m.tables.writable.items()},
            "everything" if EVERYTHING in stale else stale)


@given(style=st.sampled_from(["direct", "shadow"]),
       entries=st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, 3) | st.integers(0, 511),
                                  VALUES), min_size=mmu_module.VECTOR_MIN, max_size=80),
       data=st.data(), kernel=st.booleans())
@settings(max_examples=150, deadline=None)
def test_fast_path_equals_applying_one_by_one(style: str, entries: list[tuple[int, int, int]],
                                             data: st.DataObject, kernel: bool) -> None:
    """Random batches, valid and invalid, duplicates included, flushed twice (the second round
    gives the same entries new values, replacing present ones): the fast path's outcome is the
    one-by-one outcome, and it takes a batch exactly when every entry is valid and none is a
    large leaf. With the C batch kernel on, FlushQueue goes through it first (check_fast is
    still asked directly)."""
    fast, slow = _fresh(style, kernel), _fresh(style, False)
    rounds = [[v for _, _, v in entries], data.draw(st.lists(VALUES, min_size=len(entries), max_size=len(entries)))]
    for values in rounds:
        batch = [(SET_PTE_QUEUED, table(n) + 8 * i, v) for (n, i, _), v in zip(entries, values)]
        levels = [slow.tables.level[table(n)] for n, _, _ in entries]
        errors = [slow.check_pte(p, v) for _, p, v in batch]
        eligible = not any(errors) and not any(lv in (2, 3) and v & P and v & PS
                                               for lv, (_, _, v) in zip(levels, batch))
        import numpy as np

        words = np.array([[c, p, v, 0] for c, p, v in batch], dtype=np.uint64).view(np.int64)
        assert (fast.tables.check_fast(words[:, 1], words[:, 2], words[:, 0], SET_PTE_QUEUED) is not None) == eligible
        _, status, results = _flush(fast, batch)
        if any(errors):
            index = next(k for k, e in enumerate(errors) if e)
            assert (status, results[:2]) == (ERR["BATCH_INVALID"], (index, ERR[errors[index]]))
        else:
            assert status == 0
            for _, p, v in batch:
                slow.apply_pte(p, v)
        assert _state(fast) == _state(slow)
        assert fast.audit() == []


@pytest.mark.parametrize("kernel", [True, False], ids=["c", "python"])
@pytest.mark.parametrize("style", ["direct", "shadow"])
@pytest.mark.parametrize("what,index,value,error", BROKEN + [
    ("misaligned entry address", -1, 0x300000 | P, "BAD_ADDRESS"),
    ("entry address outside any table", -2, 0x300000 | P, "NOT_PAGE_TABLE"),
    ("non-present entry in a released table", -3, 0, "NOT_PAGE_TABLE"),
], ids=[b[0] for b in BROKEN] + ["misaligned", "not a table", "released table"])
def test_a_full_batch_with_one_broken_entry_applies_nothing_and_names_it(style: str, what: str, index: int,
                                                                          value: int, error: str, kernel: bool) -> None:
    """Every rule, as the one bad entry at a random place of a 256-entry batch that is otherwise
    the fast path's favourite (fresh 4 KiB leaves in order): BATCH_INVALID, its index, its error,
    nothing written; the same batch without it is applied whole."""
    import random

    m = _fresh(style, kernel)
    assert m.release(table(5)) is None
    good = [(SET_PTE_QUEUED, table(3) + 8 * k, (0x300000 + 0x1000 * k) | P | RW) for k in range(256)]
    at = random.Random(what).randrange(256)
    ptep = {-1: table(3) + 8 * at + 4, -2: 0x300000, -3: table(5)}.get(index, table(max(index, 0)) + 8)
    if index >= 0 and index != 3:  # a rule of a higher level: the bad entry goes to that table
        good[at] = (SET_PTE_QUEUED, ptep, value)
    else:
        good[at] = (SET_PTE_QUEUED, ptep if index < 0 else table(3) + 8 * at, value)
    before = _state(m)
    _, status, results = _flush(m, good)
    assert (status, results[:2]) == (ERR["BATCH_INVALID"], (at, ERR[error])), what
    assert _state(m) == before
    del good[at]
    _, status, results = _flush(m, good)
    assert (status, results[0]) == (0, 255)
    assert m.audit() == []


@pytest.mark.parametrize("kernel", [True, False], ids=["c", "python"])
def test_a_batch_mixing_call_ids_is_checked_by_the_general_path(kernel: bool) -> None:
    """Entries with another queueable ID (SetLongPTE) or another annotation are still applied;
    an ID that cannot be queued is refused at its index."""
    m = _fresh("direct", kernel)
    batch = [(SET_PTE_QUEUED, table(3) + 8 * k, (0x300000 + 0x1000 * k) | P) for k in range(64)]
    batch[10] = (SPEC.by_name("MMU.SetLongPTE").call_id(), batch[10][1], batch[10][2])
    batch[11] = (SET_PTE_QUEUED & ~0xFF, batch[11][1], batch[11][2])
    hv, status, results = _flush(m, batch)
    assert (status, results[0]) == (0, 64)
    assert hv.calls[SET_PTE_QUEUED] == 62
    batch[20] = (SPEC.by_name("Query.GetVersion").call_id(), batch[20][1], batch[20][2])
    _, status, results = _flush(m, batch)
    assert (status, results[:2]) == (ERR["BATCH_INVALID"], (20, ERR["NOT_SUPPORTED"]))


@pytest.mark.parametrize("kernel", [True, False], ids=["c", "python"])
@pytest.mark.parametrize("style", ["direct", "shadow"])
def test_a_batch_writing_one_entry_twice_is_applied_in_order(style: str, kernel: bool) -> None:
    """The second of two writes to one entry wins, and the counts see the first come and go."""
    fast, slow = _fresh(style, kernel), _fresh(style, False)
    batch = [(SET_PTE_QUEUED, table(3) + 8 * k, (0x300000 + 0x1000 * k) | P | RW) for k in range(64)]
    batch[40] = (SET_PTE_QUEUED, batch[7][1], 0x500000 | P)  # entry 7 again, read-only elsewhere
    _, status, _ = _flush(fast, batch)
    assert status == 0
    for _, p, v in batch:
        slow.apply_pte(p, v)
    assert _state(fast) == _state(slow)
    assert fast.memory.read_u64(batch[7][1]) & ~(A | D) == 0x500000 | P


# --- invariants a hostile guest broke silently (issue 12 finding 9) ----------------------------


def test_trap_refuses_a_root_whose_contents_are_not_a_table() -> None:
    """A pool page pre-filled (by an ELF segment) with entries that break the rules was taken as
    a root by the guest's first store into it, unvalidated; now the store is refused and the
    auditor has nothing to report."""
    mem = memory()
    m = TrapMmu(mem, (POOL, 0x100000))
    mem.write(table(5), (table(6) | P | RW | (1 << 51)).to_bytes(8, "little") * 512)  # reserved bits
    m.on_guest_store(table(5) + 8, 8, 0)
    assert table(5) not in m.tables.level and sum(m.refused.values()) == 1
    assert m.audit() == []
    m.on_guest_store(table(0), 8, 0)  # a zeroed page is a valid root, as before
    assert m.tables.level == {table(0): 4}


@pytest.mark.parametrize("style", ["direct", "shadow"])
def test_a_table_registered_with_entries_lacking_accessed_dirty(style: str) -> None:
    """Entries a page held before it became a table (written past SetPTE, e.g. by a descriptor
    call into a not-yet-registered pool page) lacked A/D, which read-only tables need, and the
    auditor stayed silent. Registration now sets them, and the auditor reports any that lack them."""
    mem = memory()
    m = ShadowMmu(mem, SHADOW, 0x100000) if style == "shadow" else DirectMmu(mem)
    mem.write(table(3), (0x300000 | P | RW).to_bytes(8, "little") * 4)
    assert m.allocate(table(3), 1) is None
    assert mem.read_u64(table(3)) == 0x300000 | P | RW | A | D and m.audit() == []
    mem.write_u64(table(3) + 8, 0x301000 | P | RW)  # behind the MMU's back
    assert any("lacks the A/D bits" in problem for problem in m.audit())


def test_hypervisor_writes_for_the_guest_never_reach_the_pool() -> None:
    """WriteGDTEntry (and every other write on the guest's behalf: TSS, exception frames) could
    land in a pool page not yet registered, which AllocatePage then took as a table. Such a
    target is refused like a registered table (PERMISSION); ROM is no RAM (BAD_ADDRESS)."""
    from vmikit.engine import ControlState, DescriptorTable, Segment
    from vmikit.hypervisor.context import HypercallError
    from vmikit.hypervisor.walk import guest_gpa

    mem = memory()
    m = DirectMmu(mem)
    assert m.allocate(table(0), 4) is None
    flat = Segment(selector=0, base=0, limit=0, type=0, present=False)
    control = ControlState(cr0=0x11, cr2=0, cr3=0, cr4=0, efer=0, gdt=DescriptorTable(0, 0),
                           idt=DescriptorTable(0, 0), ldt=flat, tr=flat)  # paging off: identity
    assert guest_gpa(mem, control, 0x500008, 8, m.is_table) == 0x500008
    for va, error in ((table(0), "PERMISSION"), (table(9) + 16, "PERMISSION"), (ROM + 8, "BAD_ADDRESS"),
                      (0x500ffc, "BAD_ADDRESS")):
        with pytest.raises(HypercallError, match=error):
            guest_gpa(mem, control, va, 8, m.is_table)


def test_shadow_answers_allocate_page_as_direct_does() -> None:
    """Issue 12 finding 10: under shadow, AllocatePage outside the pool answered INVALID_ARGUMENT
    (out of shadow pages, checked first) where direct answers BAD_ADDRESS. The arguments are now
    checked first, so both give the same answer, with or without shadow pages left."""
    pool = (POOL, 0x100000)
    direct = DirectMmu(memory(), pool=pool)
    shadow = ShadowMmu(memory(), SHADOW, 0x1000, pool=pool)  # one shadow page
    assert direct.allocate(table(0), 4) is None and shadow.allocate(table(0), 4) is None
    for where, level in ((0x500000, 1), (ROM, 2), (table(1) + 8, 1), (table(1), 7), (RAM_END + 0x1000, 3),
                         (table(0), 3)):
        assert shadow.allocate(where, level) == direct.allocate(where, level) != None  # noqa: E711
    assert shadow.allocate(table(1), 1) == "INVALID_ARGUMENT"  # valid, but no shadow page is left
