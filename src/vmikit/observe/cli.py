"""`vmikit trace summary|plot FILE.json`: read what `--trace` wrote."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vmikit.errors import UsageError
from vmikit.outputs import OUTPUT


@click.group(short_help="Summarize or plot a --trace file.", context_settings={"help_option_names": ["-h", "--help"]})
def trace_group() -> None:
    """Read a trace-event file written by `run`, `bench` or `fuzz` with --trace (docs/observe.md)."""


@trace_group.command(short_help="Per call: count, VMM and exit time, the longest exits.")
@click.argument("trace_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def summary(trace_file: Path, as_json: bool) -> None:
    """Per call ID (and per other exit kind): how many, the VMM's time in the call (min, median,
    p99, max), the whole exit's time, and the five longest."""
    from vmikit.observe.summary import load_events, print_summary, summarize

    events, other = load_events(trace_file)
    result = summarize(events)
    if as_json:
        click.echo(json.dumps({"file": str(trace_file), "otherData": other, **result}, indent=2))
    else:
        print_summary(result, other)


@trace_group.command(short_help="Draw the timeline as a PNG.")
@click.argument("trace_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", "out", type=OUTPUT, required=True, help="The PNG to write.")
@click.option("--from-ms", type=click.FloatRange(min=0), default=None, help="Start of the window (ms into the trace).")
@click.option("--to-ms", type=click.FloatRange(min=0), default=None, help="End of the window (ms into the trace).")
def plot(trace_file: Path, out: Path, from_ms: float | None, to_ms: float | None) -> None:
    """A timeline of the trace: one row per vCPU and device track, slices coloured by call."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError("trace plot needs matplotlib", "pip install matplotlib") from None
    from vmikit.observe.plot import plot_trace
    from vmikit.observe.summary import load_events

    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise UsageError(f"--to-ms {to_ms:g} is not after --from-ms {from_ms:g}", "give a window that ends after it starts")
    events, _ = load_events(trace_file)
    drawn = plot_trace(events, out, from_ms, to_ms, title=f"{trace_file.name}")
    click.echo(f"wrote {out} ({drawn} slices)")
