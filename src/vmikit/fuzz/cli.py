"""`vmikit fuzz`: the hostile guest against the hypercall surface, judged by the host."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vmikit.fuzz.runner import FUZZ_PAGING, FuzzConfig, FuzzReport
from vmikit.outputs import EXTENSION, OUTPUT, TIMEOUT


@click.command()
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
def fuzz(calls: int, seed: int, paging: str, annotations: str, privilege: str, stores: bool, audit_every: int,
         extensions: tuple[Path, ...], stall: float, timeout: float | None, json_file: Path | None) -> None:
    """Fuzz the hypercall surface; exit 0 only if the hypervisor held."""
    from vmikit.abi import load_spec
    from vmikit.fuzz.runner import run_fuzz
    from vmikit.hypervisor.experimental import ExperimentalCalls, load_extension

    experimental = ExperimentalCalls()
    for extension in extensions:
        load_extension(extension, experimental)
    config = FuzzConfig(calls=calls, seed=seed, paging=paging, annotations=annotations, privilege=privilege, stores=stores,
                        audit_every=audit_every, timeout=timeout, experimental=experimental, stall=stall)
    report = run_fuzz(config)
    errors = load_spec().errors
    _print(report, errors)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(errors), indent=2) + "\n")
    sys.exit(0 if report.ok else 1)


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
