"""The bench results for people: rich tables in the terminal, a chart as PNG."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from vmikit.bench.workloads import BY_NAME, PROFILE_BY_NAME, PROFILE_NAMES, RING0_SUFFIX, WORKLOAD_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # imported for real only when plotting (matplotlib is slow to load)


def fmt_ns(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns / 1e6:.2f} ms"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    if r < 0.01:
        return f"{r:.1g}x"
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def plural(count: float, word: str, words: str | None = None) -> str:
    """`1 exit`, `2 exits`, `1 flush`, `0 flushes`: a count with its noun agreeing."""
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {word if count == 1 else (words or word + 's')}"


def _ordered(results: dict) -> tuple[list[str], list[str]]:
    cells = results["cells"]
    workloads = [w for w in WORKLOAD_NAMES if w in cells]
    profiles = [p for p in PROFILE_NAMES if any(p in cells[w] for w in workloads)]
    return workloads, profiles


def _ring(profile: str) -> str:
    return "ring 3" if PROFILE_BY_NAME[profile].privilege == "deprivileged" else "ring 0"


def _groups(profiles: list[str]) -> list[tuple[str, list[str]]]:
    """Profiles grouped with their ring-0 twin, in order: [(first member's name, [deprivileged, -ring0])]."""
    groups: dict[str, list[str]] = {}
    for p in profiles:
        groups.setdefault(p.removesuffix(RING0_SUFFIX), []).append(p)
    return [(members[0], members) for members in groups.values()]


def fmt_spread(s: dict[str, float]) -> str:
    """Half the min-max range as a share of the median: the spread over repetitions."""
    half = (s["max"] - s["min"]) / 2
    return f"±{100 * half / s['median']:.0f}%" if s["median"] else ""


def fmt_count(n: int) -> str:
    """Exact below 100000, else thousands (k): a cell stays within its profile's header width."""
    return str(n) if n < 100_000 else f"{n / 1000:.0f}k"


def _table(title: str, caption: str | None = None) -> Table:
    # No vertical rules and no outer edge, two spaces between columns: that is what lets the
    # widest table (one row per workload and profile) fit 80 columns with one line per cell,
    # so nothing wraps or is cut when the output goes to a pipe, a file or a default terminal.
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 padding=(0, 1, 0, 0), title_justify="left", caption_justify="left", title_style="bold",
                 caption_style="dim")


def _sizes(cfg: dict) -> str:
    return f"n={plural(cfg['n'], 'page')}, m={plural(cfg['m'], 'switch', 'switches')}, {plural(cfg['calls'], 'call')}"


def cell_table(results: dict) -> Table:
    """One row per workload and profile (a ROM profile's -ring0 twin right below it): every figure
    in its own column, one line per cell, so the table reads the same at any width."""
    workloads, profiles = _ordered(results)
    cfg = results["config"]
    table = _table(f"Guest time and VM exits per operation ({_sizes(cfg)}; median of "
                   f"{plural(cfg['repetitions'], 'repetition')})",
                   "time/op: guest-measured; ±: half the min-max range over the median; x native: time over "
                   "native's; exits/op: VM exits per operation. Profiles with a ROM run the kernel deprivileged at "
                   "ring 3; their -ring0 twin keeps it at ring 0, as native and trap do.")
    table.add_column("workload", style="bold", no_wrap=True)
    table.add_column("per", style="dim", no_wrap=True)
    table.add_column("profile", no_wrap=True)
    for header in ("time/op", "±", "x native", "exits/op"):
        table.add_column(header, justify="right", no_wrap=True)
    for w in workloads:
        rows = [(p, results["cells"][w][p]) for p in profiles if p in results["cells"][w]]
        for i, (p, cell) in enumerate(rows):
            s = cell["ns_per_op"]
            table.add_row(w if i == 0 else "", BY_NAME[w].unit if i == 0 else "",
                          f"[dim]{p}[/dim]" if p.endswith(RING0_SUFFIX) else p,
                          fmt_ns(s["median"]), f"[dim]{fmt_spread(s)}[/dim]",
                          fmt_ratio(cell.get("ratio_to_native")), f"{cell['exits_per_op']['median']:.3g}",
                          end_section=i == len(rows) - 1)
    return table


def _twin_row(label: str, groups: list[tuple[str, list[str]]], shown: Callable[[str], str]) -> list[str]:
    """A sub-row: the second member (the -ring0 twin) of each group, blank where there is none."""
    return [f"[dim]  {label}[/dim]", *(shown(m[1]) if len(m) > 1 else "" for _, m in groups)]


def calls_table(results: dict) -> Table:
    """Calls and exits per call ID, summed over every workload, per profile; a ROM profile's -ring0
    twin in the same column (a row of its own only for the calls where it differs)."""
    _, profiles = _ordered(results)
    totals: dict[str, dict[str, tuple[int, int]]] = {}
    for per_profile in results["cells"].values():
        for p, cell in per_profile.items():
            for call, counts in cell["by_call"].items():
                calls, exits = totals.setdefault(call, {}).get(p, (0, 0))
                totals[call][p] = (calls + counts["calls"], exits + counts["exits"])
    table = _table("Calls / exits per call ID, all timed sections",
                   "Queued calls complete in a FlushQueue exit. Each column is the profile named; its -ring0 twin, "
                   "where run, made the same calls and exits unless a ring 0 row says otherwise.")
    table.add_column("call", no_wrap=True)
    groups = [(h, m) for h, m in _groups(profiles) if any(p in v for v in totals.values() for p in m)]
    for header, _ in groups:
        table.add_column(header, justify="right", no_wrap=True)

    for call in sorted(totals):
        def shown(p: str, call: str = call) -> str:
            return "-" if p not in totals[call] else " / ".join(fmt_count(n) for n in totals[call][p])
        table.add_row(call, *(shown(m[0]) for _, m in groups))
        if any(len(m) > 1 and shown(m[1]) != shown(m[0]) for _, m in groups):
            table.add_row(*_twin_row("ring 0", groups, shown))
    return table


def flush_table(results: dict) -> Table | None:
    """The flush mechanism's own figure: per deprivileged profile and workload, flushes, flushes per
    operation, mean µs per flush, the median share of the timed section it took and how."""
    workloads, profiles = _ordered(results)
    shown = [p for p in profiles if PROFILE_BY_NAME[p].privilege == "deprivileged"]
    if not shown:
        return None
    table = _table("The flush mechanism, deprivileged profiles",
                   "After the VMM changed a present entry, KVM drops its cached translations. flushes: in the timed "
                   "sections (whole session: untimed work too); per op: flushes per operation; µs each: mean; of "
                   "time: median share of the workload's time; how: frames (the stale frames only) or all (the "
                   "whole shadow MMU). Workloads without a flush are left out.")
    for header in ("workload", "profile"):
        table.add_column(header, style="bold" if header == "workload" else None, no_wrap=True)
    for header in ("flushes", "per op", "µs each", "of time"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("how", no_wrap=True)

    def how(by_kind: dict[str, int] | None) -> str:
        return ", ".join(sorted(k for k, v in (by_kind or {}).items() if v))

    blocks: list[tuple[str, list[list[str]]]] = []
    for w in workloads:
        rows = []
        for p in shown:
            f = (results["cells"][w].get(p) or {}).get("flush")
            if f is None:
                continue
            if not f["flushes"]:
                rows.append([p, "0", "0", "", "", ""])
                continue
            share = f["share_of_time"]["median"] if f["share_of_time"] else 0.0
            rows.append([p, str(f["flushes"]), f"{f['flushes_per_op']:.3g}", f"{f['us_per_flush']:.0f}",
                         f"{100 * share:.1f}%", how(f.get("by_kind"))])
        if any(r[1] != "0" for r in rows):  # nothing in this workload changes a present entry
            blocks.append((w, rows))
    session_rows = []
    for p in shown:
        f = (results.get("sessions", {}).get(p) or {}).get("flush") or {}
        mean = f.get("session_us_mean")
        session_rows.append([p, str(f.get("session_flushes", 0)), "", f"{mean:.0f}" if mean else "", "",
                             how(f.get("session_by_kind"))])
    blocks.append(("whole session", session_rows))
    for label, rows in blocks:
        for i, row in enumerate(rows):
            table.add_row(label if i == 0 else "", *row, end_section=i == len(rows) - 1)
    return table


def vmm_table(results: dict) -> Table | None:
    """The VMM's own host time per operation (its hypercall handlers and, deprivileged, the
    reflection of exceptions; the flush included) and its share of the guest-measured time:
    what is left is the exits themselves and the guest's code."""
    workloads, profiles = _ordered(results)
    groups = [(h, m) for h, m in _groups(profiles) if PROFILE_BY_NAME[m[0]].rom != "none"]
    if not groups:
        return None
    table = _table("The VMM's own time per operation and its share of the guest's time",
                   "Host clock, the VMM's handlers, the flush included; the rest of the guest's time is the exits "
                   "themselves and the guest's code. per entry: the VMM's time per queued entry in FlushQueue "
                   "batches. Each column is the profile named; ring 0 rows: its -ring0 twin.")
    table.add_column("workload", style="bold", no_wrap=True)
    for header, _ in groups:
        table.add_column(header, justify="right", no_wrap=True)

    for w in workloads:
        cells = results["cells"][w]
        if not any((cells.get(p) or {}).get("vmm_us_per_op") for _, m in groups for p in m):
            continue  # no exit at all (rdtsc, cpuid natively): nothing of the VMM's

        def per_op(p: str) -> str:
            cell = cells.get(p)
            if cell is None or "vmm_us_per_op" not in cell:
                return "-"
            return f"{fmt_ns(cell['vmm_us_per_op'] * 1e3)} {100 * cell['vmm_share_of_time']:.0f}%"

        def per_entry(p: str) -> str:
            value = ((cells.get(p) or {}).get("queue") or {}).get("vmm_us_per_entry")
            return "" if value is None else fmt_ns(value * 1e3)

        rows = [[w, *(per_op(m[0]) for _, m in groups)]]
        if any(per_entry(m[0]) for _, m in groups):
            rows.append(["[dim]  per entry[/dim]", *(per_entry(m[0]) for _, m in groups)])
        if any(len(m) > 1 for _, m in groups):
            rows.append(_twin_row("ring 0", groups, per_op))
            if any(len(m) > 1 and per_entry(m[1]) for _, m in groups):
                rows.append(_twin_row("ring 0 per entry", groups, per_entry))
        for i, row in enumerate(rows):
            table.add_row(*row, end_section=i == len(rows) - 1)
    return table


def events_table(results: dict) -> Table | str | None:
    """Alarm latency and event round trip, the VMI path (deprivileged) beside native interrupts."""
    ev = results.get("events")
    if not ev:
        return None
    if "error" in ev:
        return f"[red]events failed:[/red] {ev['error']}"
    from vmikit.bench.eventbench import FIGURE_DOC, FIGURES

    table = _table(f"Events: VMI 1.4 beside native interrupts ({ev['rounds']} interleaved "
                   f"{'round' if ev['rounds'] == 1 else 'rounds'} of {plural(ev['samples_per_round'], 'sample')})",
                   "Guest-measured (TSC), median over every sample of every round, min-max beside it. vmi: Time alarm, "
                   "CPU.Halt and EventChannel upcalls, kernel deprivileged at ring 3; native: no ROM, LAPIC timer, "
                   "sti; hlt and a self-IPI, kernel at ring 0 (emulated on this machine kind).")
    table.add_column("figure", style="bold", no_wrap=True)
    table.add_column("path", no_wrap=True)
    for header in ("median", "min", "max", "x native"):
        table.add_column(header, justify="right", no_wrap=True)
    for figure in FIGURES:
        per_path = ev["cells"].get(figure, {})
        rows = [(p, per_path[p]) for p in ("vmi", "native") if p in per_path]
        for i, (p, cell) in enumerate(rows):
            ns = cell["ns"]
            ratio = ev["vmi_over_native"].get(figure) if p == "vmi" else None
            table.add_row(FIGURE_DOC[figure] if i == 0 else "", p, fmt_ns(ns["median"]), fmt_ns(ns["min"]),
                          fmt_ns(ns["max"]), fmt_ratio(ratio) if p == "vmi" else "",
                          end_section=i == len(rows) - 1)
    return table


def shootdown_table(results: dict) -> Table | str | None:
    """TLB shootdown of CPUs 0..n-1: one VMI call for the set, one VMI flush per CPU, native IPIs."""
    sd = results.get("shootdown")
    if not sd:
        return None
    if "error" in sd:
        return f"[red]shootdown failed:[/red] {sd['error']}"
    crowded = sd["host_cpus"] is not None and sd["host_cpus"] < sd["vcpus"]
    table = _table(f"TLB shootdown, {sd['vcpus']}-vCPU machine ({sd['rounds']} interleaved rounds of "
                   f"{plural(sd['samples_per_round'], 'sample')})",
                   "Guest-measured (TSC), median (min-max) of every sample. vmi: one MMU.FlushTLBMulti for the set; "
                   "percpu: each CPU its own MMU.FlushTLB on request (one exit each); both with the kernel "
                   "deprivileged at ring 3. ipi: bare machine, an IPI per target and its acknowledgement, kernel at "
                   "ring 0 (emulated on this machine kind)."
                   + (f" This host has {sd['host_cpus']} CPUs for {sd['vcpus']} vCPUs: the spinning targets of "
                      "percpu share cores with CPU 0." if crowded else ""))
    table.add_column("CPUs", justify="right", no_wrap=True)
    table.add_column("path", no_wrap=True)
    for header in ("median", "min", "max", "x vmi"):
        table.add_column(header, justify="right", no_wrap=True)
    for n in (1, 2, 4):
        cells = [(f, sd["cells"][f"{f}.{n}"]) for f in ("vmi", "percpu", "ipi") if f"{f}.{n}" in sd["cells"]]
        vmi = sd["cells"].get(f"vmi.{n}")
        for i, (figure, cell) in enumerate(cells):
            ns = cell["ns"]
            ratio = ns["median"] / vmi["ns"]["median"] if vmi and figure != "vmi" else None
            table.add_row(str(n) if i == 0 else "", figure, fmt_ns(ns["median"]), fmt_ns(ns["min"]), fmt_ns(ns["max"]),
                          fmt_ratio(ratio) if ratio is not None else "", end_section=i == len(cells) - 1)
    return table


def fmt_measured(t: dict) -> str:
    m = t["measured"]
    kind = t.get("kind", "ratio")
    if m is None:
        return "n/a"
    if kind == "fraction":
        return f"{m:.3f} (1/{1 / m:.0f})" if m else "0"
    if kind == "MiB":
        return f"{m:.1f} MiB"
    if kind == "ns":
        return fmt_ns(m)
    return f"{m:.2f}x" if m < 100 else f"{m:.0f}x"


def targets_table(results: dict) -> Table | None:
    """The goals this run measured (a filtered run leaves the others out, and says how many)."""
    measured = [t for t in results.get("targets", []) if t["measured"] is not None]
    if not measured:
        return None
    left_out = len(results.get("targets", [])) - len(measured)
    table = _table("Goals, measured in this run",
                   f"{plural(left_out, 'more goal')} need{'s' if left_out == 1 else ''} workloads, profiles or "
                   "probes this run left out." if left_out else None)
    for col in ("goal", "wanted", "measured", "met"):
        table.add_column(col, justify="right" if col in ("measured", "met") else "left", no_wrap=True)
    for t in measured:
        met = "n/a" if t["met"] is None else ("[green]yes[/green]" if t["met"] else "[red]no[/red]")
        table.add_row(t["name"], t["goal"], fmt_measured(t), met)
    return table


def _fmt_stat(s: dict[str, float]) -> str:
    """A median with its min-max: `133.0 µs (121.0 µs-142.2 µs)`."""
    return f"{fmt_ns(s['median'])} ({fmt_ns(s['min'])}-{fmt_ns(s['max'])})"


def _maybe_ns(value: float | None) -> str:
    return fmt_ns(value) if value is not None else "n/a"


PROSE_WIDTH = 80


def report(results: dict) -> list[Table | str]:
    """The report's parts in order: tables, and lines of rich markup."""
    parts: list[Table | str | None] = [cell_table(results)]
    if any(cell["by_call"] for pp in results["cells"].values() for cell in pp.values()):
        parts.append(calls_table(results))
    parts += [vmm_table(results), flush_table(results)]
    c = results.get("c_reference")
    if c and "error" not in c:
        spread = c.get("ratio_spread")
        rounds = c.get("rounds", 1)
        ratio = f"[bold]{c['ratio']:.2f}x[/bold]" + (
            f" (median of {plural(rounds, 'round')}, {spread['min']:.2f}-{spread['max']:.2f})" if spread else "")
        parts.append(f"[bold]C reference[/bold] (same image, ring-0 ROM and kernel, cmdline `{c['cmdline']}`, C and "
                     f"Python interleaved): null hypercall {_fmt_stat(c['c']['null_ns_per_call'])} in C vs "
                     f"{_fmt_stat(c['python']['null_ns_per_call'])} in the Python VMM = "
                     f"{ratio} (+{fmt_ns(c['python_extra_ns_per_exit'])} per exit); "
                     f"the VMM's own time per exit (KVM_RUN return to the next call): "
                     f"{_maybe_ns(c['c'].get('vmm_ns_per_exit'))} in C, "
                     f"{_maybe_ns(c['python'].get('vmm_ns_per_exit'))} in Python; "
                     f"an empty guest loop iteration costs {fmt_ns(c['guest_loop_iteration_ns'])} on this host")
    elif c:
        parts.append(f"[red]C reference failed:[/red] {c['error']}")
    parts.append(events_table(results))
    parts.append(shootdown_table(results))
    mem = results.get("memory")
    if mem and "error" not in mem:
        parts.append(f"[bold]VMM memory[/bold] ({mem['profile']}, {mem['guest_ram_mib']} MiB guest): peak RSS "
                     f"{mem['peak_rss_kib'] / 1024:.1f} MiB, guest RAM resident "
                     f"{mem['guest_ram_resident_kib'] / 1024:.1f} MiB → [bold]{mem['beyond_guest_mib']:.1f} MiB "
                     f"beyond guest RAM[/bold] (interpreter + modules {mem['baseline_rss_kib'] / 1024:.1f} MiB, "
                     f"shadow tables {mem['shadow_tables_resident_kib'] / 1024:.1f} MiB)")
    elif mem:
        parts.append(f"[red]memory probe failed:[/red] {mem['error']}")
    parts.append(targets_table(results))
    parts += [f"[red]{profile} failed:[/red] {error}" for profile, error in results.get("errors", {}).items()]
    khz = results.get("tsc_khz")
    parts.append(f"[dim]TSC {khz} kHz (KVM_GET_TSC_KHZ) · {results['machine'].get('cpu', '?')} · kernel "
                 f"{results['machine']['kernel']} · {results['date']} · whole bench "
                 f"{results.get('bench_wall_seconds', '?')} s[/dim]")
    return [part for part in parts if part is not None]


def print_report(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    for i, part in enumerate(report(results)):
        if i:
            console.print()  # a blank line between parts: each table's title starts its own block
        # Prose wraps at the tables' width (80 columns at most): a 200-column paragraph is hard to read.
        console.print(part, width=min(console.width, PROSE_WIDTH) if isinstance(part, str) else None)


COLOURS = {"native": "#4d4d4d", "trap": "#d62728", "direct-ignore": "#9ecae1", "direct-honour": "#1f77b4",
           "shadow-ignore": "#c7e9c0", "shadow-honour": "#2ca02c"}


def _colour(profile: str) -> str | None:
    return COLOURS.get(profile.removesuffix("-ring0"))


def _decimal(value: float, _pos: object = None) -> str:
    """A tick label as a plain decimal (0.01, 0.5, 20, 1000): read like the table's figures."""
    return f"{value:.10f}".rstrip("0").rstrip(".") if value < 1 else f"{value:.0f}"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(results)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure(results: dict) -> Figure:
    """Two panels: guest µs per operation (log) and exits per operation, per workload and profile;
    the legend below both, outside the axes."""
    import math

    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    workloads, profiles = _ordered(results)
    fig, (ax_ns, ax_ex) = plt.subplots(1, 2, figsize=(13, 0.075 * len(workloads) * len(profiles) + 3.2), sharey=True,
                                       gridspec_kw={"width_ratios": [3, 2]}, layout="constrained")
    height = 0.8 / max(1, len(profiles))
    for i, p in enumerate(profiles):
        ys, us, lo, hi, ex = [], [], [], [], []
        for j, w in enumerate(workloads):
            cell = results["cells"][w].get(p)
            if cell is None:
                continue
            y = j - 0.4 + height * (i + 0.5)
            s = {k: v / 1e3 for k, v in cell["ns_per_op"].items()}  # µs, the table's unit
            ys.append(y)
            us.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            ex.append(cell["exits_per_op"]["median"])
        # The ring-0 twin: its deprivileged profile's colour, hatched.
        style = {"hatch": "////", "edgecolor": "white", "linewidth": 0} if PROFILE_BY_NAME[p].privilege == "ring0" \
            and PROFILE_BY_NAME[p].rom != "none" else {}
        label = f"{p} ({_ring(p)})"
        ax_ns.barh(ys, us, height=height, color=_colour(p), label=label, xerr=[lo, hi],
                   error_kw={"elinewidth": 0.6, "capsize": 0, "ecolor": "#555"}, **style)
        ax_ex.barh(ys, ex, height=height, color=_colour(p), label=label, **style)
    ax_ns.set_xscale("log")
    # Every decade labelled, and 2 and 5 within it in a smaller font: enough labels to read a bar.
    ax_ns.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
    ax_ns.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax_ns.xaxis.set_major_formatter(FuncFormatter(_decimal))
    ax_ns.xaxis.set_minor_formatter(FuncFormatter(_decimal))
    ax_ns.tick_params(axis="x", which="minor", labelsize=7, labelcolor="#555")
    ax_ns.set_yticks(range(len(workloads)))
    ax_ns.set_yticklabels([f"{w} (per {BY_NAME[w].unit})" for w in workloads])
    ax_ns.invert_yaxis()
    ax_ns.set_xlabel("guest-measured time per operation, µs (log scale; bars: median, whiskers: min-max)")
    ax_ns.grid(axis="x", which="both", alpha=0.25)
    # Exits: linear below 0.001 (so 0 has a place), log above it, up to the largest figure.
    ax_ex.set_xscale("symlog", linthresh=0.001, linscale=0.5)
    most = max((c["exits_per_op"]["median"] for pp in results["cells"].values() for c in pp.values()), default=1)
    right = max(1.2, most * 1.15)
    ax_ex.set_xlim(0, right)
    ticks = [0, 0.001, 0.01, 0.1, *range(1, math.floor(right) + 1)]
    ax_ex.xaxis.set_major_locator(FixedLocator(ticks))
    ax_ex.xaxis.set_major_formatter(FuncFormatter(_decimal))
    minor = [m * 10.0 ** e for e in range(-3, 1) for m in range(2, 10) if m * 10.0 ** e < min(1.0, right)]
    ax_ex.xaxis.set_minor_locator(FixedLocator(minor))
    ax_ex.xaxis.set_minor_formatter(NullFormatter())
    ax_ex.set_xlabel("VM exits per operation (linear below 0.001, log above)")
    ax_ex.grid(axis="x", which="both", alpha=0.25)
    for j in range(1, len(workloads)):
        for ax in (ax_ns, ax_ex):
            ax.axhline(j - 0.5, color="#ddd", linewidth=0.6)
    handles, labels = ax_ns.get_legend_handles_labels()
    # Outside the axes, below them: constrained layout keeps room for it, so it covers no bar.
    fig.legend(handles, labels, loc="outside lower center", ncol=min(5, max(1, len(labels))), fontsize=8,
               frameon=False, title="profile (a ROM's profile deprivileged; hatched: its ring-0 twin)",
               title_fontsize=8)
    cfg = results["config"]
    c = results.get("c_reference") or {}
    extra = f" · null hypercall Python/C = {c['ratio']:.2f}x" if "ratio" in c else ""
    fig.suptitle(f"vmikit bench — {_sizes(cfg)}, {plural(cfg['repetitions'], 'repetition')}{extra}\n"
                 f"{results['machine'].get('cpu', '')}, kernel {results['machine']['kernel']}, {results['date']}",
                 fontsize=10)
    return fig
