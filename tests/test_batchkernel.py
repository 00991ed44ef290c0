"""The C batch kernel of FlushQueue (hypervisor/csrc/batch.c) against the Python path and against
applying the entries one by one: same status, same named index and error, same memory, counts
and stale translations, for random valid and invalid batches under every paging style. Also its
build (cached by a hash of source and flags, one-line errors) and its refusal of hostile values.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from test_dispatch import ERR, SPEC, StandInVcpu, call
from test_pagetables import POOL, RAM_END, ROM, SET_PTE_QUEUED, SHADOW, VALUES, _state, memory, table
from vmikit.errors import HostError
from vmikit.hypervisor import Hypervisor, batchkernel
from vmikit.hypervisor import mmu as mmu_module
from vmikit.hypervisor.mmu import BATCH_ENTRY, DirectMmu, Mmu, ShadowMmu, TrapMmu
from vmikit.hypervisor.pagetables import P, PS, RW

FLUSH_QUEUE = SPEC.by_name("MMU.FlushQueue").call_id()
IDS = [SET_PTE_QUEUED] * 6 + [SPEC.by_name("MMU.SetLongPTE").call_id() | 1, SET_PTE_QUEUED & ~0xFF,
                              SET_PTE_QUEUED | 0x100, SET_PTE_QUEUED | 1 << 32, SPEC.by_name("MMU.FlushTLB").call_id(),
                              SPEC.by_name("Query.GetVersion").call_id()]
LEVELS = (4, 3, 2, 1, 1, 2)  # the tables _make registers
OUTSIDE = 0x500000  # a table outside the pool (in another RAM region): the numpy fast path's blind spot


def _make(style: str, kernel: bool, elsewhere: bool = False) -> DirectMmu:
    mem = memory()
    m: DirectMmu
    if style == "shadow":
        m = ShadowMmu(mem, SHADOW, 0x100000, batch_kernel=kernel)
    elif style == "trap":
        m = TrapMmu(mem, (POOL, 0x200000))
        m._use_kernel = kernel  # trap takes no option (no ROM, no FlushQueue in practice): set it here
    else:
        m = DirectMmu(mem, batch_kernel=kernel)
    for n, level in enumerate(LEVELS):
        assert m.allocate(table(n), level) is None
    if elsewhere and style == "trap":  # trap allocates only from its pool
        assert m.tables.can_register(OUTSIDE, 1) is None
        m.tables.register(OUTSIDE, 1)
    elif elsewhere:
        assert m.allocate(OUTSIDE, 1) is None
    return m


class Watched:
    """Records what the C kernel answered for each batch (to show the C path was taken)."""

    def __init__(self, m: DirectMmu) -> None:
        self.answers: list[int] = []
        kernel = m.kernel()
        assert kernel is not None
        inner = kernel._flush

        def flush(*args: int) -> int:
            self.answers.append(inner(*args))
            return self.answers[-1]

        kernel._flush = flush  # type: ignore[assignment]


def _flush_at(m: DirectMmu, at: int, entries: list[tuple[int, int, int]],
              count: int | None = None) -> tuple[Hypervisor, int, tuple[int, ...]]:
    hv = Hypervisor(SPEC, mmu=m)
    vcpu = StandInVcpu()
    hv.attach(m.memory, vcpu)  # type: ignore[arg-type]
    raw = b"".join(BATCH_ENTRY.pack(cid & 0xFFFFFFFF, cid >> 32, p & (2**64 - 1), v & (2**64 - 1), 0)
                   for cid, p, v in entries)
    for offset in range(0, len(raw), 8):  # word by word: a batch may lie across two regions
        m.memory.write(at + offset, raw[offset:offset + 8])
    status, results = call((hv, vcpu), FLUSH_QUEUE, at, len(entries) if count is None else count)
    return hv, status, results


def _one_by_one(m: DirectMmu, entries: list[tuple[int, int, int]]) -> tuple[int, tuple[int, ...]]:
    """The reference: the first entry with a bad ID or a bad update names the batch's error and
    nothing is applied; otherwise each entry is applied in order (SetPTE)."""
    hv = SimpleNamespace(hypervisor=Hypervisor(SPEC, mmu=m))
    for index, (cid, p, v) in enumerate(entries):
        error = mmu_module._entry_id_error(hv, cid & 0xFFFFFFFF, cid >> 32) or m.check_pte(p, v)  # type: ignore[arg-type]
        if error:
            return ERR["BATCH_INVALID"], (index, ERR[error])
    for _, p, v in entries:
        m.apply_pte(p, v)
    return 0, (len(entries),)


PTEPS = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 511)).map(lambda t: table(t[0]) + 8 * t[1]),  # in a table
    st.sampled_from([table(2) + 4, 0x300000, table(9), ROM, SHADOW, RAM_END, 1 << 52, 2**64 - 8, 2**63,
                     table(3) | 1 << 52, OUTSIDE + 8]),  # misaligned, unregistered, outside, hostile
)


@given(style=st.sampled_from(["direct", "shadow", "trap"]),
       shape=st.lists(st.tuples(st.sampled_from(IDS), PTEPS), min_size=1, max_size=80),
       data=st.data(), elsewhere=st.booleans(),
       at=st.sampled_from([0x100000, POOL + 0x200000 - 64]))  # in one region, across two
@settings(max_examples=250, deadline=None)
def test_c_path_equals_python_path_equals_one_by_one(style: str, shape: list[tuple[int, int]], data: st.DataObject,
                                                    elsewhere: bool, at: int) -> None:
    """Random batches, mostly uniform and valid-looking, with hostile entries mixed in: duplicates,
    replacements (a second round over the same entries), other IDs, reserved bits, addresses beyond
    the memory map. The C path, the Python path and one-by-one end in the same state, and the C
    kernel applies a batch exactly when the batch is uniform, wholly valid and has no large leaf."""
    if data.draw(st.booleans(), "uniform"):  # the C kernel's case: one queueable ID, entries in tables
        shape = [(SET_PTE_QUEUED, p if p % 8 == 0 and table(0) <= p < table(6) else table(3) + 8 * k)
                 for k, (_, p) in enumerate(shape)]
    c, py, ref = _make(style, True, elsewhere), _make(style, False, elsewhere), _make(style, False, elsewhere)
    watched = Watched(c)
    for round_ in range(2):
        values = data.draw(st.lists(VALUES | st.sampled_from([0, OUTSIDE | P, table(1) | P]),
                                    min_size=len(shape), max_size=len(shape)), f"values {round_}")
        batch = [(cid, p, v) for (cid, p), v in zip(shape, values)]
        expected = _one_by_one(ref, batch)
        eligible = expected[0] == 0 and len({cid for cid, _, _ in batch}) == 1 and not any(
            v & P and v & PS and ref.tables.level.get(p & ~0xFFF) in (2, 3) for _, p, v in batch)
        outcomes = []
        want = _state(ref)  # (once: it takes the stale ranges)
        for m in (c, py):
            hv, status, results = _flush_at(m, at, batch)
            outcomes.append((status, results[:len(expected[1])], dict(hv.calls)))
            assert (status, results[:len(expected[1])]) == expected
            assert _state(m) == want
            assert m.audit() == []
        assert outcomes[0] == outcomes[1]
        assert (watched.answers[-1] == len(batch)) == eligible, (watched.answers, expected)
        event("C applied the batch" if eligible else "C declined, Python decided")
        assert watched.answers[-1] in (len(batch), -2)  # applied whole, or declined (never -1 here: RAM)


@pytest.mark.parametrize("style", ["direct", "shadow"])
def test_a_256_entry_batch_with_one_bad_entry_applies_nothing_and_names_it(style: str) -> None:
    """Acceptance 4 through the C path: the kernel declines (nothing written), the reference
    names the index and the error; without the bad entry the kernel applies the batch."""
    m = _make(style, True)
    watched = Watched(m)
    good = [(SET_PTE_QUEUED, table(3) + 8 * k, (0x300000 + 0x1000 * k) | P | RW) for k in range(256)]
    for at, value, error in ((0, table(1) | P | RW, "PERMISSION"), (137, (RAM_END + 0x1000) | P, "BAD_ADDRESS"),
                             (255, (1 << 50) | 0x300000 | P, "RESERVED_PTE_BITS")):
        bad = list(good)
        bad[at] = (SET_PTE_QUEUED, good[at][1], value)
        before = _state(m)
        _, status, results = _flush_at(m, 0x100000, bad)
        assert (status, results[:2]) == (ERR["BATCH_INVALID"], (at, ERR[error]))
        assert watched.answers[-1] == -2 and _state(m) == before
    _, status, results = _flush_at(m, 0x100000, good)
    assert (status, results[0], watched.answers[-1]) == (0, 256, 256)
    assert m.audit() == []


@pytest.mark.parametrize("style", ["direct", "shadow"])
@pytest.mark.parametrize("at,count,error", [
    (ROM, 4, "BAD_ADDRESS"),  # not RAM
    (RAM_END - 64, 4, "BAD_ADDRESS"),  # runs past the end of RAM
    (0x100004, 4, "BAD_ADDRESS"),  # misaligned
    (2**64 - 32, 4, "BAD_ADDRESS"),  # wraps around the address space
    (SHADOW, 4, "BAD_ADDRESS"),  # the hypervisor's own memory
    (0x100000, SPEC.batch.max_entries + 1, "INVALID_ARGUMENT"),
], ids=["rom", "past-ram", "misaligned", "wraps", "private", "too-many"])
def test_a_batch_the_kernel_cannot_read_is_refused_as_before(style: str, at: int, count: int, error: str) -> None:
    m = _make(style, True)
    before = _state(m)
    _, status, _ = _flush_at(m, at, [], count)
    assert status == ERR[error] and _state(m) == before


def test_native_paging_has_no_kernel_and_closing_turns_it_off() -> None:
    assert Mmu(memory()).kernel() is None
    m = _make("direct", True)
    kernel = m.kernel()
    assert kernel is not None
    m.close()
    assert m.kernel() is None
    assert kernel._flush(kernel._addr, 0x100000, 1) == -2  # a closed context declines everything


def test_the_environment_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(batchkernel.ENV, "python")
    assert DirectMmu(memory()).kernel() is None
    monkeypatch.setenv(batchkernel.ENV, "c")
    assert DirectMmu(memory()).kernel() is not None
    assert DirectMmu(memory(), batch_kernel=False).kernel() is None


def test_the_build_is_cached_by_a_hash_of_source_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = batchkernel.build(tmp_path)
    assert first.is_file() and first.parent.parent == tmp_path
    assert oct(first.stat().st_mode & 0o777) == oct(0o644)
    assert batchkernel.build(tmp_path) == first  # reused, not rebuilt
    changed = tmp_path / "batch.c"
    changed.write_text(batchkernel.SOURCE.read_text() + "\n/* another source */\n")
    assert batchkernel.build(tmp_path, changed) != first
    monkeypatch.setattr(batchkernel, "CFLAGS", batchkernel.CFLAGS + ("-O1",))
    assert batchkernel.build(tmp_path) != first


def test_a_kernel_that_does_not_build_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int vmk_flush(void) { return }\n")
    with pytest.raises(HostError) as err:
        batchkernel.build(tmp_path / "cache", broken)
    assert "building the FlushQueue batch kernel failed" in str(err.value) and "\n" not in str(err.value)
    assert batchkernel.ENV in str(err.value)
    with pytest.raises(HostError, match="cannot read the FlushQueue batch kernel's source"):
        batchkernel.build(tmp_path / "cache", tmp_path / "missing.c")


def test_hostile_pteps_and_values_never_reach_past_the_arrays() -> None:
    """Entry addresses and frames at the edges of what 64 bits hold: each batch is declined
    (the reference refuses it) and nothing changes; the process survives to say so."""
    m = _make("shadow", True)
    watched = Watched(m)
    edges = [0, 8, 2**52 - 8, 2**52, 2**63 - 8, 2**63, 2**64 - 8, POOL + 0x200000 - 8, table(5) + 4088]
    values = [0, P, 2**64 - 1, (2**52 - 4096) | P, 2**63 | P, table(0) | P, 0xFFF | P | RW | PS, 2**12 * (2**40 - 1) | P]
    for ptep in edges:
        for value in values:
            before = _state(m)
            batch = [(SET_PTE_QUEUED, table(3), 0x300000 | P)] * 3 + [(SET_PTE_QUEUED, ptep, value)]
            expected = _one_by_one(_make("shadow", False), batch)
            _, status, results = _flush_at(m, 0x100000, batch)
            assert (status, results[:len(expected[1])]) == expected
            if expected[0]:
                assert _state(m) == before and watched.answers[-1] == -2
    assert m.audit() == []


def test_the_c_path_counts_as_one_by_one_over_many_batches() -> None:
    """Map, remap read-only, unmap 2048 pages in 256-entry batches (the bench's map workload and
    more): the C kernel applies every batch, and counts and tables equal one-by-one application."""
    for style in ("direct", "shadow"):
        c, ref = _make(style, True), _make(style, False)
        watched = Watched(c)
        rounds = [((0x300000 + 0x1000 * k) | P | RW) for k in range(512)], \
                 [((0x300000 + 0x1000 * k) | P) for k in range(512)], [0] * 512
        for values in rounds:
            for start in (0, 256):
                batch = [(SET_PTE_QUEUED, table(3) + 8 * k, values[k]) for k in range(start, start + 256)]
                _flush_at(c, 0x100000, batch)
                _one_by_one(ref, batch)
                assert watched.answers[-1] == 256
                assert _state(c) == _state(ref)
        assert c.audit() == []
        assert np.array_equal(c.tables.refs, ref.tables.refs)
