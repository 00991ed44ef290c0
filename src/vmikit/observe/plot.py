"""`vmikit trace plot FILE.json -o FILE.png`: the trace as a timeline picture (matplotlib).

One row per track (each session's vCPU, then its devices), slices as bars coloured by name (the
guest's time grey, each exit kind or call its own colour), the bench's markers as ticks, and the
exits/s counter underneath.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_LEGEND = 12  # names in the legend: the ones with the most time


def plot_trace(events: list[dict[str, Any]], out: Path, start_ms: float | None = None,
               end_ms: float | None = None, title: str = "") -> int:
    """Draw the timeline; returns how many slices it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = start_ms * 1000 if start_ms is not None else float("-inf")
    hi = end_ms * 1000 if end_ms is not None else float("inf")
    process: dict[int, str] = {}
    thread: dict[tuple[int, int], str] = {}
    for e in events:
        if e.get("ph") == "M" and isinstance(e.get("args"), dict):
            if e["name"] == "process_name":
                process[e["pid"]] = str(e["args"].get("name", e["pid"]))
            elif e["name"] == "thread_name":
                thread[(e["pid"], e["tid"])] = str(e["args"].get("name", e["tid"]))
    bars: dict[str, dict[tuple[int, int], list[tuple[float, float]]]] = {}
    marks: dict[tuple[int, int], list[float]] = {}
    counter: list[tuple[float, float]] = []
    time_by_name: dict[str, float] = {}
    tracks: set[tuple[int, int]] = set()
    for e in events:
        ph, ts = e.get("ph"), float(e.get("ts", 0))
        if ph == "X" and e.get("cat") != "vmm":
            dur = float(e.get("dur", 0))
            if ts + dur < lo or ts > hi:
                continue
            name = "guest" if e.get("cat") == "guest" else str(e["name"])
            if e.get("cat") == "device":
                name = f"device: {thread.get((e['pid'], e['tid']), e['tid'])}"
            track = (e["pid"], e["tid"])
            tracks.add(track)
            bars.setdefault(name, {}).setdefault(track, []).append((ts / 1000, max(dur / 1000, 1e-4)))
            time_by_name[name] = time_by_name.get(name, 0.0) + dur
        elif ph == "i" and lo <= ts <= hi:
            marks.setdefault((e["pid"], e["tid"]), []).append(ts / 1000)
        elif ph == "C" and e["name"] == "exits/s" and lo <= ts <= hi and isinstance(e.get("args"), dict):
            counter.append((ts / 1000, float(e["args"].get("exits/s", 0))))
    order = sorted(tracks, key=lambda t: (t[0], t[1]))
    row = {t: i for i, t in enumerate(order)}
    fig, (ax, ax_rate) = plt.subplots(2, 1, figsize=(14, 1.2 + 0.55 * max(len(order), 2) + 1.8), sharex=True,
                                      gridspec_kw={"height_ratios": [max(len(order), 2), 1.6]})
    cmap = plt.get_cmap("tab20")
    ranked = sorted(time_by_name, key=lambda n: -time_by_name[n])
    drawn = 0
    for index, name in enumerate(ranked):
        color = "#b8b8b8" if name == "guest" else cmap(index % 20)
        label = name if index < MAX_LEGEND else None
        for track, spans in bars[name].items():
            ax.broken_barh(spans, (row[track] - 0.4, 0.8), facecolors=color, edgecolors="none", label=label)
            label = None
            drawn += len(spans)
    for track, times in marks.items():
        if track in row:
            ax.vlines(times, row[track] - 0.5, row[track] + 0.5, colors="black", linewidth=0.6)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([f"{str(process.get(p, p))[:48]}\n{thread.get((p, t), t)}" for p, t in order], fontsize=7)
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or "vmikit trace: guest time (grey), exits by call or reason, devices; ticks: markers",
                 fontsize=9)
    if counter:
        counter.sort()
        ax_rate.plot([c[0] for c in counter], [c[1] for c in counter], linewidth=0.8)
    ax_rate.set_ylabel("exits/s", fontsize=8)
    ax_rate.set_xlabel("ms since the trace started", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn
