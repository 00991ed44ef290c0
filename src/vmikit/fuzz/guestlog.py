"""What the fuzzing guest prints, parsed (its line formats are fixed in guests/fuzz.c)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

_SUMMARY = re.compile(r"^FUZZ calls=(\d+) canaries=(\d+) stores=(\d+) unexpected=(\d+) odd=(\d+) broken=(\d+)"
                      r" experimental=(\d+)$", re.MULTILINE)
_STATUS = re.compile(r"^FUZZ status=-(\d+) n=(\d+)$", re.MULTILINE)
_START = re.compile(r"^FUZZ-START .*record=0x([0-9a-f]+)$", re.MULTILINE)
_LAST = re.compile(r"^FUZZ-LAST (.*)$", re.MULTILINE)
_WHY = re.compile(r"^FUZZ-UNEXPECTED (.*)$", re.MULTILINE)
_FINAL = re.compile(r"^FUZZ-FINAL (\w+)$", re.MULTILINE)

RECORD = struct.Struct("<QQQQQQQq")  # struct fuzz_record: magic, n, kind, id, a0, a1, a2, status
RECORD_MAGIC = 0x4C41535446555A5A
RECORD_KINDS = {0: "call", 1: "store", 2: "queued"}
PENDING = 0x7FFFFFFF  # status while the call is in flight


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

    @classmethod
    def parse(cls, console: str) -> GuestLog:
        log = cls()
        if m := _START.search(console):
            log.record_gpa = int(m[1], 16)
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
