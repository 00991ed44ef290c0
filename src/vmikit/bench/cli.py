"""`vmikit bench`: every workload under every profile, as a table, JSON and a chart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from vmikit.bench.workloads import FULL, PROFILE_BY_NAME, PROFILE_NAMES, QUICK, QUICK_PROFILES, WORKLOAD_NAMES
from vmikit.errors import UsageError
from vmikit.outputs import OUTPUT

PAGING_STYLES = tuple(dict.fromkeys(PROFILE_BY_NAME[n].paging for n in PROFILE_NAMES))


def _split(values: tuple[str, ...], choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item not in choices:
                raise UsageError(f"unknown {what} '{item}'", f"choose from: {', '.join(choices)}")
            if item not in chosen:
                chosen.append(item)
    return tuple(c for c in choices if c in chosen) if chosen else choices


@click.command(short_help="Measure what each VMI call costs, profile by profile.")
@click.option("--quick", is_flag=True,
              help=f"Small sizes ({QUICK.n} pages, {QUICK.reps} reps) and, unless --profile says otherwise, only "
                   f"{', '.join(QUICK_PROFILES)}: every deprivileged profile and one ring-0 comparison (the other "
                   "-ring0 twins would double the run): about half a minute.")
@click.option("--workload", "workloads", multiple=True, metavar="NAME[,NAME]",
              help=f"Only these workloads (repeatable): {', '.join(WORKLOAD_NAMES)}.")
@click.option("--profile", "profiles", multiple=True, metavar="NAME[,NAME]",
              help=f"Only these profiles (repeatable): {', '.join(PROFILE_NAMES)}. Profiles with a ROM run the "
                   "kernel deprivileged at ring 3; each -ring0 twin keeps it at ring 0.")
@click.option("--paging", "pagings", multiple=True, metavar="STYLE[,STYLE]",
              help=f"Only the profiles of these page-table styles (repeatable): {', '.join(PAGING_STYLES)}; "
                   "with --profile, the profiles both select.")
@click.option("--pages", "-n", type=click.IntRange(1, 32768), default=None, help="Pages per MMU workload.")
@click.option("--switches", "-m", type=click.IntRange(1, 1_000_000), default=None, help="Address-space switches.")
@click.option("--calls", type=click.IntRange(1, 10_000_000), default=None, help="Iterations of null/rdtsc/cpuid.")
@click.option("--reps", type=click.IntRange(1, 1000), default=None, help="Repetitions of every cell.")
@click.option("--no-c-reference", is_flag=True, help="Skip the C reference VMM.")
@click.option("--no-memory", is_flag=True, help="Skip the VMM memory probe (a child process).")
@click.option("--no-events", is_flag=True,
              help="Skip the events section (alarm latency and event round trip, VMI beside native interrupts).")
@click.option("--no-shootdown", is_flag=True,
              help="Skip the shootdown section (TLB flush of 1, 2 and 4 CPUs, VMI beside native IPIs).")
@click.option("--json", "json_file", type=OUTPUT,
              help="Write all results here (after Ctrl-C: what was measured, marked \"partial\": true).")
@click.option("--plot", "plot_file", type=OUTPUT, help="Write a chart (PNG) here.")
@click.option("--trace", "trace_file", type=OUTPUT,
              help="Write a trace-event timeline of every session's exits and calls here (one process track per "
                   "profile; docs/observe.md). Tracing costs time per exit: its figures are not the untraced ones.")
def bench(quick: bool, workloads: tuple[str, ...], profiles: tuple[str, ...], pagings: tuple[str, ...],
          pages: int | None,
          switches: int | None, calls: int | None, reps: int | None, no_c_reference: bool, no_memory: bool,
          json_file: Path | None, plot_file: Path | None, trace_file: Path | None = None,
          no_events: bool = False, no_shootdown: bool = False) -> None:
    """Measure what each VMI call costs under every paging profile and both privileges (the kernel
    deprivileged at ring 3, and its -ring0 twin), against native and a C reference VMM."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vmikit.bench.report import plot, print_report
    from vmikit.bench.runner import BenchConfig, BenchInterrupted, run_bench

    if plot_file is not None:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("--plot needs matplotlib", "pip install matplotlib") from None
    base = QUICK if quick else FULL
    overrides = {k: v for k, v in (("n", pages), ("m", switches), ("calls", calls), ("reps", reps)) if v is not None}
    sizes = dataclasses.replace(base, **overrides)
    chosen = _split(profiles, PROFILE_NAMES, "profile")
    if quick and not profiles:
        chosen = QUICK_PROFILES
    if pagings:
        styles = _split(pagings, PAGING_STYLES, "paging style")
        chosen = tuple(n for n in chosen if PROFILE_BY_NAME[n].paging in styles)
        if not chosen:
            raise UsageError(f"no selected profile has paging {', '.join(styles)}",
                             "drop --paging or --profile, or choose profiles of that paging style")
    config = BenchConfig(workloads=_split(workloads, WORKLOAD_NAMES, "workload"), profiles=chosen, sizes=sizes,
                         c_reference=not no_c_reference, memory_probe=not no_memory, quick=quick,
                         events=not no_events, shootdown=not no_shootdown)
    console = Console()
    total = len(config.workloads) * len(config.profiles) * sizes.reps
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    from vmikit.observe import trace

    try:
        with trace.recording(trace_file), Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("bench", total=total)
            results = run_bench(
                config,
                progress=lambda profile, workload: progress.update(task, advance=1,
                                                                   description=f"{profile} {workload}"),
                status=lambda text: progress.update(task, description=text))
    except BenchInterrupted as interrupted:
        if json_file is not None:  # what was measured is kept; the CLI then says "interrupted" (130)
            json_file.write_text(json.dumps(interrupted.results, indent=2) + "\n")
            console.print(f"wrote {json_file} (partial)")
        raise
    print_report(results, console)
    if json_file is not None:
        json_file.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_file}")
    if plot_file is not None:
        plot(results, plot_file)
        console.print(f"wrote {plot_file}")
    if results.get("errors"):
        raise SystemExit(1)
