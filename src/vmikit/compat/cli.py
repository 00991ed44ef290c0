"""`vmikit compat`: the guest-version x hypervisor-version matrix."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import TracebackType

import click

from vmikit.abi.history import available_versions
from vmikit.abi.model import Version
from vmikit.compat.matrix import WORKLOADS, Cell, Matrix, Options, run_matrix
from vmikit.errors import UsageError
from vmikit.kvm.api import DEFAULT_DEVICE
from vmikit.outputs import OUTPUT

# The device checked before the first cell (tests point it at a missing path).
KVM_DEVICE = DEFAULT_DEVICE
# Seconds between progress lines when stderr is not a terminal (a CI log, a file).
PLAIN_PROGRESS_EVERY_S = 5.0


def _items(values: tuple[str, ...]) -> list[str]:
    """Repeatable options that also take comma lists: ("1.0,1.1", "1.2") -> ["1.0", "1.1", "1.2"]."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _versions(values: tuple[str, ...]) -> list[Version]:
    known = list(available_versions())
    if not _items(values):
        return known
    out = []
    for item in _items(values):
        try:
            major, minor = (int(x) for x in item.split("."))
        except ValueError:
            raise UsageError(f"version {item!r} is not MAJOR.MINOR", "write e.g. --versions 1.0,1.2") from None
        if Version(major, minor) not in known:
            raise UsageError(f"no spec fixture for version {item}", f"use some of: {', '.join(map(str, known))}")
        if Version(major, minor) not in out:
            out.append(Version(major, minor))
    return out


def _workloads(values: tuple[str, ...]) -> tuple[str, ...]:
    chosen = _items(values)
    for item in chosen:
        if item not in WORKLOADS:
            raise UsageError(f"unknown workload '{item}'", f"choose from: {', '.join(WORKLOADS)}")
    return tuple(w for w in WORKLOADS if w in chosen) if chosen else WORKLOADS


class _Progress:
    """Cells done on stderr: a live bar on a terminal, a plain line every few seconds otherwise
    (and at the start and the end), so a log shows the run is alive and how far it got."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task("compat", total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        else:
            self._line()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif kind is None:
            self._line()

    def _line(self) -> None:
        click.echo(f"compat: {self.done}/{self.total} cells done, {time.monotonic() - self.started:.0f} s", err=True)
        self.last = time.monotonic()

    def __call__(self, cell: Cell) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            description=f"{cell.workload}: guest {cell.guest} on hypervisor {cell.hypervisor}")
        elif self.done < self.total and time.monotonic() - self.last >= PLAIN_PROGRESS_EVERY_S:
            self._line()


def _table(matrix: Matrix) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="guest version (rows) x hypervisor version (columns)")
    table.add_column("guest")
    table.add_column("workload")
    for hv in matrix.versions:
        table.add_column(f"hypervisor {hv}")
    for workload in matrix.workloads:
        for guest in matrix.versions:
            row = [str(guest), workload]
            for hv in matrix.versions:
                cell = matrix.cell(guest, hv, workload)
                mark = "[green]ok[/green]" if cell.ok else "[red]FAIL[/red]"
                row.append(f"{mark} {cell.note()}")
            table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped (CI logs): do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    if matrix.reference is not None:
        console.print(f"mmu on a bare machine (no ROM): digest {matrix.reference.digest}")


def _summary(matrix: Matrix) -> dict[str, object]:
    def cell(c: Cell) -> dict[str, object]:
        return {"guest": str(c.guest), "hypervisor": str(c.hypervisor), "workload": c.workload, "ok": c.ok,
                "exit_status": c.exit_status, "digest": c.digest, "hypercalls": c.hypercalls,
                "passes": len(c.passes), "fails": c.fails, "note": c.note()}

    return {"versions": [str(v) for v in matrix.versions], "ok": matrix.ok, "problems": matrix.problems(),
            "reference_digest": matrix.reference.digest if matrix.reference else None,
            "cells": [cell(c) for c in matrix.cells]}


@click.command("compat", short_help="Run every guest version under every hypervisor version.")
@click.option("--versions", "versions", multiple=True, metavar="1.0,1.1,...",
              help="Interface versions to cross (repeatable; default: every spec fixture).")
@click.option("--workload", "workloads", multiple=True, metavar="NAME[,NAME]",
              help=f"Workloads to run (repeatable): {', '.join(WORKLOADS)} (default: all).")
@click.option("--pages", "-n", type=click.IntRange(1, 32768), default=Options.pages, show_default=True,
              help="mmu workload size (pages=N).")
@click.option("--switches", "-m", type=click.IntRange(1, 1_000_000), default=Options.switches, show_default=True,
              help="mmu address-space switches.")
@click.option("--paging", type=click.Choice(["native", "direct", "shadow"]), default=Options.paging,
              show_default=True, help="Page-table style of the mmu cells.")
@click.option("--json", "json_file", type=OUTPUT, help="Write the matrix here.")
@click.option("-v", "--verbose", is_flag=True, help="Print the console of every failing cell.")
def compat(versions: tuple[str, ...], workloads: tuple[str, ...], pages: int, switches: int, paging: str,
           json_file: Path | None, verbose: bool) -> None:
    """Run every guest version under every hypervisor version (conformance and mmu).

    Each version is a spec fixture: its guest is built against that version's vmi_spec.h,
    its hypervisor is a ROM and a Hypervisor made from that spec. Exits 1 if any cell fails,
    the mmu digests differ, or a guest's PASS lines depend on the hypervisor.
    """
    from vmikit.kvm.api import Kvm

    chosen = _versions(versions)
    selected = _workloads(workloads)
    opts = Options(pages=pages, switches=switches, paging=paging)
    Kvm(KVM_DEVICE).close()  # no KVM: one line and exit 3 now, not the same error in every cell
    with _Progress(len(selected) * len(chosen) ** 2) as progress:
        matrix = run_matrix(chosen, selected, opts, progress=progress)
    _table(matrix)
    problems = matrix.problems()
    for problem in problems:
        click.echo(f"problem: {problem}")
        if verbose:
            for c in matrix.cells:
                if not c.ok and problem.startswith(f"{c.workload}: guest {c.guest} on hypervisor {c.hypervisor}:"):
                    click.echo(c.console)
    if json_file is not None:
        json_file.write_text(json.dumps(_summary(matrix), indent=2) + "\n")
    cells = len(matrix.cells)
    click.echo(f"compat: {cells - sum(not c.ok for c in matrix.cells)}/{cells} cells pass; "
               + ("OK" if not problems else f"{len(problems)} problem(s)"))
    if problems:
        raise click.exceptions.Exit(1)
