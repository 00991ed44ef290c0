"""--trace: a valid trace-event file whose batch facts agree with --json; trace summary and plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from helpers import vmikit
from vmikit.guest.build import build_guest
from vmikit.observe import trace
from vmikit.session import Session


def check_trace_events(events: list[dict[str, Any]]) -> None:
    """Every event has ph/ts/pid/tid/name; B/E pair up and X slices nest properly, per track."""
    slices: dict[tuple[int, int], list[tuple[int, int, str]]] = defaultdict(list)
    open_b: dict[tuple[int, int], list[str]] = defaultdict(list)
    for event in events:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in event, (key, event)
        track = (event["pid"], event["tid"])
        if event["ph"] == "X":
            start = round(event["ts"] * 1000)  # integer ns: no float rounding between neighbours
            slices[track].append((start, start + round(event["dur"] * 1000), event["name"]))
        elif event["ph"] == "B":
            open_b[track].append(event["name"])
        elif event["ph"] == "E":
            assert open_b[track], f"E without B on {track}"
            open_b[track].pop()
    assert not any(open_b.values()), "B without E"
    for track, spans in slices.items():
        spans.sort(key=lambda s: (s[0], -s[1]))
        stack: list[tuple[int, int, str]] = []
        for start, end, name in spans:
            assert end >= start
            while stack and stack[-1][1] <= start:
                stack.pop()
            if stack:
                assert end <= stack[-1][1], f"{name} [{start}, {end}] overlaps {stack[-1]} on track {track}"
            stack.append((start, end, name))


@pytest.fixture(scope="module")
def mmu_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    import os

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing")
    out = tmp_path_factory.mktemp("trace")
    proc = vmikit("run", "mmu", "--paging", "direct", "--trace", str(out / "t.json"), "--json", str(out / "r.json"))
    assert proc.returncode == 0, proc.stderr
    return out / "t.json", json.loads((out / "r.json").read_text())


def test_mmu_trace_is_valid_and_batches_add_up_to_queued_setptes(kvm: str, mmu_trace: tuple[Path, dict[str, Any]]) -> None:
    path, summary = mmu_trace
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    check_trace_events(events)
    other = data["otherData"]
    assert other["bounded"] and other["max_events"] == trace.DEFAULT_MAX_EVENTS and other["events_dropped"] == 0
    flushes = [e for e in events if e["ph"] == "X" and e.get("cat") == "exit" and e["name"] == "MMU.FlushQueue"]
    by_call = summary["exits"]["by_call"]
    queued = sum(c["calls"] - c["exits"] for name, c in by_call.items() if name.startswith(("MMU.SetPTE", "MMU.SetLongPTE")))
    assert queued > 1000  # the workload does queue
    assert len(flushes) == by_call["MMU.FlushQueue"]["exits"]
    assert sum(e["args"]["entries_applied"] for e in flushes) == queued
    assert all(e["args"]["status"] == "OK" and e["args"]["error_index"] is None for e in flushes)
    assert sum(e["args"]["batch_size"] for e in flushes) == queued
    names = {e["name"] for e in events}
    assert {"guest", "vmm", "exits/s", "FlushQueue entries", "thread_name", "process_name"} <= names
    threads = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert "vCPU 0" in threads and "serial COM1" in threads  # the console as a device track


def test_trace_summary_json_and_table(kvm: str, mmu_trace: tuple[Path, dict[str, Any]]) -> None:
    path, summary = mmu_trace
    proc = vmikit("trace", "summary", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {row["name"]: row for row in result["calls"]}
    flush = rows["MMU.FlushQueue"]
    assert flush["count"] == summary["exits"]["by_call"]["MMU.FlushQueue"]["exits"]
    assert flush["call_id"] == f"{summary['exits']['by_call']['MMU.FlushQueue']['id']:#010x}"
    vmm, ex = flush["vmm_us"], flush["exit_us"]
    assert 0 < vmm["min"] <= vmm["median"] <= vmm["p99"] <= vmm["max"]
    assert ex["median"] >= vmm["median"] and len(flush["longest"]) == 5  # the exit holds the VMM's time
    table = vmikit("trace", "summary", str(path))
    assert table.returncode == 0 and "MMU.FlushQueue" in table.stdout and "longest" in table.stdout


def test_trace_plot_writes_a_png(kvm: str, mmu_trace: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = mmu_trace
    proc = vmikit("trace", "plot", str(path), "-o", str(tmp_path / "t.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, what", [
    ("not json", "invalid JSON"),
    ('{"foo": 1}', "no traceEvents list"),
    ('{"traceEvents": [1]}', "not an object"),
    ('{"traceEvents": [{"ph": "X", "ts": 1}]}', "has no pid, tid, name"),
    ('{"traceEvents": [{"ph": "X", "ts": "soon", "pid": 1, "tid": 1, "name": "x"}]}', "non-numeric ts"),
    ("[" * 100000 + "]" * 100000, "invalid JSON"),
], ids=["not-json", "no-events", "not-an-object", "missing-fields", "text-time", "deep-nesting"])
def test_trace_summary_refuses_a_malformed_file_in_one_line(tmp_path: Path, content: str, what: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = vmikit("trace", "summary", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and what in proc.stderr and "Traceback" not in proc.stderr


def test_trace_summary_of_a_missing_file(tmp_path: Path) -> None:
    proc = vmikit("trace", "summary", str(tmp_path / "none.json"))
    assert proc.returncode == 2 and "no trace file" in proc.stderr


def test_the_ring_buffer_keeps_the_newest_events_and_says_so(kvm: str, tmp_path: Path) -> None:
    path = tmp_path / "small.json"
    with trace.recording(path, max_events=300):
        with Session(build_guest("hello")) as session:
            assert session.run().exit_status == 0
    data = json.loads(path.read_text())
    other = data["otherData"]
    assert other["max_events"] == 300 and other["events_dropped"] > 0 and not other["partial"]
    assert other["events_recorded"] - other["events_dropped"] == 300
    check_trace_events(data["traceEvents"])


def test_tracing_off_attaches_nothing(kvm: str) -> None:
    with Session(build_guest("hello")) as session:
        assert session.machine.vcpu.tracer is None  # type: ignore[attr-defined]
        assert session.hypervisor is not None and session.hypervisor.tracer is None


def test_fuzz_trace(kvm: str, tmp_path: Path) -> None:
    proc = vmikit("fuzz", "--calls", "200", "--trace", str(tmp_path / "f.json"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = json.loads((tmp_path / "f.json").read_text())["traceEvents"]
    check_trace_events(events)
    assert any(e.get("cat") == "exit" and e["name"].startswith("MMU.") for e in events)


def test_bench_trace_has_a_track_per_profile_and_the_markers(kvm: str, tmp_path: Path) -> None:
    proc = vmikit("bench", "--quick", "--workload", "null", "--reps", "1", "--no-c-reference", "--no-memory",
                  "--trace", str(tmp_path / "b.json"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    events = json.loads((tmp_path / "b.json").read_text())["traceEvents"]
    check_trace_events(events)
    processes = [e for e in events if e["name"] == "process_name"]
    assert len(processes) >= 2
    marks = [e for e in events if e["ph"] == "i" and e.get("cat") == "marker"]
    assert marks and len(marks) % 2 == 0  # a start and an end marker per timed section
