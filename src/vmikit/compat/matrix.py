"""Run every guest version under every hypervisor version and check the outcome.

A hypervisor of version V = a full ROM built from V's spec + Hypervisor(spec=V) (+ the
EventChannel family where V has it). A cell passes when the guest reports no FAIL and exits 0.
The matrix passes when every cell does, every mmu cell prints the digest a bare machine
prints, and a guest's PASS lines do not depend on the hypervisor it ran under.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vmikit.abi.history import version_path
from vmikit.abi.model import Spec, Version
from vmikit.abi.spec import load_spec
from vmikit.compat.guests import build_for
from vmikit.errors import VmikitError
from vmikit.session import Session

WORKLOADS = ("conformance", "mmu")
_DIGEST = re.compile(r"^DIGEST ([0-9a-f]{16})$", re.MULTILINE)


@dataclass(frozen=True)
class Options:
    pages: int = 256  # mmu size: guest code is slow here (~1-2 us a loop iteration)
    switches: int = 16
    paging: str = "direct"  # validated page tables: the hypervisor checks every update
    timeout: float = 60.0


@dataclass(frozen=True)
class Cell:
    guest: Version
    hypervisor: Version | None  # None: a bare machine (the reference)
    workload: str
    exit_status: int
    console: str
    error: str = ""  # a build or run failure, one line
    hypercalls: int = 0  # hypercall exits: batching shows here, never in the result

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()

    @property
    def passes(self) -> list[str]:
        return [line for line in self.lines if line.startswith("PASS: ")]

    @property
    def fails(self) -> list[str]:
        return [line for line in self.lines if line.startswith("FAIL")]

    @property
    def digest(self) -> str | None:
        found = _DIGEST.findall(self.console)
        return found[0] if len(found) == 1 else None

    @property
    def ok(self) -> bool:
        done = any(re.match(r"^DONE pass=\d+ fail=0$", line) for line in self.lines)
        return not self.error and self.exit_status == 0 and done and not self.fails and bool(self.passes)

    def note(self) -> str:
        """What the cell learnt, in a few words (INFO lines of the compat guest)."""
        if self.error:
            return self.error
        if self.workload == "mmu":
            return f"digest {self.digest or '?'}, {self.hypercalls} hypercall exits"
        words = []
        for line in self.lines:
            if line.startswith("INFO: queued SetPTE "):
                words.append("queue batched" if "deferred" in line else "queue plain")
            elif line.startswith("INFO: event channel "):
                words.append("evtchn hv" if "hypervisor" in line else "evtchn fallback")
            elif line.startswith("INFO: time "):
                words.append("time hv" if "hypervisor" in line else "time fallback")
            elif line.startswith("INFO: upcalls "):
                words.append("upcalls" if "from the hypervisor" in line else "no upcalls")
            elif line.startswith("INFO: hypervisor VMI "):
                words.append("query" if "Query.GetVersion" in line else "rom header")
            elif re.match(r"^INFO: \d+ of \d+ calls through the ROM", line):
                words.append(line.split()[1] + "/" + line.split()[3] + " via rom")
        return ", ".join(words)


@dataclass
class Matrix:
    versions: list[Version]
    workloads: list[str]
    cells: list[Cell] = field(default_factory=list)
    reference: Cell | None = None  # mmu on a bare machine

    def cell(self, guest: Version, hypervisor: Version, workload: str) -> Cell:
        return next(c for c in self.cells if (c.guest, c.hypervisor, c.workload) == (guest, hypervisor, workload))

    def problems(self) -> list[str]:
        out = [f"{c.workload}: guest {c.guest} on hypervisor {c.hypervisor}: "
               + (c.error or (c.fails[0] if c.fails else f"exit status {c.exit_status}"))
               for c in self.cells if not c.ok]
        if "mmu" in self.workloads:
            want = self.reference.digest if self.reference else None
            if want is None:
                out.append("mmu: the bare-machine reference printed no digest")
            digests = {c.digest for c in self.cells if c.workload == "mmu"}
            if digests != {want}:
                out.append(f"mmu: digests differ: {sorted(str(d) for d in digests)} (bare machine: {want})")
        for workload in self.workloads:
            for guest in self.versions:
                row = [c for c in self.cells if c.guest == guest and c.workload == workload]
                if len({tuple(c.passes) for c in row}) > 1:
                    out.append(f"{workload}: guest {guest}'s PASS lines depend on the hypervisor version")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def hypervisor_spec(version: Version) -> Spec:
    return load_spec(version_path(version))


def run_cell(image: Path, guest: Version, hypervisor: Version | None, workload: str, opts: Options) -> Cell:
    """One guest image under one hypervisor version (None: no ROM, no hypervisor)."""
    out: list[bytes] = []
    cmdline = f"pages={opts.pages} switches={opts.switches}" if workload == "mmu" else ""
    try:
        if hypervisor is None:
            session = Session(image, rom="none", cmdline=cmdline, timeout=opts.timeout, console=out.append)
        else:
            spec = hypervisor_spec(hypervisor)
            # A hypervisor honours the annotations its version defines (1.0 defines none).
            annotations = "honour" if spec.annotations else "ignore"
            paging = opts.paging if workload == "mmu" else "native"
            session = Session(image, rom="full", annotations=annotations, paging=paging, cmdline=cmdline,
                              timeout=opts.timeout, console=out.append, spec=spec)
        with session:
            result = session.run()
        exits = sum(counts["exits"] or 0 for counts in result.by_call.values())
        return Cell(guest, hypervisor, workload, result.exit_status, result.console, hypercalls=exits)
    except VmikitError as err:
        return Cell(guest, hypervisor, workload, -1, b"".join(out).decode(errors="replace"), str(err))


def run_matrix(versions: Iterable[Version], workloads: Iterable[str] = WORKLOADS, opts: Options = Options(),
               progress: Callable[[Cell], None] | None = None) -> Matrix:
    matrix = Matrix(list(versions), list(workloads))
    for workload in matrix.workloads:
        for guest in matrix.versions:
            try:
                image = build_for(workload, guest)
            except VmikitError as err:
                for hv in matrix.versions:
                    matrix.cells.append(Cell(guest, hv, workload, -1, "", f"build failed: {err}"))
                    if progress is not None:
                        progress(matrix.cells[-1])
                continue
            if workload == "mmu" and matrix.reference is None:
                matrix.reference = run_cell(image, guest, None, workload, opts)
            for hv in matrix.versions:
                cell = run_cell(image, guest, hv, workload, opts)
                matrix.cells.append(cell)
                if progress is not None:
                    progress(cell)
    return matrix
