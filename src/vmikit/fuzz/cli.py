"""`vmikit fuzz`: the hostile guest against the hypercall surface, judged by the host."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from vmikit.errors import UsageError
from vmikit.fuzz.runner import FUZZ_PAGING, FuzzConfig, FuzzProgress, FuzzReport

# Seconds between the plain progress lines when stderr is not a terminal (tests make it small).
PROGRESS_ENV = "VMIKIT_FUZZ_PROGRESS_SECONDS"
from vmikit.outputs import EXTENSION, OUTPUT, TIMEOUT


@click.command(short_help="Fuzz the hypercall surface; exit 0 if the VMM held.")
@click.option("--calls", type=click.IntRange(1), default=20000, show_default=True, help="Fuzzed calls to make.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=1, show_default=True,
              help="PRNG seed: the same seed replays the same calls.")
@click.option("--paging", type=click.Choice(FUZZ_PAGING), default="direct", show_default=True,
              help="Page-table style under attack (both validate every update).")
@click.option("--annotations", type=click.Choice(["honour", "ignore"]), default="honour", show_default=True,
              help="Whether the hypervisor honours call annotations: honour batches queued SetPTE calls until a "
                   "FlushQueue (the batch path is fuzzed too); ignore applies each at once.")
@click.option("--privilege", type=click.Choice(["deprivileged", "ring0"]), default="deprivileged", show_default=True,
              help="Where the guest kernel runs: deprivileged at ring 3, the hypervisor owning ring 0, or at ring 0.")
@click.option("--stores/--no-stores", default=True, show_default=True,
              help="Also make plain guest stores into the ROM, the monitor area, the page-table pool and the shadow area.")
@click.option("--audit-every", type=click.IntRange(1), default=1, show_default=True,
              help="Run the page-table auditor after every K-th call that may change memory.")
@click.option("--extension", "extensions", multiple=True, type=EXTENSION,
              help="A Python file registering experimental 0xFF calls, or a bundled one by name (muladd); "
                   "they are fuzzed too (repeatable).")
@click.option("--stall", type=click.FloatRange(min=0.5), default=30.0, show_default=True,
              help="Seconds without a hypercall that count as a hang.")
@click.option("--timeout", type=TIMEOUT, default=None,
              help="Watchdog limit in seconds, at most a day (default: scaled with --calls).")
@click.option("--json", "json_file", type=OUTPUT, help="Write the report here.")
@click.option("--trace", "trace_file", type=OUTPUT,
              help="Write a trace-event timeline of every exit and call here (the newest events, bounded; "
                   "docs/observe.md).")
# Leaves out the batches across the page-table pool's boundaries (an open finding, docs/fuzz.md).
@click.option("--straddle/--no-straddle", default=True, hidden=True)
def fuzz(calls: int, seed: int, paging: str, annotations: str, privilege: str, stores: bool, audit_every: int,
         extensions: tuple[Path, ...], stall: float, timeout: float | None, json_file: Path | None,
         straddle: bool, trace_file: Path | None = None) -> None:
    """Fuzz the hypercall surface; exit 0 only if the hypervisor held."""
    from vmikit.abi import load_spec
    from vmikit.fuzz.runner import FuzzInterrupted, run_fuzz
    from vmikit.hypervisor.experimental import ExperimentalCalls, load_extension

    experimental = ExperimentalCalls()
    for extension in extensions:
        load_extension(extension, experimental)
    config = FuzzConfig(calls=calls, seed=seed, paging=paging, annotations=annotations, privilege=privilege, stores=stores,
                        audit_every=audit_every, timeout=timeout, experimental=experimental, stall=stall,
                        straddle=straddle)
    errors = load_spec().errors
    from vmikit.observe import trace

    try:
        with trace.recording(trace_file), _progress(calls) as (show, every):
            report = run_fuzz(config, progress=show, progress_every=every)
    except FuzzInterrupted as interrupted:  # what was measured so far, then the CLI's one line and 130
        if json_file is not None:
            json_file.write_text(json.dumps(interrupted.report.to_json(errors), indent=2) + "\n")
        raise
    _print(report, errors)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(errors), indent=2) + "\n")
    sys.exit(0 if report.ok else 1)


def _plain_interval() -> float:
    text = os.environ.get(PROGRESS_ENV, "5")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        raise UsageError(f"{PROGRESS_ENV}={text} is not a number of seconds", "set it to e.g. 5, or unset it")
    return seconds


@contextmanager
def _progress(target: int) -> Iterator[tuple[Callable[[FuzzProgress], None], float]]:
    """Progress on stderr: a rich bar on a terminal (calls, rate, findings), else a plain line every few seconds."""
    if not sys.stderr.isatty():
        def line(sample: FuzzProgress) -> None:
            click.echo(sample.line(), err=True)

        yield line, _plain_interval()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} calls/s"),
               TextColumn("{task.fields[findings]} findings"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fuzz", total=target, rate="-", findings=0)

        def update(sample: FuzzProgress) -> None:
            bar.update(task, completed=min(sample.calls, target), rate=f"{sample.rate:.0f}", findings=sample.findings)

        yield update, 0.5


def _print(report: FuzzReport, errors: dict[str, int]) -> None:
    g = report.guest
    exits = report.exits.get("total", "?") if report.exits else "?"
    click.echo(f"fuzz: seed={report.config.seed} paging={report.config.paging} privilege={report.config.privilege} "
               f"calls={g.calls} "
               f"(+{g.canaries} canary) stores={g.stores} experimental={g.experimental} exits={exits} "
               f"in {report.wall_seconds:.1f} s = {report.calls_per_second:.0f} calls/s; "
               f"audits={report.audits} (every {report.config.audit_every})")
    click.echo(f"  auditor: {report.audit_seconds:.2f} s = {100 * report.audit_share:.1f}% of the run "
               f"({report.audits} incremental audits re-derived {report.tables_rederived} tables; "
               f"{report.full_audits} full audits agreed: {'yes' if not report.auditor_disagreements else 'NO'})")
    ex = report.execution or {}
    if ex:
        click.echo(f"  user mode: {ex.get('user_entries', 0)} entries, {ex.get('user_refused', 0)} calls refused "
                   f"(PERMISSION); exceptions reflected: {ex.get('exceptions', 0)}; translation flushes: "
                   f"{ex.get('flushes', 0)}")
    if report.classes:
        click.echo("  classes: " + ", ".join(f"{name} {n}" for name, n in report.classes.items()))
    click.echo(f"  accepted: {g.by_status.get(0, 0)}")
    for name, n in report.rejections(errors).items():
        click.echo(f"  {name}: {n}")
    click.echo(f"  rom writes refused: {report.rom_writes_refused}; unmapped mmio: {report.mmio_unmapped}; "
               f"pool stores refused: {sum(report.refused_pool_writes.values())}")
    if report.ok:
        click.echo("fuzz: ok (no VMM exception, no hang, no invariant violation, only spec errors, "
                   "valid calls still work)")
        return
    click.echo(f"fuzz: FAILED (seed {report.config.seed}); replay with: {report.config.replay()}", err=True)
    for failure in report.failures:
        click.echo(f"  - {failure}", err=True)
    for offence in report.offences[:5]:
        click.echo(f"  host saw: {offence.line()}", err=True)
        for line in offence.detail[:3]:
            click.echo(f"      {line}", err=True)
    if g.last:
        click.echo(f"  guest FUZZ-LAST: {g.last}", err=True)
    if report.record:
        click.echo(f"  guest's last action: {report.record}", err=True)
