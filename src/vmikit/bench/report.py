"""The bench results for people: rich tables in the terminal, a chart as PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmikit.bench.workloads import BY_NAME, PROFILE_BY_NAME, PROFILE_NAMES, RING0_SUFFIX, WORKLOAD_NAMES


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


def _ordered(results: dict) -> tuple[list[str], list[str]]:
    cells = results["cells"]
    workloads = [w for w in WORKLOAD_NAMES if w in cells]
    profiles = [p for p in PROFILE_NAMES if any(p in cells[w] for w in workloads)]
    return workloads, profiles


def _ring(profile: str) -> str:
    return "ring 3" if PROFILE_BY_NAME[profile].privilege == "deprivileged" else "ring 0"


def _groups(profiles: list[str]) -> list[tuple[str, list[str]]]:
    """Profiles grouped with their ring-0 twin, in order: [(base name, [deprivileged, -ring0])]."""
    groups: dict[str, list[str]] = {}
    for p in profiles:
        groups.setdefault(p.removesuffix(RING0_SUFFIX), []).append(p)
    return list(groups.items())


def fmt_spread(s: dict[str, float]) -> str:
    """Half the min-max range as a share of the median: the spread over repetitions."""
    half = (s["max"] - s["min"]) / 2
    return f"±{100 * half / s['median']:.0f}%" if s["median"] else ""


def cell_table(results: dict) -> Table:
    """One column per profile; a profile with a ROM shows its deprivileged run (r3) above its
    ring-0 twin (r0), so the two privileges sit side by side in one cell."""
    workloads, profiles = _ordered(results)
    cfg = results["config"]
    table = Table(title=f"guest time per operation: median of {cfg['repetitions']} (±half the min-max range), x native; "
                        f"exits per operation — n={cfg['n']} pages, m={cfg['m']} switches, {cfg['calls']} calls. "
                        "r3: the kernel deprivileged at ring 3 (profile name as is), r0: at ring 0 (its -ring0 twin)",
                  show_lines=True)
    table.add_column("workload", style="bold")
    table.add_column("per", style="dim")
    groups = _groups(profiles)
    for base, _ in groups:
        table.add_column(base, justify="right")
    for w in workloads:
        row = [w, BY_NAME[w].unit]
        for _, members in groups:
            lines, exits = [], []
            for p in members:
                cell = results["cells"][w].get(p)
                tag = "r3" if PROFILE_BY_NAME[p].privilege == "deprivileged" else "r0"
                if cell is None:
                    lines.append(f"{tag} -")
                    continue
                s = cell["ns_per_op"]
                lines.append(f"{tag} {fmt_ns(s['median'])} [dim]{fmt_spread(s)}[/dim] "
                             f"{fmt_ratio(cell.get('ratio_to_native'))}")
                exits.append(f"{cell['exits_per_op']['median']:.3g}")
            lines.append(f"[dim]{' | '.join(exits)} exits[/dim]")
            row.append("\n".join(lines))
        table.add_row(*row)
    return table


def calls_table(results: dict) -> Table:
    """Calls and exits per call ID, summed over every workload, per profile (a ROM profile and its
    ring-0 twin in one column: one line when they agree)."""
    _, profiles = _ordered(results)
    totals: dict[str, dict[str, list[int]]] = {}
    for per_profile in results["cells"].values():
        for p, cell in per_profile.items():
            for call, counts in cell["by_call"].items():
                entry = totals.setdefault(call, {}).setdefault(p, [0, 0])
                entry[0] += counts["calls"]
                entry[1] += counts["exits"]
    table = Table(title="calls / exits per call ID, all timed sections (queued calls complete in a FlushQueue exit); "
                        "r3 | r0 when the privileges differ")
    table.add_column("call")
    groups = [(b, m) for b, m in _groups(profiles) if any(p in v for v in totals.values() for p in m)]
    for base, _ in groups:
        table.add_column(base, justify="right")
    for call in sorted(totals):
        row = [call]
        for _, members in groups:
            shown = [f"{totals[call][p][0]} / {totals[call][p][1]}" if p in totals[call] else "-" for p in members]
            row.append(shown[0] if len(set(shown)) == 1 else " | ".join(shown))
        table.add_row(*row)
    return table


def flush_table(results: dict) -> Table | None:
    """The flush mechanism's own figure: per deprivileged profile and workload, flushes per
    operation, mean µs per flush and the median share of the timed section it took."""
    workloads, profiles = _ordered(results)
    shown = [p for p in profiles if PROFILE_BY_NAME[p].privilege == "deprivileged"]
    if not shown:
        return None
    table = Table(title="the flush mechanism (KVM drops its cached translations after the VMM changed a present "
                        "entry): flushes per operation · µs per flush · share of the workload's time (median) · "
                        "how (frames: the stale frames only; all: the whole shadow MMU)",
                  show_lines=True)
    table.add_column("workload", style="bold")
    for p in shown:
        table.add_column(p, justify="right")
    for w in workloads:
        if not any(((results["cells"][w].get(p) or {}).get("flush") or {}).get("flushes") for p in shown):
            continue  # nothing in this workload changes a present entry
        row = [w]
        for p in shown:
            f = (results["cells"][w].get(p) or {}).get("flush")
            if not f or not f["flushes"]:
                row.append("[dim]-[/dim]")
                continue
            share = f["share_of_time"]["median"] if f["share_of_time"] else 0.0
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(f.get("by_kind", {}).items()))
            row.append(f"{f['flushes_per_op']:.3g}/op · {f['us_per_flush']:.0f} µs\n{100 * share:.1f}% of time"
                       + (f"\n[dim]{kinds}[/dim]" if kinds else ""))
        table.add_row(*row)
    row = ["[bold]whole session[/bold]\n[dim](untimed too)[/dim]"]
    for p in shown:
        f = (results.get("sessions", {}).get(p) or {}).get("flush") or {}
        mean = f.get("session_us_mean")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((f.get("session_by_kind") or {}).items()))
        row.append(f"{f.get('session_flushes', 0)} flushes" + (f"\n{mean:.0f} µs mean" if mean else "")
                   + (f"\n[dim]{kinds}[/dim]" if kinds else ""))
    table.add_row(*row)
    return table


def vmm_table(results: dict) -> Table | None:
    """The VMM's own host time per operation (its hypercall handlers and, deprivileged, the
    reflection of exceptions; the flush included) and its share of the guest-measured time:
    what is left is the exits themselves and the guest's code."""
    workloads, profiles = _ordered(results)
    groups = [(b, m) for b, m in _groups(profiles) if PROFILE_BY_NAME[m[0]].rom != "none"]
    if not groups:
        return None
    table = Table(title="the VMM's own time per operation (host clock, its handlers; the flush included) and its "
                        "share of the guest's time — r3 | r0; per queued entry for FlushQueue batches",
                  show_lines=True)
    table.add_column("workload", style="bold")
    for base, _ in groups:
        table.add_column(base, justify="right")
    for w in workloads:
        if not any((results["cells"][w].get(p) or {}).get("vmm_us_per_op") for _, m in groups for p in m):
            continue  # no exit at all (rdtsc, cpuid natively): nothing of the VMM's
        row = [w]
        for _, members in groups:
            lines = []
            for p in members:
                cell = results["cells"][w].get(p)
                if cell is None or "vmm_us_per_op" not in cell:
                    continue
                tag = "r3" if PROFILE_BY_NAME[p].privilege == "deprivileged" else "r0"
                text = f"{tag} {fmt_ns(cell['vmm_us_per_op'] * 1e3)} {100 * cell['vmm_share_of_time']:.0f}%"
                per_entry = (cell.get("queue") or {}).get("vmm_us_per_entry")
                if per_entry is not None:
                    text += f" [dim]({fmt_ns(per_entry * 1e3)}/entry)[/dim]"
                lines.append(text)
            row.append("\n".join(lines) or "-")
        table.add_row(*row)
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


