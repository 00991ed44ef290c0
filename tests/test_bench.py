"""vmikit bench: the harness in a tiny configuration, checked through its JSON (never wall-clock targets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmikit.bench.cli import bench
from vmikit.bench.workloads import MMU_WORKLOADS, PROFILE_NAMES, TINY, WORKLOAD_NAMES

QUEUED_UPDATES = ("map", "unmap", "mprotect")


@pytest.fixture(scope="module")
def results(kvm: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["-n", str(TINY.n), "-m", str(TINY.m), "--calls", str(TINY.calls), "--reps", str(TINY.reps),
            "--json", str(out)]
    result = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "targets" in result.output and "C reference" in result.output
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


def test_run_is_described(results: dict) -> None:
    machine = results["machine"]
    assert machine["kernel"] and machine["kvm"]["capabilities"]
    assert results["date"] and results["config"]["repetitions"] == TINY.reps
    assert results["tsc_khz"] > 0
    assert len(results["targets"]) == 5


def test_native_and_trap_make_no_calls(results: dict) -> None:
    for profile in ("native", "trap"):
        for workload in WORKLOAD_NAMES:
            assert results["cells"][workload][profile]["by_call"] == {}, (workload, profile)
    for workload in MMU_WORKLOADS:  # natively the tables are plain memory
        assert results["cells"][workload]["native"]["exits_per_op"]["max"] == 0, workload
    for workload in QUEUED_UPDATES:  # trap: every page-table store exits
        assert results["cells"][workload]["trap"]["exits_per_op_by_reason"]["mmio"] == pytest.approx(1.0)


@pytest.mark.parametrize("style", ["direct", "shadow"])
def test_ignore_exits_per_update_honour_batches(results: dict, style: str) -> None:
    for workload in QUEUED_UPDATES:
        ignore = results["cells"][workload][f"{style}-ignore"]
        honour = results["cells"][workload][f"{style}-honour"]
        assert ignore["by_call"]["MMU.SetPTE"]["exits_per_op"] == pytest.approx(1.0)
        assert 1.0 <= ignore["exits_per_op"]["median"] <= 1.1, workload
        assert honour["exits_per_op"]["median"] <= 0.1, workload
        assert honour["by_call"]["MMU.SetPTE|queue"]["calls_per_op"] == pytest.approx(1.0)
        assert honour["by_call"]["MMU.SetPTE|queue"]["exits"] == 0
    setpte = results["cells"]["setpte"][f"{style}-honour"]  # never queued: one exit per page
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
    assert c["ratio"] > 0
    mem = results["memory"]
    assert "error" not in mem, mem
    assert mem["exit_status"] == 0
    assert 0 < mem["guest_ram_resident_kib"] <= mem["guest_ram_mib"] * 1024
    assert mem["beyond_guest_kib"] > 0


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


def test_unknown_workload_is_a_usage_error() -> None:
    from vmikit.errors import UsageError

    with pytest.raises(UsageError, match="unknown workload 'nope'"):
        CliRunner().invoke(bench, ["--workload", "nope"], catch_exceptions=False, standalone_mode=False)
