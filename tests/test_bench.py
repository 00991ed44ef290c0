"""vmikit bench: the harness in a tiny configuration, checked through its JSON (never wall-clock targets)."""

from __future__ import annotations

import copy
import json
import re
from io import StringIO
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from vmikit.bench.cli import bench
from vmikit.bench.report import print_report, report
from vmikit.bench.targets import targets
from vmikit.bench.workloads import (
    MMU_WORKLOADS, PROFILE_BY_NAME, PROFILE_NAMES, QUICK_PROFILES, TINY, WORKLOAD_NAMES,
)

QUEUED_UPDATES = ("map", "unmap", "mprotect")
ROM_PROFILES = ("direct-ignore", "direct-honour", "shadow-ignore", "shadow-honour")
TWINS = tuple((p, f"{p}-ring0") for p in ROM_PROFILES)
# Workloads whose updates change present entries (each needs KVM's shadow tables flushed when
# the kernel is deprivileged), and ones that only fill empty entries (no flush).
CHANGES_PRESENT = ("unmap", "mprotect", "fork")
FILLS_EMPTY = ("setpte", "map", "demand")


@pytest.fixture(scope="module")
def results(kvm: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["-n", str(TINY.n), "-m", str(TINY.m), "--calls", str(TINY.calls), "--reps", str(TINY.reps),
            "--json", str(out)]
    result = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Goals, measured in this run" in result.output and "C reference" in result.output
    return json.loads(out.read_text())


def test_every_cell_present_and_positive(results: dict) -> None:
    assert results["errors"] == {}
    for workload in WORKLOAD_NAMES:
        for profile in PROFILE_NAMES:
            cell = results["cells"][workload][profile]
            assert cell["reps"] == TINY.reps
            assert cell["ops"] == TINY.of(workload)
            for key in ("ns_per_op", "wall_s"):
                s = cell[key]
                assert 0 < s["min"] <= s["median"] <= s["max"], (workload, profile, key)
            assert cell["exits_per_op"]["min"] >= 0
            assert cell["ratio_to_native"] > 0
    assert results["cells"]["map"]["native"]["ratio_to_native"] == 1.0
    for profile in PROFILE_NAMES:  # the VMM's time per queued entry, per repetition, where entries are queued
        spread = results["cells"]["map"][profile]["vmm_ns_per_entry"]
        if "honour" in profile and profile != "native":
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], profile
        else:
            assert spread is None, profile


def test_run_is_described(results: dict) -> None:
    machine = results["machine"]
    assert machine["kernel"] and machine["kvm"]["capabilities"]
    assert results["date"] and results["config"]["repetitions"] == TINY.reps
    assert results["tsc_khz"] > 0
    names = [t["name"] for t in results["targets"]]
    assert len(names) == 9 and len(set(names)) == 9
    for wanted in ("map / setpte per page, direct-honour", "map, direct-honour / native",
                   "rdtsc-vmi per call, direct-honour", "VMM per queued entry, direct-honour",
                   "VMM per queued entry, shadow-honour"):
        assert wanted in names, wanted
    for t in results["targets"]:
        assert "issue" not in t["name"] and t["kind"] in ("ratio", "fraction", "ns", "MiB")
        assert (t["measured"] is None) == (t["met"] is None)
    assert results["config"]["privileges"] == {p: PROFILE_BY_NAME[p].privilege for p in PROFILE_NAMES}


def test_every_rom_profile_runs_under_both_privileges(results: dict) -> None:
    assert PROFILE_NAMES == ("native", "trap", *(name for pair in TWINS for name in pair))
    for workload in WORKLOAD_NAMES:
        cells = results["cells"][workload]
        assert cells["native"]["privilege"] == cells["trap"]["privilege"] == "ring0"
        for deprivileged, ring0 in TWINS:
            assert cells[deprivileged]["privilege"] == "deprivileged", (workload, deprivileged)
            assert cells[ring0]["privilege"] == "ring0", (workload, ring0)
            assert cells[deprivileged]["ratio_to_ring0"] > 0
            assert cells[ring0]["ratio_to_ring0"] is None
            # Same ROM calls, same exits per call ID: the privilege changes where the kernel runs, not what it asks.
            assert {k: v["calls"] for k, v in cells[deprivileged]["by_call"].items()} == \
                {k: v["calls"] for k, v in cells[ring0]["by_call"].items()}, (workload, deprivileged)
    for name, session in results["sessions"].items():
        assert session["privilege"] == PROFILE_BY_NAME[name].privilege
        execution = session["session"]["execution"]
        if PROFILE_BY_NAME[name].rom == "none":
            assert execution is None
        else:
            assert execution["privilege"] == session["privilege"]
            assert execution["deprivileged"] == (session["privilege"] == "deprivileged")


