"""Guest memory: every access inside one region or a typed error, never a clipped slice."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, strategies as st

from vmikit.memory import GuestMemory, GuestMemoryError, Region

LOW = 0x1000
SIZE = 0x4000


@pytest.fixture(scope="module")
def memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add(Region(LOW, SIZE))
    mem.add(Region(0x10000, 0x1000, readonly=True, name="rom", kind="rom"))
    return mem


@given(gpa=st.integers(0, 1 << 64), length=st.integers(0, 0x10000))
def test_access_inside_or_error(memory: GuestMemory, gpa: int, length: int) -> None:
    inside = any(r.gpa <= gpa and gpa + length <= r.end for r in memory.regions)
    if inside:
        assert len(memory.read(gpa, length)) == length
    else:
        with pytest.raises(GuestMemoryError):
            memory.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            memory.write(gpa, bytes(length))


def test_access_spanning_two_regions_is_refused() -> None:
    mem = GuestMemory()
    mem.add(Region(0, 0x1000))
    mem.add(Region(0x1000, 0x1000))
    with pytest.raises(GuestMemoryError):
        mem.read(0xFF8, 16)


def test_roundtrip_and_objects(memory: GuestMemory) -> None:
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]

    memory.write_obj(LOW + 8, Pair(a=7, b=1 << 40))
    got = memory.read_obj(LOW + 8, Pair)
    assert (got.a, got.b) == (7, 1 << 40)
    memory.write_u64(LOW, 0xDEADBEEF)
    assert memory.read_u64(LOW) == 0xDEADBEEF


def test_is_ram_excludes_rom(memory: GuestMemory) -> None:
    assert memory.is_ram(LOW, SIZE)
    assert not memory.is_ram(0x10000, 8)
    assert not memory.is_ram(LOW + SIZE - 4, 8)


def test_overlapping_regions_rejected() -> None:
    mem = GuestMemory()
    mem.add(Region(0, 0x2000))
    with pytest.raises(ValueError):
        mem.add(Region(0x1000, 0x2000))