def targets_table(results: dict) -> Table:
    table = Table(title="targets, measured in this run")
    for col in ("target", "goal", "measured", "met"):
        table.add_column(col, justify="right" if col in ("measured", "met") else "left")
    for t in results.get("targets", []):
        shown = fmt_measured(t)
        met = "n/a" if t["met"] is None else ("[green]yes[/green]" if t["met"] else "[red]no[/red]")
        table.add_row(t["name"], t["goal"], shown, met)
    return table


def _maybe_ns(value: float | None) -> str:
    return fmt_ns(value) if value is not None else "n/a"


def print_report(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(cell_table(results))
    if any(cell["by_call"] for pp in results["cells"].values() for cell in pp.values()):
        console.print(calls_table(results))
    for extra in (vmm_table(results), flush_table(results)):
        if extra is not None:
            console.print(extra)
    c = results.get("c_reference")
    if c and "error" not in c:
        console.print(f"[bold]C reference[/bold] (same image, ring-0 ROM and kernel, cmdline `{c['cmdline']}`): null hypercall "
                      f"{fmt_ns(c['c']['null_ns_per_call']['median'])} in C vs "
                      f"{fmt_ns(c['python']['null_ns_per_call']['median'])} in the Python VMM = "
                      f"[bold]{c['ratio']:.2f}x[/bold] (+{fmt_ns(c['python_extra_ns_per_exit'])} per exit); "
                      f"the VMM's own time per exit (KVM_RUN return to the next call): "
                      f"{_maybe_ns(c['c'].get('vmm_ns_per_exit'))} in C, "
                      f"{_maybe_ns(c['python'].get('vmm_ns_per_exit'))} in Python; "
                      f"an empty guest loop iteration costs {fmt_ns(c['guest_loop_iteration_ns'])} on this host")
    elif c:
        console.print(f"[red]C reference failed:[/red] {c['error']}")
    mem = results.get("memory")
    if mem and "error" not in mem:
        console.print(f"[bold]VMM memory[/bold] ({mem['profile']}, {mem['guest_ram_mib']} MiB guest): peak RSS "
                      f"{mem['peak_rss_kib'] / 1024:.1f} MiB, guest RAM resident "
                      f"{mem['guest_ram_resident_kib'] / 1024:.1f} MiB → [bold]{mem['beyond_guest_mib']:.1f} MiB "
                      f"beyond guest RAM[/bold] (interpreter + modules {mem['baseline_rss_kib'] / 1024:.1f} MiB, "
                      f"shadow tables {mem['shadow_tables_resident_kib'] / 1024:.1f} MiB)")
    elif mem:
        console.print(f"[red]memory probe failed:[/red] {mem['error']}")
    if results.get("targets"):
        console.print(targets_table(results))
    for profile, error in results.get("errors", {}).items():
        console.print(f"[red]{profile} failed:[/red] {error}")
    khz = results.get("tsc_khz")
    console.print(f"[dim]TSC {khz} kHz (KVM_GET_TSC_KHZ) · {results['machine'].get('cpu', '?')} · kernel "
                  f"{results['machine']['kernel']} · {results['date']} · whole bench "
                  f"{results.get('bench_wall_seconds', '?')} s[/dim]")


COLOURS = {"native": "#4d4d4d", "trap": "#d62728", "direct-ignore": "#9ecae1", "direct-honour": "#1f77b4",
           "shadow-ignore": "#c7e9c0", "shadow-honour": "#2ca02c"}


def _colour(profile: str) -> str | None:
    return COLOURS.get(profile.removesuffix("-ring0"))


def plot(results: dict, path: Path) -> Path:
    """Two panels: guest ns per operation (log) and exits per operation, per workload and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads, profiles = _ordered(results)
    fig, (ax_ns, ax_ex) = plt.subplots(1, 2, figsize=(13, 0.075 * len(workloads) * len(profiles) + 2.6), sharey=True,
                                       gridspec_kw={"width_ratios": [3, 2]})
    height = 0.8 / max(1, len(profiles))
    for i, p in enumerate(profiles):
        ys, ns, lo, hi, ex = [], [], [], [], []
        for j, w in enumerate(workloads):
            cell = results["cells"][w].get(p)
            if cell is None:
                continue
            y = j - 0.4 + height * (i + 0.5)
            s = cell["ns_per_op"]
            ys.append(y)
            ns.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
            ex.append(cell["exits_per_op"]["median"])
        # The ring-0 twin: its deprivileged profile's colour, hatched.
        style = {"hatch": "////", "edgecolor": "white", "linewidth": 0} if PROFILE_BY_NAME[p].privilege == "ring0" \
            and PROFILE_BY_NAME[p].rom != "none" else {}
        label = f"{p} ({_ring(p)})"
        ax_ns.barh(ys, ns, height=height, color=_colour(p), label=label, xerr=[lo, hi],
                   error_kw={"elinewidth": 0.6, "capsize": 0, "ecolor": "#555"}, **style)
        ax_ex.barh(ys, ex, height=height, color=_colour(p), label=label, **style)
    ax_ns.set_xscale("log")
    ax_ns.set_yticks(range(len(workloads)))
    ax_ns.set_yticklabels([f"{w} (per {BY_NAME[w].unit})" for w in workloads])
    ax_ns.invert_yaxis()
    ax_ns.set_xlabel("guest-measured time per operation, ns (log; bars: median, whiskers: min-max)")
    ax_ns.grid(axis="x", which="both", alpha=0.25)
    ax_ex.set_xscale("symlog", linthresh=0.01)
    most = max((c["exits_per_op"]["median"] for pp in results["cells"].values() for c in pp.values()), default=1)
    ax_ex.set_xlim(0, max(1.0, most) * 2)
    ax_ex.set_xlabel("VM exits per operation (symlog)")
    ax_ex.grid(axis="x", which="both", alpha=0.25)
    for j in range(1, len(workloads)):
        for ax in (ax_ns, ax_ex):
            ax.axhline(j - 0.5, color="#ddd", linewidth=0.6)
    handles, labels = ax_ns.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False,
               title="profile (a ROM's profile deprivileged; hatched: its ring-0 twin)", title_fontsize=8)
    cfg = results["config"]
    c = results.get("c_reference") or {}
    extra = f" · null hypercall Python/C = {c['ratio']:.2f}x" if "ratio" in c else ""
    fig.suptitle(f"vmikit bench — n={cfg['n']} pages, m={cfg['m']}, {cfg['calls']} calls, "
                 f"{cfg['repetitions']} reps{extra}\n{results['machine'].get('cpu', '')}, "
                 f"kernel {results['machine']['kernel']}, {results['date']}", fontsize=10)
    rows = -(-len(labels) // min(5, max(1, len(labels))))
    fig.tight_layout(rect=(0, 0.02 + 0.025 * (rows + 1), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