def test_vmm_time_is_its_own_figure(results: dict) -> None:
    for workload in WORKLOAD_NAMES:
        for profile in ("native", "trap"):  # no hypervisor to spend time in
            assert results["cells"][workload][profile]["vmm_us_per_op"] == 0
    for deprivileged, ring0 in TWINS:
        for name in (deprivileged, ring0):
            null = results["cells"]["null"][name]
            assert null["vmm_us_per_op"] > 0 and 0 < null["vmm_share_of_time"] < 1
            assert null["by_call"]["Query.GetVersion"]["vmm_us_per_exit"] > 0
            assert results["cells"]["rdtsc-vmi"][name]["vmm_us_per_op"] == 0  # the ROM runs rdtsc itself
        assert results["cells"]["demand"][deprivileged]["event_us_per_op"] > 0  # reflecting each #PF
        assert results["cells"]["demand"][ring0]["event_us_per_op"] == 0
        for name in (deprivileged, ring0):
            queue = results["cells"]["map"][name]["queue"]
            if name.startswith(("direct-honour", "shadow-honour")):
                assert TINY.n <= 256 and queue["entries_per_flushqueue"] == pytest.approx(TINY.n)
                assert queue["entries"] == TINY.n * TINY.reps and queue["vmm_us_per_entry"] > 0
            else:
                assert queue["entries"] == 0 and queue["vmm_us_per_entry"] is None


def test_deprivileged_demand_faults_pass_through_the_hypervisor(results: dict) -> None:
    for deprivileged, ring0 in TWINS:
        d, r = results["cells"]["demand"][deprivileged], results["cells"]["demand"][ring0]
        # At ring 3 every #PF reaches the hypervisor (an exit on its event port) and is reflected.
        assert d["exits_per_op"]["median"] == pytest.approx(r["exits_per_op"]["median"] + 1.0)
        by_vector = results["sessions"][deprivileged]["session"]["execution"]["by_vector"]
        assert by_vector.get("14", 0) >= TINY.n * TINY.reps
        assert results["sessions"][ring0]["session"]["execution"]["exceptions"] == 0


def test_flush_mechanism_has_its_own_figure(results: dict) -> None:
    for deprivileged, ring0 in TWINS:
        for workload in CHANGES_PRESENT:
            f = results["cells"][workload][deprivileged]["flush"]
            assert f["flushes"] > 0, (workload, deprivileged)
            assert f["us_per_flush"] > 0 and f["share_of_time"]["median"] > 0
            assert sum(f["by_kind"].values()) == f["flushes"] and set(f["by_kind"]) <= {"frames", "all"}
            if deprivileged.endswith("ignore") and workload != "fork":
                assert f["flushes_per_op"] == pytest.approx(1.0)  # one SetPTE exit, one flush, per page
            if deprivileged.endswith("honour"):
                assert f["flushes_per_op"] <= 0.1, (workload, deprivileged)  # one per batch
        for workload in FILLS_EMPTY:
            assert results["cells"][workload][deprivileged]["flush"]["flushes"] == 0, (workload, deprivileged)
        for workload in WORKLOAD_NAMES:  # at ring 0 the emulator walks the tables afresh: never a flush
            f = results["cells"][workload][ring0]["flush"]
            assert f["flushes"] == 0 and f["us_per_flush"] is None
        session = results["sessions"][deprivileged]["flush"]
        assert session["session_flushes"] >= session["timed_flushes"] > 0
        assert session["session_us_mean"] > 0
        assert results["sessions"][ring0]["flush"]["session_flushes"] == 0


def test_native_and_trap_make_no_calls(results: dict) -> None:
    for profile in ("native", "trap"):
        for workload in WORKLOAD_NAMES:
            assert results["cells"][workload][profile]["by_call"] == {}, (workload, profile)
    for workload in MMU_WORKLOADS:  # natively the tables are plain memory
        assert results["cells"][workload]["native"]["exits_per_op"]["max"] == 0, workload
    for workload in QUEUED_UPDATES:  # trap: every page-table store exits
        assert results["cells"][workload]["trap"]["exits_per_op_by_reason"]["mmio"] == pytest.approx(1.0)


@pytest.mark.parametrize("suffix", ["", "-ring0"])
@pytest.mark.parametrize("style", ["direct", "shadow"])
def test_ignore_exits_per_update_honour_batches(results: dict, style: str, suffix: str) -> None:
    for workload in QUEUED_UPDATES:
        ignore = results["cells"][workload][f"{style}-ignore{suffix}"]
        honour = results["cells"][workload][f"{style}-honour{suffix}"]
        assert ignore["by_call"]["MMU.SetPTE"]["exits_per_op"] == pytest.approx(1.0)
        assert 1.0 <= ignore["exits_per_op"]["median"] <= 1.1, workload
        assert honour["exits_per_op"]["median"] <= 0.1, workload
        assert honour["by_call"]["MMU.SetPTE|queue"]["calls_per_op"] == pytest.approx(1.0)
        assert honour["by_call"]["MMU.SetPTE|queue"]["exits"] == 0
    setpte = results["cells"]["setpte"][f"{style}-honour{suffix}"]  # never queued: one exit per page
    assert setpte["exits_per_op"]["median"] == pytest.approx(1.0)


def test_calls_through_the_rom(results: dict) -> None:
    for profile in PROFILE_NAMES[2:]:
        assert results["cells"]["null"][profile]["exits_per_op"]["median"] == pytest.approx(1.0)
        assert results["cells"]["cpuid-vmi"][profile]["by_call"]["CPU.CPUID"]["calls_per_op"] == pytest.approx(1.0)
        assert results["cells"]["rdtsc-vmi"][profile]["exits_per_op"]["max"] == 0  # the full ROM runs rdtsc itself
        assert results["cells"]["switch"][profile]["by_call"]["CPU.SetCR3"]["exits_per_op"] == pytest.approx(1.0)
    assert results["cells"]["switch"]["trap"]["exits_per_op"]["max"] == 0  # mov cr3 does not exit


