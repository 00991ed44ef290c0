"""Bounds-checked guest-physical memory.

Every access names a guest-physical address and a length; an access that is
not wholly inside one region raises ``GuestMemoryError`` (never a raw slice
that silently clips). The VMM reads guest-supplied pointers only through this.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T", bound=ctypes.Structure)

HUGE_PAGE = 2 << 20


class GuestMemoryError(Exception):
    """A guest-physical access outside the guest's memory (a guest error, not a VMM bug)."""

    def __init__(self, gpa: int, length: int, reason: str = "outside guest memory") -> None:
        super().__init__(f"guest-physical access [{gpa:#x}, +{length:#x}) {reason}")
        self.gpa = gpa
        self.length = length


@dataclass
class Region:
    """A contiguous guest-physical range backed by an anonymous host mapping."""

    gpa: int
    size: int
    readonly: bool = False  # read-only to the guest (KVM read-only slot); the VMM may still write
    name: str = "ram"
    kind: str = "ram"  # "ram": guest RAM (even if read-only to it); "rom"; "private": the hypervisor's own
    mem: mmap.mmap = field(init=False, repr=False)
    view: memoryview = field(init=False, repr=False)
    words: np.ndarray = field(init=False, repr=False)  # the region as little-endian 64-bit words
    host_addr: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % mmap.PAGESIZE or self.gpa % mmap.PAGESIZE:
            raise ValueError(f"region {self.name} must be page aligned and non-empty")
        self.mem = mmap.mmap(-1, self.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        if self.size >= HUGE_PAGE:
            # Transparent huge pages: on nested KVM every first touch of a host page is a costly
            # two-level fault, so backing guest RAM with 2 MiB pages cuts those faults 512-fold.
            self.mem.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self.mem)
        self.words = np.frombuffer(self.mem, "<i8")
        self.host_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and length >= 0 and gpa + length <= self.end

    def close(self) -> None:
        self.words = np.zeros(0, "<i8")  # the array view pins the mapping
        try:
            self.view.release()
            self.mem.close()
        except BufferError:
            # Another view still lives: the address range goes with it, but the memory goes now.
            self.mem.madvise(mmap.MADV_DONTNEED)


class GuestMemory:
    """The set of regions that make up guest-physical memory."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def add(self, region: Region) -> Region:
        for other in self.regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise ValueError(f"region {region.name} overlaps {other.name}")
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def region_for(self, gpa: int, length: int) -> Region:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(gpa, length)

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        """True if the range lies wholly inside one region of guest RAM (not ROM, not hypervisor-private)."""
        return any(r.contains(gpa, length) and r.kind == "ram" for r in self.regions)

    def writable_by_guest(self, gpa: int, length: int = 1) -> bool:
        """True if the range lies in one region of RAM the guest can write (not a read-only slot)."""
        return any(r.contains(gpa, length) and r.kind == "ram" and not r.readonly for r in self.regions)

    def kind_of(self, gpa: int, length: int = 1) -> str | None:
        """The kind of the one region holding the whole range, or None."""
        for region in self.regions:
            if region.contains(gpa, length):
                return region.kind
        return None

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_for(gpa, length)
        off = gpa - region.gpa
        return bytes(region.view[off:off + length])

    def ram_words(self, gpa: int, count: int) -> np.ndarray | None:
        """A copy of ``count`` 64-bit words (int64) at ``gpa``, which must be 8-aligned and lie wholly
        in guest RAM, in one region or in adjacent ones (the page-table pool is a region of its own
        inside what the guest sees as one range of RAM); None if not. A batch of hypercalls is read
        this way."""
        if gpa & 7 or count < 0:
            return None
        parts = []
        end = gpa + 8 * count
        while True:
            region = next((r for r in self.regions if r.gpa <= gpa < r.end), None)
            if region is None or region.kind != "ram":
                return None
            first = (gpa - region.gpa) >> 3
            taken = min(end, region.end) - gpa
            parts.append(region.words[first:first + (taken >> 3)])
            gpa += taken
            if gpa >= end:
                return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region = self.region_for(gpa, len(data))
        off = gpa - region.gpa
        region.view[off:off + len(data)] = data

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def read_obj(self, gpa: int, cls: type[T]) -> T:
        """A copy of a ctypes structure read from guest memory."""
        return cls.from_buffer_copy(self.read(gpa, ctypes.sizeof(cls)))

    def write_obj(self, gpa: int, obj: ctypes.Structure) -> None:
        self.write(gpa, bytes(obj))

    def zero(self, gpa: int, length: int) -> None:
        self.write(gpa, bytes(length))

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()
