"""`vmikit kvm-unit-tests TREE`: the suite under QEMU-KVM and under vmikit, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vmikit.errors import UsageError
from vmikit.kut.runner import qemu_command, run_case, vmikit_command
from vmikit.kut.suite import CPU_CHOICES, Case, Outcome, covered, load_cases
from vmikit.outputs import OUTPUT, TIMEOUT


def _row(case: Case, qemu: Outcome | None, vmikit: Outcome | None) -> dict[str, object]:
    row: dict[str, object] = {"test": case.name, "image": case.image.name, "args": case.cmdline, "cpus": case.smp}
    for side, outcome in (("qemu", qemu), ("vmikit", vmikit)):
        if outcome is not None:
            row[side] = outcome.__dict__
    if qemu is not None and vmikit is not None:
        row["same"] = qemu.same_result(vmikit)
    return row


def load_reference(path: Path) -> dict[str, Outcome]:
    """QEMU's outcomes by case name from an earlier ``--json``; a file that is not one is refused."""
    fix = "give a file written by `vmikit kvm-unit-tests ... --json`"
    try:
        rows = json.loads(path.read_text())
        return {str(row["test"]): Outcome(**row["qemu"]) for row in rows if "qemu" in row}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"cannot read QEMU results from {path} ({type(exc).__name__})", fix) from None


def _same(row: dict[str, object], no: str) -> str:
    same = row.get("same")
    return "" if same is None else "yes" if same else no


def _markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| test | CPUs | QEMU-KVM | s | vmikit | s | same |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row['test']}`", str(row.get("cpus", 1))]
        for side in ("qemu", "vmikit"):
            outcome = row.get(side)
            if isinstance(outcome, dict):
                cells += [str(outcome["summary"]).replace("|", "\\|"), f"{outcome['seconds']:.0f}"]
            else:
                cells += ["not run", ""]
        cells.append(_same(row, "**no**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command("kvm-unit-tests", short_help="Run kvm-unit-tests under QEMU-KVM and vmikit.")
@click.argument("tree", type=click.Path(file_okay=False, path_type=Path))
@click.option("--test", "names", multiple=True, metavar="NAME", help="Only this case of x86/unittests.cfg (repeatable).")
@click.option("--cpus", "cpus", type=click.Choice(CPU_CHOICES), default="all", show_default=True,
              help="Which cases: every 64-bit case on at most 8 CPUs, the one-CPU cases (up) or the SMP ones "
                   "(the case's smp = N: QEMU -smp N, vmikit --cpus N).")
@click.option("--machine", type=click.Choice(["both", "qemu", "vmikit"]), default="both", show_default=True,
              help="Which machines to run each case on.")
@click.option("--timeout", type=TIMEOUT, default=None,
              help="Seconds per case and machine (default: the case's own, or 300).")
@click.option("--qemu-results", "qemu_results", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Take QEMU's outcomes from this earlier --json instead of running QEMU again (the reference "
                   "does not change with vmikit).")
@click.option("--json", "json_file", type=OUTPUT, help="Write every outcome here.")
@click.option("--markdown", "markdown_file", type=OUTPUT, help="Write the comparison table here (Markdown).")
def kvm_unit_tests(tree: Path, names: tuple[str, ...], machine: str, timeout: float | None,
                   qemu_results: Path | None, json_file: Path | None, markdown_file: Path | None,
                   cpus: str = "all") -> None:
    """Run the 64-bit x86 cases of a built kvm-unit-tests TREE (./configure && make) under QEMU
    with KVM and under vmikit's bare board (--rom none), each with the CPUs it asks for, and show
    whether each reaches the same SUMMARY with the same PASS/FAIL/SKIP counts. Exit 1 if a case
    QEMU finishes differs."""
    from rich.console import Console
    from rich.table import Table

    cases = covered(load_cases(tree), cpus)
    if names:
        unknown = sorted(set(names) - {c.name for c in cases})
        if unknown:
            raise UsageError(f"no 64-bit case named {', '.join(unknown)} with --cpus {cpus} in {tree}",
                             "choose names from x86/unittests.cfg (at most 8 CPUs), or --cpus all")
        cases = [c for c in cases if c.name in names]
    reference = load_reference(qemu_results) if qemu_results is not None else {}
    rows = []
    console = Console(stderr=True)
    for case in cases:
        limit = timeout or case.timeout
        qemu = reference.get(case.name) or (run_case(qemu_command(case), limit, debug_exit=True)
                                             if machine in ("both", "qemu") else None)
        vmikit = run_case(vmikit_command(case, limit), limit + 30) if machine in ("both", "vmikit") else None
        rows.append(_row(case, qemu, vmikit))
        console.print(f"{case.name}: qemu: {qemu.summary if qemu else '-'} | vmikit: {vmikit.summary if vmikit else '-'}")
    table = Table(title=f"kvm-unit-tests x86 ({cpus} cases)")
    for column in ("test", "QEMU-KVM", "vmikit", "same"):
        table.add_column(column)
    for row in rows:
        q, v = row.get("qemu"), row.get("vmikit")
        table.add_row(str(row["test"]), str(q["summary"]) if isinstance(q, dict) else "-",
                      str(v["summary"]) if isinstance(v, dict) else "-",
                      _same(row, "no") or "-")
    Console().print(table)
    if json_file is not None:
        json_file.write_text(json.dumps(rows, indent=2) + "\n")
    if markdown_file is not None:
        markdown_file.write_text(_markdown(rows))
    differs = [r for r in rows if r.get("same") is False and isinstance(r.get("qemu"), dict)
               and r["qemu"]["status"] == "summary"]  # type: ignore[index]
    raise SystemExit(1 if differs else 0)
