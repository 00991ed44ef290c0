"""What the fuzzing guest prints, parsed (its line formats are fixed in guests/fuzz.c)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

_SUMMARY = re.compile(r"^FUZZ calls=(\d+) canaries=(\d+) stores=(\d+) unexpected=(\d+) odd=(\d+) broken=(\d+)"
                      r" experimental=(\d+)$", re.MULTILINE)
_STATUS = re.compile(r"^FUZZ status=-(\d+) n=(\d+)$", re.MULTILINE)
_START = re.compile(r"^FUZZ-START .*record=0x([0-9a-f]+)(?: stats=0x([0-9a-f]+) classes=([\w,-]+))?$", re.MULTILINE)
_CLASSES = re.compile(r"^FUZZ-CLASSES((?: [\w-]+=\d+)*)$", re.MULTILINE)
_LAST = re.compile(r"^FUZZ-LAST (.*)$", re.MULTILINE)
_WHY = re.compile(r"^FUZZ-UNEXPECTED (.*)$", re.MULTILINE)
_FINAL = re.compile(r"^FUZZ-FINAL (\w+)$", re.MULTILINE)

RECORD = struct.Struct("<QQQQQQQq")  # struct fuzz_record: magic, n, kind, id, a0, a1, a2, status
RECORD_MAGIC = 0x4C41535446555A5A
RECORD_KINDS = {0: "call", 1: "store", 2: "queued"}
PENDING = 0x7FFFFFFF  # status while the call is in flight
STATS = struct.Struct("<QQQQQQ")  # struct fuzz_stats: magic, calls, unexpected, canaries, stores, nclass
STATS_MAGIC = 0x5354415446555A5A  # then nclass u64 counts, one per class in FUZZ-START's order


@dataclass
class GuestLog:
    calls: int = 0
    canaries: int = 0
    stores: int = 0
    unexpected: int = 0
    odd_statuses: int = 0
    broken: bool = False
    experimental: int = 0
    by_status: dict[int, int] = field(default_factory=dict)  # status (0, -1, ...) -> count
    record_gpa: int | None = None
    last: str | None = None  # the FUZZ-LAST line: the call before the first surprise
    why: str | None = None
    final: str | None = None
    finished: bool = False  # the summary line was printed
    stats_gpa: int | None = None  # struct fuzz_stats: the live counters (see GuestStats.read)
    class_names: tuple[str, ...] = ()  # the attack classes, in the guest's order
    classes: dict[str, int] = field(default_factory=dict)  # calls made per attack class

    @classmethod
    def parse(cls, console: str) -> GuestLog:
        log = cls()
        if m := _START.search(console):
            log.record_gpa = int(m[1], 16)
            if m[2]:
                log.stats_gpa, log.class_names = int(m[2], 16), tuple(m[3].split(","))
        if m := _CLASSES.search(console):
            log.classes = {name: int(n) for name, n in (pair.split("=") for pair in m[1].split())}
        if m := _SUMMARY.search(console):
            log.finished = True
            (log.calls, log.canaries, log.stores, log.unexpected, log.odd_statuses, broken,
             log.experimental) = (int(x) for x in m.groups())
            log.broken = bool(broken)
        log.by_status = {-int(k): int(n) for k, n in _STATUS.findall(console)}
        log.last = m[1] if (m := _LAST.search(console)) else None
        log.why = m[1] if (m := _WHY.search(console)) else None
        log.final = m[1] if (m := _FINAL.search(console)) else None
        return log


def describe_record(raw: bytes) -> str | None:
    """The guest's in-memory record of its last action, as one line (None if not a record)."""
    magic, n, kind, call_id, a0, a1, a2, status = RECORD.unpack(raw)
    if magic != RECORD_MAGIC:
        return None
    state = "in flight" if status == PENDING else f"status={status}"
    return (f"n={n} kind={RECORD_KINDS.get(kind, kind)} id={call_id:#010x} a0={a0:#x} a1={a1:#x} a2={a2:#x} "
            f"{state}")


@dataclass
class GuestStats:
    """The guest's live counters, read from its memory while it runs (progress, a partial report)."""

    calls: int
    unexpected: int
    canaries: int
    stores: int
    classes: dict[str, int]

    @classmethod
    def parse(cls, raw: bytes, names: tuple[str, ...]) -> GuestStats | None:
        """``raw``: STATS.size + 8 * len(names) bytes at the guest's stats address (None if not the struct)."""
        magic, calls, unexpected, canaries, stores, nclass = STATS.unpack_from(raw)
        if magic != STATS_MAGIC or nclass != len(names) or len(raw) < stats_size(len(names)):
            return None
        counts = struct.unpack_from(f"<{nclass}Q", raw, STATS.size)
        return cls(calls, unexpected, canaries, stores, dict(zip(names, counts)))


def stats_size(nclass: int) -> int:
    return STATS.size + 8 * nclass
