"""Events side by side: alarm-to-handler latency and a self-sent event's round trip, through VMI
1.4 with the kernel deprivileged and through the board's native interrupts (docs/events.md).

The bundled ``events`` guest with ``bench=N`` takes N samples of each and prints every one
(``BENCH sample ...``). It runs under two paths, interleaved in rounds (VMI, native, VMI, native,
...) so that a load spike on this shared host lands in one round rather than on one path:

- ``vmi``: the full ROM, the kernel deprivileged at ring 3: a Time alarm bound to a port, CPU.Halt,
  the upcall; EventChannel.Send to itself, the upcall, back;
- ``native``: no ROM, a bare machine, the kernel at ring 0 (emulated on kvm_pvm): the LAPIC timer
  in one-shot mode, ``sti; hlt``, its interrupt handler; a self-IPI through the LAPIC's ICR.

An alarm's latency is from its expiry (in guest cycles) to the handler's entry; a round trip is from
before the send to the guest's loop seeing the handler's count. Both are guest-measured (TSC).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmikit.errors import VmikitError

GUEST = "events"
SAMPLE = re.compile(r"^BENCH sample (\d+) alarm_latency_ns=(\d+) event_roundtrip_ns=(\d+)\s*$", re.M)
FIGURES = ("alarm_latency", "event_roundtrip")
FIGURE_DOC = {"alarm_latency": "alarm -> handler", "event_roundtrip": "event round trip"}  # the table's labels


@dataclass(frozen=True)
class EventPath:
    name: str
    rom: str
    privilege: str
    doc: str


PATHS = (
    EventPath("vmi", "full", "deprivileged", "VMI 1.4: Time alarm, CPU.Halt, EventChannel upcall; kernel at ring 3"),
    EventPath("native", "none", "ring0", "bare machine: LAPIC timer, sti; hlt, self-IPI; kernel at ring 0"),
)
PATH_BY_NAME = {p.name: p for p in PATHS}
MAX_SAMPLES = 256  # the guest's buffers


@dataclass(frozen=True)
class EventSizes:
    samples: int  # per session, each path
    rounds: int  # sessions per path, interleaved


EVENTS_FULL = EventSizes(samples=100, rounds=5)
EVENTS_QUICK = EventSizes(samples=30, rounds=3)


def run_path(image: Path, path: EventPath, samples: int, *, memory_mib: int = 128, timeout: float = 120.0) \
        -> dict[str, list[int]]:
    """One session of the events guest under ``path``: every sample of each figure, in order."""
    from vmikit.session import Session

    with Session(image, rom=path.rom, privilege=path.privilege, memory_mib=memory_mib, timeout=timeout,
                 cmdline=f"bench={samples}") as session:
        result = session.run()
    found = [(int(m.group(2)), int(m.group(3))) for m in SAMPLE.finditer(result.console)]
    if result.exit_status != 0 or len(found) != samples:
        raise VmikitError(f"events guest under the {path.name} path exited {result.exit_status} with "
                          f"{len(found)} of {samples} samples: {result.console.strip()[-200:]}",
                          f"run it alone with `vmikit run events --rom {path.rom} --cmdline bench={samples}`")
    return {"alarm_latency": [a for a, _ in found], "event_roundtrip": [r for _, r in found]}


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(image: Path, sizes: EventSizes, *, memory_mib: int = 128,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Both paths, interleaved over ``sizes.rounds`` rounds; JSON-ready (docs/bench.md, "events")."""
    samples = min(max(1, sizes.samples), MAX_SAMPLES)
    raw: dict[str, list[dict[str, list[int]]]] = {p.name: [] for p in PATHS}
    for r in range(sizes.rounds):
        for path in PATHS:
            if progress is not None:
                progress(f"events {path.name} round {r + 1}/{sizes.rounds}")
            raw[path.name].append(run_path(image, path, samples, memory_mib=memory_mib))
    cells: dict[str, dict[str, dict[str, object]]] = {}
    for figure in FIGURES:
        for path in PATHS:
            rounds = [run[figure] for run in raw[path.name]]
            every = [float(v) for run in rounds for v in run]
            cells.setdefault(figure, {})[path.name] = {
                "figure": figure, "path": path.name, "rom": path.rom, "privilege": path.privilege,
                "samples": len(every), "ns": _stats(every),
                "median_ns_by_round": [statistics.median(run) for run in rounds]}
    ratios: dict[str, float | None] = {}
    for figure in FIGURES:
        vmi, native = (float(cells[figure][p]["ns"]["median"]) for p in ("vmi", "native"))  # type: ignore[index]
        ratios[figure] = vmi / native if native else None
    return {"guest": GUEST, "cmdline": f"bench={samples}", "samples_per_round": samples, "rounds": sizes.rounds,
            "paths": {p.name: {"rom": p.rom, "privilege": p.privilege, "doc": p.doc} for p in PATHS},
            "cells": cells, "vmi_over_native": ratios}