def test_c_reference_and_memory(results: dict) -> None:
    c = results["c_reference"]
    assert "error" not in c, c
    assert c["c"]["null_ns_per_call"]["median"] > 0 and c["python"]["null_ns_per_call"]["median"] > 0
    assert c["c"]["hypercalls"] >= TINY.calls * TINY.reps
    assert c["python"]["exits_per_call"] == pytest.approx(1.0)
    assert c["python"]["privilege"] == "ring0"  # refvmm has no execution model: both sides at ring 0
    assert c["ratio"] > 0
    # Interleaved rounds (C, Python, C, Python, ...), every round kept: the ratio is their median.
    rounds = c["rounds"]
    assert rounds == 5 and len(c["ratio_by_round"]) == rounds  # a full-mode run (the fixture is not --quick)
    for side in ("c", "python"):
        by_round = c[side]["null_ns_per_call_by_round"]
        s = c[side]["null_ns_per_call"]
        assert len(by_round) == rounds and all(s["min"] <= v <= s["max"] for v in by_round), side
    assert c["ratio"] == pytest.approx(sorted(c["ratio_by_round"])[rounds // 2])
    assert c["ratio_by_round"] == pytest.approx([p / q for p, q in zip(c["python"]["null_ns_per_call_by_round"],
                                                                       c["c"]["null_ns_per_call_by_round"])])
    spread = c["ratio_spread"]
    assert 0 < spread["min"] <= spread["median"] == c["ratio"] <= spread["max"]
    assert 0 < c["c"]["vmm_ns_per_exit"] < c["python"]["vmm_ns_per_exit"]  # C's exit loop does far less
    mem = results["memory"]
    assert "error" not in mem, mem
    assert mem["exit_status"] == 0 and mem["privilege"] == "deprivileged"
    assert 0 < mem["guest_ram_resident_kib"] <= mem["guest_ram_mib"] * 1024
    assert mem["beyond_guest_kib"] > 0


def test_events_side_by_side(results: dict) -> None:
    """Alarm latency and event round trip, the VMI path (deprivileged) and native interrupts, one run."""
    from vmikit.bench.eventbench import EVENTS_FULL, FIGURES

    ev = results["events"]
    assert "error" not in ev, ev
    assert ev["rounds"] == EVENTS_FULL.rounds and ev["samples_per_round"] == EVENTS_FULL.samples
    assert ev["paths"]["vmi"] == {"rom": "full", "privilege": "deprivileged", "doc": ev["paths"]["vmi"]["doc"]}
    assert ev["paths"]["native"]["rom"] == "none" and ev["paths"]["native"]["privilege"] == "ring0"
    assert set(ev["cells"]) == set(FIGURES) == {"alarm_latency", "event_roundtrip"}
    for figure in FIGURES:
        assert set(ev["cells"][figure]) == {"vmi", "native"}, figure
        for path, cell in ev["cells"][figure].items():
            assert cell["samples"] == EVENTS_FULL.rounds * EVENTS_FULL.samples
            assert len(cell["median_ns_by_round"]) == EVENTS_FULL.rounds
            ns = cell["ns"]
            assert 0 <= ns["min"] <= ns["median"] <= ns["max"], (figure, path)
            assert ns["median"] > 0, (figure, path)
            # Sane: an event is handled within a second (the guest's own timeout for a round trip is 10 ms).
            assert ns["median"] < 1e9, (figure, path)
        assert ev["vmi_over_native"][figure] > 0
    text = _render(results, 80)
    assert "Events: VMI 1.4 beside native interrupts" in text
    assert "alarm -> handler" in text and "event round trip" in text


def _render(results: dict, width: int) -> str:
    out = StringIO()
    print_report(results, Console(file=out, width=width))
    return out.getvalue()


def _plain(cell: object) -> str:
    return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)


def _check_fits(results: dict, width: int) -> str:
    """The report at `width` columns: no line longer, nothing cut with an ellipsis, every table at
    its full width with one line per row and its headers distinct and whole on the header line."""
    text = _render(results, width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    tables = [part for part in report(results) if isinstance(part, Table)]
    assert tables
    console = Console(file=StringIO(), width=width)
    for table in tables:
        headers = [_plain(column.header) for column in table.columns]
        assert len(set(headers)) == len(headers), headers
        assert all("\n" not in _plain(cell) for column in table.columns for cell in column.cells), table.title
        # Its widest rendering fits: rich never has to shrink a column, so no cell wraps or is cut.
        assert Measurement.get(console, console.options, table).maximum <= width, table.title
        bare = copy.copy(table)
        bare.title = bare.caption = None
        lines = []
        for w in (width, 10_000):
            out = StringIO()
            Console(file=out, width=w).print(bare)
            lines.append(out.getvalue().splitlines())
        assert len(lines[0]) == len(lines[1]), table.title  # no row took a second line
        assert all(h in lines[0][0] for h in headers), (lines[0][0], headers)
    return text


@pytest.mark.parametrize("width", [80, 120, 200])
def test_report_fits_the_width_one_line_per_cell(results: dict, width: int) -> None:
    text = _check_fits(results, width)
    for singular in ("exit", "flush", "page", "switch", "call", "repetition", "goal"):
        assert not re.search(rf"(?<![\d.])1 {singular}e?s\b", text), singular
    title = " ".join(" ".join(text.splitlines()[:2]).split())
    assert f"(n={TINY.n} pages, m={TINY.m} switches, {TINY.calls} calls; median of {TINY.reps} repetitions)" \
        in title  # plural where plural
    for workload in WORKLOAD_NAMES:  # the main table: one row per workload and profile, names whole
        for profile in PROFILE_NAMES:
            assert re.search(rf"^{re.escape(workload)} .* {re.escape(profile)} ", text, re.M) or \
                re.search(rf"^ +{re.escape(profile)} ", text, re.M), (workload, profile)
    goals = text[text.index("Goals, measured in this run"):]
    for t in results["targets"]:  # a full run measured every goal; each has a plain name
        assert t["measured"] is not None and t["name"] in goals
        assert not re.search(r"issue|#\d", t["name"], re.I)


def test_singular_counts_in_the_report(results: dict) -> None:
    one = copy.deepcopy(results)
    one["config"].update(n=1, m=1, calls=1, repetitions=1)
    text = _check_fits(one, 80)
    title = " ".join(" ".join(text.splitlines()[:2]).split())
    assert "(n=1 page, m=1 switch, 1 call; median of 1 repetition)" in title


def test_filtered_report_shows_only_its_goals(results: dict) -> None:
    # What `--workload map --profile native,direct-honour --no-c-reference --no-memory` leaves.
    kept = ("native", "direct-honour")
    filtered = {k: v for k, v in results.items() if k not in ("c_reference", "memory")}
    filtered["cells"] = {"map": {p: results["cells"]["map"][p] for p in kept}}
    filtered["sessions"] = {p: results["sessions"][p] for p in kept}
    filtered["targets"] = targets(filtered)
    measured = {t["name"] for t in filtered["targets"] if t["measured"] is not None}
    assert measured == {"map, direct-honour / native", "VMM per queued entry, direct-honour"}
    for width in (80, 200):
        text = _check_fits(filtered, width)
        goals = text[text.index("Goals, measured in this run"):]
        for t in filtered["targets"]:
            assert (t["name"] in goals) == (t["name"] in measured), t["name"]
        assert "7 more goals need workloads, profiles or probes this run left out" in " ".join(goals.split())
        assert "n/a" not in goals
    nothing = copy.deepcopy(filtered)
    nothing["cells"] = {"null": {"native": results["cells"]["null"]["native"]}}
    nothing["targets"] = targets(nothing)
    assert "Goals" not in _render(nothing, 80)  # no goal measured: no goals table at all


def test_chart_legend_outside_and_axes_labelled(results: dict) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from vmikit.bench.report import figure

    fig = figure(results)
    try:
        fig.draw_without_rendering()  # lays the figure out as savefig does
        ax_time, ax_exits = fig.axes
        legend = fig.legends[0].get_window_extent()
        for ax in (ax_time, ax_exits):  # below the axes, covering no bar
            assert not legend.overlaps(ax.get_window_extent())
            assert legend.y1 <= ax.get_window_extent().y0
        assert "µs" in ax_time.get_xlabel()  # the table's unit, not ns
        lo, hi = ax_time.get_xlim()
        labelled = [t for t in ax_time.xaxis.get_majorticklocs() if lo <= t <= hi]
        assert len(labelled) >= 4 and all(label.get_text() for label in ax_time.get_xticklabels())
        medians_us = [c["ns_per_op"]["median"] / 1e3 for pp in results["cells"].values() for c in pp.values()]
        assert lo <= min(medians_us) and max(medians_us) <= hi
        most = max(c["exits_per_op"]["median"] for pp in results["cells"].values() for c in pp.values())
        assert most > 2  # fork: two updates per page plus its batches
        ticks = [t for t in ax_exits.xaxis.get_majorticklocs() if t <= ax_exits.get_xlim()[1]]
        assert 2 in ticks and most <= ax_exits.get_xlim()[1]  # the ticks cover the data
        assert [label.get_text() for label in ax_exits.get_xticklabels()][:5] == ["0", "0.001", "0.01", "0.1", "1"]
    finally:
        plt.close(fig)


def test_filters_and_plot(kvm: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    result = CliRunner().invoke(bench, ["--workload", "map,null", "--profile", "native", "--profile", "direct-honour",
                                        "-n", "16", "--calls", "5", "--reps", "1", "--no-c-reference", "--no-memory",
                                        "--json", str(out), "--plot", str(png)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["cells"]) == {"map", "null"}
    assert set(data["cells"]["map"]) == {"native", "direct-honour"}
    assert "c_reference" not in data and "memory" not in data
    assert png.read_bytes().startswith(b"\x89PNG")
    output = " ".join(result.output.split())
    for t in data["targets"]:  # the JSON keeps every goal; the report shows only those this run measured
        assert (t["name"] in output) == (t["measured"] is not None), t["name"]
    assert sum(t["measured"] is not None for t in data["targets"]) == 2


def test_quick_keeps_one_ring0_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    import vmikit.bench.report
    import vmikit.bench.runner

    seen = []
    monkeypatch.setattr(vmikit.bench.runner, "run_bench", lambda config, **_: seen.append(config) or {"errors": {}})
    monkeypatch.setattr(vmikit.bench.report, "print_report", lambda *a, **k: None)
    for args in (["--quick"], ["--quick", "--profile", "shadow-honour-ring0"], []):
        result = CliRunner().invoke(bench, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    quick, chosen, full = (c.profiles for c in seen)
    assert quick == QUICK_PROFILES and chosen == ("shadow-honour-ring0",) and full == PROFILE_NAMES
    assert [p for p in quick if PROFILE_BY_NAME[p].privilege == "ring0" and PROFILE_BY_NAME[p].rom != "none"] == \
        ["direct-honour-ring0"]
    assert {p for p in PROFILE_NAMES if PROFILE_BY_NAME[p].privilege == "deprivileged"} <= set(quick)


def test_unknown_workload_is_a_usage_error() -> None:
    from vmikit.errors import UsageError

    with pytest.raises(UsageError, match="unknown workload 'nope'"):
        CliRunner().invoke(bench, ["--workload", "nope"], catch_exceptions=False, standalone_mode=False)
