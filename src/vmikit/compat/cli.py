"""`vmikit compat`: the guest-version x hypervisor-version matrix."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vmikit.abi.history import available_versions
from vmikit.abi.model import Version
from vmikit.compat.matrix import WORKLOADS, Cell, Matrix, Options, run_matrix
from vmikit.errors import UsageError


def _versions(text: str | None) -> list[Version]:
    known = list(available_versions())
    if not text:
        return known
    out = []
    for item in text.split(","):
        try:
            major, minor = (int(x) for x in item.strip().split("."))
        except ValueError:
            raise UsageError(f"version {item!r} is not MAJOR.MINOR", "write e.g. --versions 1.0,1.2") from None
        if Version(major, minor) not in known:
            raise UsageError(f"no spec fixture for version {item.strip()}", f"use some of: {', '.join(map(str, known))}")
        out.append(Version(major, minor))
    return out


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


@click.command("compat")
@click.option("--versions", default=None, metavar="1.0,1.1,...",
              help="Interface versions to cross (default: every spec fixture).")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS),
              help="Workloads to run (repeatable; default: all).")
@click.option("--pages", type=int, default=Options.pages, show_default=True, help="mmu workload size (pages=N).")
@click.option("--switches", type=int, default=Options.switches, show_default=True, help="mmu address-space switches.")
@click.option("--paging", type=click.Choice(["native", "direct", "shadow"]), default=Options.paging,
              show_default=True, help="Page-table style of the mmu cells.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the matrix here.")
@click.option("-v", "--verbose", is_flag=True, help="Print the console of every failing cell.")
def compat(versions: str | None, workloads: tuple[str, ...], pages: int, switches: int, paging: str,
           json_file: Path | None, verbose: bool) -> None:
    """Run every guest version under every hypervisor version (conformance and mmu).

    Each version is a spec fixture: its guest is built against that version's vmi_spec.h,
    its hypervisor is a ROM and a Hypervisor made from that spec. Exits 1 if any cell fails,
    the mmu digests differ, or a guest's PASS lines depend on the hypervisor.
    """
    chosen = _versions(versions)
    opts = Options(pages=pages, switches=switches, paging=paging)
    matrix = run_matrix(chosen, workloads or WORKLOADS, opts)
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
