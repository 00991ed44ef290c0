"""The bench results for people: rich tables in the terminal, a chart as PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmikit.bench.workloads import BY_NAME, PROFILE_NAMES, WORKLOAD_NAMES


def fmt_ns(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns / 1e6:.2f} ms"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _ordered(results: dict) -> tuple[list[str], list[str]]:
    cells = results["cells"]
    workloads = [w for w in WORKLOAD_NAMES if w in cells]
    profiles = [p for p in PROFILE_NAMES if any(p in cells[w] for w in workloads)]
    return workloads, profiles


def cell_table(results: dict) -> Table:
    workloads, profiles = _ordered(results)
    cfg = results["config"]
    table = Table(title=f"guest ns per operation (median of {cfg['repetitions']}) · exits per operation · "
                        f"x native — n={cfg['n']} pages, m={cfg['m']} switches, {cfg['calls']} calls",
                  show_lines=True)
    table.add_column("workload", style="bold")
    table.add_column("per", style="dim")
    for p in profiles:
        table.add_column(p, justify="right")
    for w in workloads:
        row = [w, BY_NAME[w].unit]
        for p in profiles:
            cell = results["cells"][w].get(p)
            if cell is None:
                row.append("-")
                continue
            ns = cell["ns_per_op"]["median"]
            exits = cell["exits_per_op"]["median"]
            row.append(f"{fmt_ns(ns)}  {fmt_ratio(cell.get('ratio_to_native'))}\n[dim]{exits:.3g} exits[/dim]")
        table.add_row(*row)
    return table


def calls_table(results: dict) -> Table:
    """Calls and exits per call ID, summed over every workload, per profile."""
    _, profiles = _ordered(results)
    totals: dict[str, dict[str, list[int]]] = {}
    for per_profile in results["cells"].values():
        for p, cell in per_profile.items():
            for call, counts in cell["by_call"].items():
                entry = totals.setdefault(call, {}).setdefault(p, [0, 0])
                entry[0] += counts["calls"]
                entry[1] += counts["exits"]
    table = Table(title="calls / exits per call ID, all timed sections (queued calls complete in a FlushQueue exit)")
    table.add_column("call")
    shown = [p for p in profiles if any(p in v for v in totals.values())]
    for p in shown:
        table.add_column(p, justify="right")
    for call in sorted(totals):
        table.add_row(call, *(f"{totals[call][p][0]} / {totals[call][p][1]}" if p in totals[call] else "-"
                              for p in shown))
    return table


def targets_table(results: dict) -> Table:
    table = Table(title="targets (issue 5), measured in this run")
    for col in ("target", "goal", "measured", "met"):
        table.add_column(col, justify="right" if col in ("measured", "met") else "left")
    for t in results.get("targets", []):
        m = t["measured"]
        if m is None:
            shown = "n/a"
        elif "queued" in t["name"]:
            shown = f"{m:.3f} (1/{1 / m:.0f})" if m else "0"
        elif "MiB" in t["goal"]:
            shown = f"{m:.1f} MiB"
        else:
            shown = f"{m:.2f}x"
        met = "n/a" if t["met"] is None else ("[green]yes[/green]" if t["met"] else "[red]no[/red]")
        table.add_row(t["name"], t["goal"], shown, met)
    return table


def print_report(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(cell_table(results))
    if any(cell["by_call"] for pp in results["cells"].values() for cell in pp.values()):
        console.print(calls_table(results))
    c = results.get("c_reference")
    if c and "error" not in c:
        console.print(f"[bold]C reference[/bold] (same image, ROM and cmdline `{c['cmdline']}`): null hypercall "
                      f"{fmt_ns(c['c']['null_ns_per_call']['median'])} in C vs "
                      f"{fmt_ns(c['python']['null_ns_per_call']['median'])} in the Python VMM = "
                      f"[bold]{c['ratio']:.2f}x[/bold] (+{fmt_ns(c['python_extra_ns_per_exit'])} per exit); "
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


def plot(results: dict, path: Path) -> Path:
    """Two panels: guest ns per operation (log) and exits per operation, per workload and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads, profiles = _ordered(results)
    fig, (ax_ns, ax_ex) = plt.subplots(1, 2, figsize=(13, 0.55 * len(workloads) + 2.2), sharey=True,
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
        ax_ns.barh(ys, ns, height=height, color=COLOURS.get(p), label=p, xerr=[lo, hi],
                   error_kw={"elinewidth": 0.6, "capsize": 0, "ecolor": "#555"})
        ax_ex.barh(ys, ex, height=height, color=COLOURS.get(p), label=p)
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
    ax_ns.legend(loc="lower right", fontsize=8, title="profile", title_fontsize=8)
    cfg = results["config"]
    c = results.get("c_reference") or {}
    extra = f" · null hypercall Python/C = {c['ratio']:.2f}x" if "ratio" in c else ""
    fig.suptitle(f"vmikit bench — n={cfg['n']} pages, m={cfg['m']}, {cfg['calls']} calls, "
                 f"{cfg['repetitions']} reps{extra}\n{results['machine'].get('cpu', '')}, "
                 f"kernel {results['machine']['kernel']}, {results['date']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
