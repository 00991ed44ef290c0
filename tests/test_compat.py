"""Interface evolution: every guest version under every hypervisor version (`vmikit compat`),
the minimum-version rule, the 1.2 EventChannel family, and the rules in the reference."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import vmikit

from vmikit.abi import cheader, refdoc
from vmikit.abi.history import available_versions, version_path
from vmikit.abi.model import Version
from vmikit.abi.spec import load_spec
from vmikit.abi.versioning import POLICY, RULES
from vmikit.compat.guests import build_for
from vmikit.compat.matrix import Cell, Matrix, Options, run_cell
from vmikit.guest.build import build_info
from vmikit.hypervisor import Hypervisor, eventchannel
from vmikit.hypervisor.context import HypercallError
from vmikit.session import Session

V10, V11, V12 = Version(1, 0), Version(1, 1), Version(1, 2)
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "vmi-reference.md"


@pytest.fixture(scope="module")
def matrix(kvm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("compat") / "matrix.json"
    proc = vmikit("compat", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def cells(matrix: dict[str, object], workload: str) -> dict[tuple[str, str], dict[str, object]]:
    return {(c["guest"], c["hypervisor"]): c for c in matrix["cells"] if c["workload"] == workload}  # type: ignore[index, union-attr]


def test_full_matrix_passes(matrix: dict[str, object]) -> None:
    versions = [str(v) for v in available_versions()]
    assert matrix["versions"] == versions == ["1.0", "1.1", "1.2", "1.3", "1.4", "1.5"]
    assert matrix["ok"] is True and matrix["problems"] == []
    for workload in ("conformance", "mmu"):
        grid = cells(matrix, workload)
        assert set(grid) == {(g, h) for g in versions for h in versions}
        for key, cell in grid.items():
            assert cell["ok"] and cell["exit_status"] == 0 and cell["fails"] == [], (workload, key, cell)
    assert "compat: 72/72 cells pass; OK" in matrix["stdout"]  # type: ignore[operator]


def test_mmu_digest_identical_everywhere(matrix: dict[str, object]) -> None:
    grid = cells(matrix, "mmu")
    digests = {c["digest"] for c in grid.values()}
    assert digests == {matrix["reference_digest"]} and None not in digests
    # Same result, different cost: batching only where both sides know `queue`.
    assert grid[("1.1", "1.1")]["hypercalls"] * 5 < grid[("1.1", "1.0")]["hypercalls"]  # type: ignore[operator]
    assert grid[("1.0", "1.2")]["hypercalls"] == grid[("1.0", "1.0")]["hypercalls"]


def test_guests_learn_what_is_missing(matrix: dict[str, object]) -> None:
    grid = cells(matrix, "conformance")
    note = {key: str(c["note"]) for key, c in grid.items()}
    # A new guest on an old hypervisor: no Query, no queue, no event channel -> fallbacks.
    assert note[("1.2", "1.0")].startswith("rom header, 31/49 via rom, queue plain, evtchn fallback")
    assert note[("1.2", "1.1")] == "query, 47/49 via rom, queue batched, evtchn fallback"
    assert note[("1.2", "1.2")] == "query, 49/49 via rom, queue batched, evtchn hv"
    # An old guest on a new hypervisor uses only what it knows.
    assert note[("1.0", "1.2")] == "rom header, 31/31 via rom, queue plain"
    assert note[("1.1", "1.0")] == "rom header, 31/47 via rom, queue plain"
    # 1.4 (issue 15): Time and upcalls only where the hypervisor has them; a 1.3 or 1.4 guest on a
    # 1.1 hypervisor falls back to its own event queue and the native TSC.
    assert note[("1.3", "1.1")] == "query, 47/51 via rom, queue batched, evtchn fallback"
    assert note[("1.4", "1.1")] == "query, 47/60 via rom, queue batched, evtchn fallback, time fallback, no upcalls"
    assert note[("1.4", "1.3")] == "query, 51/60 via rom, queue batched, evtchn hv, time fallback, no upcalls"
    assert note[("1.4", "1.4")] == "query, 60/60 via rom, queue batched, evtchn hv, time hv, upcalls"
    # 1.5 (issue 16) adds the SMP calls: a 1.5 guest on a 1.4 hypervisor lacks just those four.
    assert note[("1.5", "1.4")] == "query, 60/64 via rom, queue batched, evtchn hv, time hv, upcalls"
    assert note[("1.5", "1.5")] == "query, 64/64 via rom, queue batched, evtchn hv, time hv, upcalls"
    assert note[("1.4", "1.5")] == note[("1.4", "1.4")]


def test_each_guest_is_built_against_its_versions_header() -> None:
    for version in available_versions():
        for workload in ("conformance", "mmu"):
            info = build_info(build_for(workload, version))
            header = cheader.generate(load_spec(version_path(version))).encode()
            assert info["vmi_spec_sha256"] == hashlib.sha256(header).hexdigest(), (workload, version)


def test_minimum_version_rejects_an_older_rom(kvm: str) -> None:
    image = build_for("conformance", V12, min_version=V12)
    old = run_cell(image, V12, V11, "conformance", Options())
    assert old.ok, old.console
    assert "INFO: ROM 1.1 rejected: running natively" in old.lines
    new = run_cell(image, V12, V12, "conformance", Options())
    assert new.ok and "evtchn hv" in new.note(), new.console
    assert old.passes[0] == new.passes[0]


def test_current_guest_same_lines_under_both_privileges(kvm: str) -> None:
    """The compat guest of today's header on today's hypervisor (full ROM, what the matrix runs):
    deprivileged (ring 3) and at ring 0 it prints the same PASS and INFO lines, all passing."""
    image = build_for("conformance", load_spec().version)
    lines = {}
    for privilege in ("deprivileged", "ring0"):
        with Session(image, rom="full", privilege=privilege) as session:
            result = session.run()
        assert result.exit_status == 0 and "FAIL" not in result.console, (privilege, result.console)
        assert result.execution is not None and result.execution["deprivileged"] == (privilege == "deprivileged")
        lines[privilege] = [line for line in result.console.splitlines() if line.startswith(("PASS: ", "INFO: "))]
    assert lines["deprivileged"] == lines["ring0"] and len(lines["ring0"]) > 10


# --- the 1.2 EventChannel family, without a guest -----------------------------------------

def test_event_channel_routes_only_where_the_spec_has_it() -> None:
    assert not Hypervisor(load_spec(version_path(V11))).has_family(0x05)
    hv = Hypervisor(load_spec(version_path(V12)))
    assert hv.has_family(0x05)
    assert hv.route_for(0x05000000).name == "EventChannel.Send"  # type: ignore[union-attr]
    assert hv.route_for(0x05010000).name == "EventChannel.Poll"  # type: ignore[union-attr]


def test_event_channel_semantics() -> None:
    channel = eventchannel.EventChannel(load_spec(version_path(V12)))
    for value in (1, 2, 3):
        channel.send(4, value)
    assert [channel.poll(4) for _ in range(3)] == [(1, 2), (2, 1), (3, 0)]
    for port, error in ((4, "AGAIN"), (channel.ports, "INVALID_ARGUMENT"), (1 << 40, "INVALID_ARGUMENT")):
        with pytest.raises(HypercallError) as err:
            channel.poll(port)
        assert err.value.error == error
    for i in range(channel.depth):
        channel.send(0, i)
    with pytest.raises(HypercallError) as err:
        channel.send(0, 99)
    assert err.value.error == "AGAIN"


def test_matrix_flags_a_digest_difference() -> None:
    def cell(hv: Version, digest: str) -> Cell:
        return Cell(V11, hv, "mmu", 0, f"PASS: x\nDIGEST {digest}\nDONE pass=1 fail=0\n")

    good, bad = "0" * 16, "1" * 16
    m = Matrix([V10, V11], ["mmu"], [cell(V10, good), cell(V11, bad)], reference=cell(V11, good))
    assert not m.ok and any("digests differ" in p for p in m.problems())
    m.cells[1] = cell(V11, good)
    assert m.ok


# --- the rules, written down ------------------------------------------------------------

def test_versioning_rules_are_in_the_generated_reference() -> None:
    text = REFERENCE.read_text()
    assert text == refdoc.generate(load_spec())  # the reference is what `vmikit spec doc` prints
    assert "### Versioning rules" in text
    for paragraph in POLICY:
        assert paragraph in text
    for rule in RULES.values():
        assert f"| `{rule.kind}` | {rule.severity} |" in text
    assert "VMI_MIN_VERSION" in load_spec().doc  # and in the spec's own doc


def test_cli_runs_a_guest_on_an_older_hypervisor(kvm: str) -> None:
    """`vmikit run --spec 1.0`: the current mmu guest on a 1.0 hypervisor, same digest as bare."""
    digests = []
    for args in (("--rom", "none"), ("--spec", "1.0", "--paging", "direct")):
        proc = vmikit("run", "mmu", "--cmdline", "pages=64 switches=4", *args, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        digests.append([line for line in proc.stdout.splitlines() if line.startswith("DIGEST ")])
    assert digests[0] == digests[1] and len(digests[0]) == 1
