"""TLB shootdown cost against the number of CPUs (issue 16, docs/smp.md): VMI beside native IPIs.

One machine of ``CPUS`` vCPUs per path and round; each guest flushes the TLBs of CPUs 0..n-1 for
n = 1, 2, 4 and prints every sample (guest TSC cycles). Paths, interleaved in rounds (VMI, native,
VMI, ...) so that a load spike on this shared host lands in one round, not on one path:

- ``vmi``: the ``smpvmi`` guest under the full ROM, the kernel deprivileged at ring 3 (direct
  paging, queue honoured): one MMU.FlushTLBMulti for the whole set (``vmi``), beside each target
  flushing itself with MMU.FlushTLB when CPU 0 asks through a mailbox (``percpu``: one exit per
  CPU, what a VMI guest without the multi-CPU call would do);
- ``native``: the ``smp`` guest on a bare machine (no ROM, ring 0, emulated on kvm_pvm): an IPI
  to each target, whose handler reloads CR3 and acknowledges (``ipi``).

The targets of ``percpu`` spin on their mailbox at ring 3; on a host with fewer cores than vCPUs
they share cores with CPU 0, which the report says (``host_cpus``).
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmikit.errors import VmikitError

CPUS = 4
SAMPLE = re.compile(r"^BENCH shootdown cpus=(\d+) (\w+)_cycles=(\d+)(?: (\w+)_cycles=(\d+))?\s*$", re.M)


@dataclass(frozen=True)
class ShootdownPath:
    name: str
    guest: str
    rom: str
    privilege: str
    paging: str
    figures: tuple[str, ...]  # the sample names its guest prints
    doc: str


PATHS = (
    ShootdownPath("vmi", "smpvmi", "full", "deprivileged", "direct", ("vmi", "percpu"),
                  "VMI 1.5, kernel at ring 3: one FlushTLBMulti (vmi) / each CPU its own FlushTLB (percpu)"),
    ShootdownPath("native", "smp", "none", "ring0", "native", ("ipi",),
                  "bare machine, kernel at ring 0 (emulated here): an IPI per target, CR3 reload, ack"),
)


@dataclass(frozen=True)
class ShootdownSizes:
    samples: int  # per session and CPU count
    rounds: int


SHOOTDOWN_FULL = ShootdownSizes(samples=30, rounds=3)
SHOOTDOWN_QUICK = ShootdownSizes(samples=10, rounds=2)


def parse(console: str) -> dict[tuple[str, int], list[int]]:
    """(figure, CPUs) -> the samples in order."""
    found: dict[tuple[str, int], list[int]] = {}
    for m in SAMPLE.finditer(console):
        cpus = int(m.group(1))
        for name, value in ((m.group(2), m.group(3)), (m.group(4), m.group(5))):
            if name is not None:
                found.setdefault((name, cpus), []).append(int(value))
    return found


def run_path(path: ShootdownPath, samples: int, *, memory_mib: int = 256,
             timeout: float = 300.0) -> tuple[dict[tuple[str, int], list[int]], int]:
    """One session of ``path``'s guest on CPUS vCPUs: its samples and the TSC rate (kHz)."""
    from vmikit.guest.build import build_guest
    from vmikit.session import Session

    with Session(build_guest(path.guest), rom=path.rom, privilege=path.privilege, paging=path.paging,
                 memory_mib=memory_mib, timeout=timeout, cmdline=f"bench={samples}", cpus=CPUS) as session:
        khz = session.machine.vcpu.tsc_khz() or 0
        result = session.run()
    found = parse(result.console)
    want = {(f, n) for f in path.figures for n in (1, 2, 4)}
    if result.exit_status != 0 or not khz or any(len(found.get(key, [])) != samples for key in want):
        raise VmikitError(f"the {path.guest} guest's shootdown bench exited {result.exit_status} with "
                          f"{sum(len(v) for v in found.values())} samples: {result.console.strip()[-200:]}",
                          f"run it alone with `vmikit run {path.guest} --cpus {CPUS} --rom {path.rom} "
                          f"--cmdline bench={samples}`")
    return found, khz


def measure(sizes: ShootdownSizes, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every path, interleaved over ``sizes.rounds``; JSON-ready (docs/bench.md, "shootdown")."""
    samples = max(1, sizes.samples)
    every: dict[tuple[str, int], list[float]] = {}
    by_round: dict[tuple[str, int], list[float]] = {}
    for r in range(sizes.rounds):
        for path in PATHS:
            if progress is not None:
                progress(f"shootdown {path.name} round {r + 1}/{sizes.rounds}")
            found, khz = run_path(path, samples)
            for key, cycles in found.items():
                times = [v * 1e6 / khz for v in cycles]
                every.setdefault(key, []).extend(times)
                by_round.setdefault(key, []).append(statistics.median(times))
    cells: dict[str, dict[str, object]] = {}
    for path in PATHS:
        for figure in path.figures:
            for n in (1, 2, 4):
                ns = every[(figure, n)]
                cells[f"{figure}.{n}"] = {
                    "figure": figure, "cpus": n, "path": path.name, "rom": path.rom, "privilege": path.privilege,
                    "samples": len(ns), "ns": {"min": min(ns), "median": statistics.median(ns), "max": max(ns)},
                    "median_ns_by_round": by_round[(figure, n)]}
    return {"vcpus": CPUS, "host_cpus": os.cpu_count(), "samples_per_round": samples, "rounds": sizes.rounds,
            "paths": {p.name: {"guest": p.guest, "rom": p.rom, "privilege": p.privilege, "doc": p.doc}
                      for p in PATHS},
            "cells": cells}
