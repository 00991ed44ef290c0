"""`vmikit trace summary FILE.json`: per call, how many, the VMM's time and the exit's, the longest.

A trace file is host input like any other: it is read with a size bound, and anything that is
not a trace-event file (not JSON, no event list, events without the fields, non-numeric times)
is refused in one line naming what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmikit.errors import UsageError

TRACE_FILE_MAX = 1 << 30  # bytes; a --trace file is bounded far below this
TOP_SLICES = 5
REQUIRED_FIELDS = ("ph", "ts", "pid", "tid", "name")


def _bad(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} is not a vmikit trace: {what}", "give a file written by --trace (trace-event JSON)")


def load_events(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(events, otherData) of a trace-event file; UsageError in one line for anything else."""
    try:
        size = path.stat().st_size
        if size > TRACE_FILE_MAX:
            raise _bad(path, f"{size} bytes, more than {TRACE_FILE_MAX}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no trace file {path}", "give the path a --trace option wrote") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read trace {path} ({getattr(err, 'strerror', None) or err})",
                         "give a readable trace-event JSON file") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise _bad(path, f"invalid JSON ({err})"[:200]) from None
    other: dict[str, Any] = {}
    if isinstance(data, list):
        events = data
    elif isinstance(data, dict) and isinstance(data.get("traceEvents"), list):
        events, other = data["traceEvents"], data.get("otherData") or {}
    else:
        raise _bad(path, "no traceEvents list")
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise _bad(path, f"event {index} is not an object")
        missing = [f for f in REQUIRED_FIELDS if f not in event]
        if missing:
            raise _bad(path, f"event {index} has no {', '.join(missing)}")
        for key in ("pid", "tid"):
            if isinstance(event[key], bool) or not isinstance(event[key], (int, str)):
                raise _bad(path, f"event {index} has a {key} that is neither a number nor a string")
        for key in ("ts", "dur"):
            value = event.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _bad(path, f"event {index} has a non-numeric {key}")
    return events, other if isinstance(other, dict) else {}


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[rank]


@dataclass
class CallStats:
    name: str
    call_id: str | None
    exit_us: list[float] = field(default_factory=list)
    vmm_us: list[float] = field(default_factory=list)
    longest: list[tuple[float, float, int]] = field(default_factory=list)  # (dur, ts, pid)

    def to_json(self) -> dict[str, object]:
        def stats(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            ordered = sorted(values)
            return {"min": ordered[0], "median": _percentile(ordered, 50), "p99": _percentile(ordered, 99),
                    "max": ordered[-1], "total": round(sum(ordered), 3)}

        return {"name": self.name, "call_id": self.call_id, "count": len(self.exit_us),
                "vmm_us": stats(self.vmm_us), "exit_us": stats(self.exit_us),
                "longest": [{"dur_us": d, "ts_us": t, "pid": p}
                            for d, t, p in sorted(self.longest, reverse=True)[:TOP_SLICES]]}


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per call (the exit slices named by a VMI call, keyed by call ID) and per other exit kind."""
    calls: dict[tuple[str, str | None], CallStats] = {}
    vmm: dict[tuple[int, int], list[tuple[float, float]]] = {}
    guest_us = 0.0
    for event in events:
        cat = event.get("cat")
        if event.get("ph") != "X":
            continue
        if cat == "vmm":
            vmm.setdefault((event["pid"], event["tid"]), []).append((float(event["ts"]), float(event.get("dur", 0))))
        elif cat == "guest":
            guest_us += float(event.get("dur", 0))
    for spans in vmm.values():
        spans.sort()
    for event in events:
        if event.get("ph") != "X" or event.get("cat") != "exit":
            continue
        raw_args = event.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        call_id = args.get("call_id") if isinstance(args.get("call_id"), str) else None
        key = (str(event["name"]), call_id)
        stats = calls.get(key)
        if stats is None:
            stats = calls[key] = CallStats(str(event["name"]), call_id)
        ts, dur = float(event["ts"]), float(event.get("dur", 0))
        stats.exit_us.append(dur)
        inside = _vmm_inside(vmm.get((event["pid"], event["tid"]), []), ts, ts + dur)
        if inside is not None:
            stats.vmm_us.append(inside)
        stats.longest.append((dur, ts, int(event["pid"]) if isinstance(event["pid"], int) else 0))
        if len(stats.longest) > 4 * TOP_SLICES:  # keep the list short: only the top few matter
            stats.longest = sorted(stats.longest, reverse=True)[:TOP_SLICES]
    rows = sorted((s.to_json() for s in calls.values()), key=lambda r: -sum(calls_total(r)))
    return {"calls": rows, "guest_us": round(guest_us, 3), "exits": sum(len(s.exit_us) for s in calls.values())}


def calls_total(row: dict[str, object]) -> list[float]:
    stats = row.get("exit_us")
    return [float(stats["total"])] if isinstance(stats, dict) else []


def _vmm_inside(spans: list[tuple[float, float]], start: float, end: float) -> float | None:
    """The VMM slice within [start, end] on the same track (a binary search over sorted spans)."""
    lo, hi = 0, len(spans)
    while lo < hi:
        mid = (lo + hi) // 2
        if spans[mid][0] < start:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(spans) and spans[lo][0] <= end + 1e-3:
        return spans[lo][1]
    return None


def print_summary(summary: dict[str, Any], other: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    console = Console(width=None if sys.stdout.isatty() else 150)  # a pipe or file: no squeezed columns
    dropped = other.get("events_dropped")
    title = f"{summary['exits']} exits; guest time {summary['guest_us'] / 1e6:.3f} s"
    if dropped:
        title += f" (ring buffer: {dropped} older events dropped)"
    table = Table(title=title)
    for column in ("call / exit", "id", "count", "VMM µs min", "median", "p99", "max", "exit µs median", "p99",
                   "exit total ms"):
        table.add_column(column, justify="left" if column in ("call / exit", "id") else "right")

    def fmt(stats: dict[str, float] | None, key: str) -> str:
        return "-" if not stats else f"{stats[key]:.1f}"

    for row in summary["calls"]:
        vmm, ex = row["vmm_us"], row["exit_us"]
        table.add_row(row["name"], row["call_id"] or "", str(row["count"]), fmt(vmm, "min"), fmt(vmm, "median"),
                      fmt(vmm, "p99"), fmt(vmm, "max"), fmt(ex, "median"), fmt(ex, "p99"),
                      f"{(ex or {}).get('total', 0) / 1000:.2f}")
    console.print(table)
    longest = sorted(((s["dur_us"], s["ts_us"], row["name"]) for row in summary["calls"] for s in row["longest"]),
                     reverse=True)[:TOP_SLICES]
    if longest:
        top = Table(title=f"the {len(longest)} longest exits")
        for column in ("exit", "at (ms)", "µs"):
            top.add_column(column, justify="left" if column == "exit" else "right")
        for dur, ts, name in longest:
            top.add_row(name, f"{ts / 1000:.3f}", f"{dur:.1f}")
        console.print(top)
