"""Several vCPUs (issue 16, docs/smp.md): the board's --cpus, and VMI 1.5's SMP calls through the
smpvmi guest (SetInitialAPState, GetCPUInfo, per-CPU queues, FlushTLBMulti)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import vmikit
from vmikit.machine import layout
from vmikit.rom.generate import layout_header
from vmikit.abi.spec import load_spec
from vmikit.rom.image import RomProfile


def run_json(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, object]]:
    out = tmp_path / "run.json"
    proc = vmikit("run", *args, "--json", str(out), timeout=300)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, data


def test_per_cpu_areas_fill_the_rom_data_area_and_the_queue_fits() -> None:
    assert layout.PERCPU_SIZE * layout.MAX_CPUS == layout.ROM_DATA_SIZE
    assert layout.percpu_area(layout.MAX_CPUS - 1) + layout.PERCPU_SIZE == layout.ROM_DATA_BASE + layout.ROM_DATA_SIZE
    header = layout_header(load_spec(), RomProfile.FULL, True, smp=True)
    values = {w[1]: int(w[2], 0) for w in (line.split() for line in header.splitlines()) if len(w) == 3 and w[0] == "#define"}
    assert values["ROM_SMP"] == 1 and values["PCPU_SHARED"] == layout.PERCPU_SHARED
    assert values["PCPU_QUEUE"] + values["PCPU_QUEUE_ENTRIES"] * 32 <= values["PCPU_SHARED"]
    assert values["PCPU_COUNT"] > values["PCPU_CPU"] and values["PCPU_QUEUE"] >= values["PCPU_COUNT"] + 4


@pytest.mark.parametrize("cpus", [2, 8])
def test_the_board_runs_with_several_vcpus_and_counts_exits_per_cpu(kvm: str, tmp_path: Path, cpus: int) -> None:
    status, output, data = run_json(tmp_path, "hello", "--rom", "none", "--cpus", str(cpus))
    assert status == 0, output
    assert data["cpus"] == cpus
    by_cpu = data["exits"]["by_cpu"]  # type: ignore[index]
    assert len(by_cpu) == cpus and sum(by_cpu[0].values()) > 0  # the APs were never started: no exits
    assert all(sum(c.values()) == 0 for c in by_cpu[1:])


def test_halted_for_good_only_when_every_vcpu_is(kvm: str, tmp_path: Path) -> None:
    # The BSP halts with interrupts off; the AP waits for a SIPI that never comes: nothing can
    # wake either, so the run ends as a one-CPU machine's does (exit 4), not at the watchdog.
    status, output, _ = run_json(tmp_path, "pc", "--rom", "none", "--cmdline", "halt", "--cpus", "2",
                                 "--timeout", "60")
    assert status == 4 and "halted" in output, output


@pytest.mark.parametrize("args, said", [
    (("--cpus", "9"), "9"),
    (("--cpus", "2", "--rom", "full", "--privilege", "ring0", "--spec", "1.2"), "shared page"),
])
def test_unsupported_cpu_configurations_are_one_line_errors(kvm: str, args: tuple[str, ...], said: str) -> None:
    proc = vmikit("run", "hello", *args)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


SMP_PASS = [
    "PASS: every CPU started through SetInitialAPState",
    "PASS: each AP made its per-CPU VMI call and GetCPUInfo names it",
    "PASS: starting a CPU twice is refused",
    "PASS: two CPUs queue at once: CPU 0's flush applies all of its own entries and none of CPU 1's",
    "PASS: CPU 1's batch with one bad entry applies nothing and names that entry",
    "PASS: while CPU 0's unmap is queued, CPU 1 still reads the old frame",
    "PASS: after CPU 0's FlushTLBMulti with CPU 1 in the set returns, CPU 1 can no longer read the page",
]


@pytest.mark.parametrize("privilege, paging, cpus", [
    ("deprivileged", "direct", 2), ("deprivileged", "shadow", 4), ("ring0", "direct", 2), ("ring0", "shadow", 2),
    ("ring0", "direct", 4)])
def test_private_queues_and_a_shootdown_on_several_cpus(kvm: str, tmp_path: Path, privilege: str, paging: str,
                                                        cpus: int) -> None:
    status, output, data = run_json(tmp_path, "smpvmi", "--cpus", str(cpus), "--privilege", privilege,
                                    "--paging", paging, "--memory", "256")
    assert status == 0, output
    assert [line for line in output.splitlines() if line.startswith("PASS")] == SMP_PASS
    assert "FAIL" not in output
    by_call = data["exits"]["by_call"]  # type: ignore[index]
    # Both CPUs queued 100 SetPTEs with no exit; the hypervisor saw each batch once.
    assert by_call["MMU.SetPTE|queue"]["exits"] == 0 and by_call["MMU.SetPTE|queue"]["calls"] >= 100
    assert by_call["CPU.SetInitialAPState"]["calls"] == cpus  # one per AP, and one refused
    assert by_call["MMU.FlushTLBMulti"]["exits"] == 1
    assert "CPU 1 flush status -10 (index 50), 0 applied" in output
    # The two CPUs' exits are counted where they happened.
    by_cpu = data["exits"]["by_cpu"]  # type: ignore[index]
    assert all(sum(c.values()) > 0 for c in by_cpu)
    assert data["privilege"] == privilege


def test_without_a_queue_the_same_guest_still_passes(kvm: str, tmp_path: Path) -> None:
    status, output, _ = run_json(tmp_path, "smpvmi", "--cpus", "2", "--privilege", "ring0", "--paging", "direct",
                                 "--annotations", "ignore", "--memory", "256")
    assert status == 0 and "FAIL" not in output, output
    assert "SKIP: private queues" in output and "the unmap was not queued" in output


def test_one_cpu_or_no_rom_skips(kvm: str) -> None:
    for args in (("--cpus", "1"), ("--cpus", "2", "--rom", "none")):
        proc = vmikit("run", "smpvmi", *args)
        assert proc.returncode == 0 and "SKIP: needs a VMI 1.5 ROM" in proc.stdout, proc.stdout + proc.stderr


def test_shootdown_bench_has_every_path_and_cpu_count(kvm: str) -> None:
    from vmikit.bench.report import shootdown_table
    from vmikit.bench.shootdown import ShootdownSizes, measure

    result = measure(ShootdownSizes(samples=3, rounds=1))
    assert result["vcpus"] == 4 and set(result["paths"]) == {"vmi", "native"}
    for figure in ("vmi", "percpu", "ipi"):
        for n in (1, 2, 4):
            cell = result["cells"][f"{figure}.{n}"]
            assert cell["samples"] == 3 and cell["cpus"] == n
            assert 0 < cell["ns"]["min"] <= cell["ns"]["median"] <= cell["ns"]["max"]
    # The native path interrupts every target: four CPUs cost more than one.
    assert result["cells"]["ipi.4"]["ns"]["median"] > result["cells"]["ipi.1"]["ns"]["median"]
    assert shootdown_table({"shootdown": result}) is not None
