"""The mmu workload (docs/paging.md) on real KVM and on QEMU: same PASS lines, same DIGEST.

Adding a paging style or ROM profile is one entry in ``MODES``; ``run_mmu`` runs the CLI
and returns what every comparison needs. Under a ROM the kernel runs deprivileged (ring 3) unless
``--privilege ring0``: both are compared with the bare machine (``PRIVILEGE_CONFIGS``).
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import vmikit

PASS_RE = re.compile(r"^(PASS|FAIL): .*$", re.M)
DIGEST_RE = re.compile(r"^DIGEST ([0-9a-f]{16})$", re.M)

# QEMU's isa-debug-exit turns outl(code) into exit status (code << 1) | 1.
QEMU_ARGS = ("-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none",
             "-no-reboot", "-m", "128", "-accel", "kvm")


@dataclass
class MmuRun:
    digest: str | None
    pass_lines: list[str]
    summary: dict[str, object] | None  # the --json summary (None under QEMU)
    console: str
    returncode: int


def _parse(console: str, returncode: int, summary: dict[str, object] | None) -> MmuRun:
    digests = DIGEST_RE.findall(console)
    lines = [m.group(0) for m in PASS_RE.finditer(console)]
    return MmuRun(digests[0] if len(digests) == 1 else None, lines, summary, console, returncode)


def run_mmu(tmp_path: Path, *cli_args: str, guest: str = "mmu") -> MmuRun:
    """``vmikit run GUEST *cli_args --json FILE``: digest, PASS/FAIL lines, JSON summary."""
    out = tmp_path / f"{guest}-{len(list(tmp_path.iterdir()))}.json"
    proc = vmikit("run", guest, *cli_args, "--json", str(out), timeout=300)
    summary = json.loads(out.read_text()) if out.exists() else None
    return _parse(proc.stdout, proc.returncode, summary)


def run_mmu_qemu(qemu: str, cmdline: str = "", guest: str = "mmu") -> MmuRun:
    image = vmikit("build", guest, timeout=300)
    assert image.returncode == 0, image.stderr
    args = [qemu, "-kernel", image.stdout.strip(), *QEMU_ARGS]
    if cmdline:
        args += ["-append", cmdline]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    return _parse(proc.stdout, proc.returncode, None)


def _ok(run: MmuRun) -> None:
    assert run.digest is not None, run.console
    assert run.pass_lines and all(line.startswith("PASS: ") for line in run.pass_lines), run.console
    assert "FAIL" not in run.console


def _deprivileged(run: MmuRun) -> bool:
    """Whether the kernel ran at ring 3 (the execution model's own record; no ROM: no model)."""
    assert run.summary is not None, run.console
    execution = run.summary.get("execution")
    return bool(execution and execution["deprivileged"])  # type: ignore[index]


# One entry per way of running the guest under vmikit: id -> CLI arguments.
MODES = {
    "native": ("--rom", "none"),
    "rom-full": ("--rom", "full"),
    "trap": ("--rom", "none", "--paging", "trap"),
    "direct": ("--paging", "direct"),
    "shadow": ("--paging", "shadow"),
    "direct-ignore": ("--paging", "direct", "--annotations", "ignore"),
    "shadow-ignore": ("--paging", "shadow", "--annotations", "ignore"),
}


@pytest.fixture(scope="module")
def reference(kvm: str, tmp_path_factory: pytest.TempPathFactory) -> MmuRun:
    """The native (no ROM) run every other mode is compared with."""
    run = run_mmu(tmp_path_factory.mktemp("mmu-ref"), *MODES["native"])
    assert run.returncode == 0, run.console
    _ok(run)
    return run


def test_native_run(reference: MmuRun) -> None:
    assert reference.summary is not None and reference.summary["exit_status"] == 0
    assert "INFO: release of a linked table: status=0" in reference.console  # natively nothing checks


def test_qemu_matches_native(reference: MmuRun, qemu: str) -> None:
    run = run_mmu_qemu(qemu, "pages=2048")
    assert run.returncode == 1, run.console  # (0 << 1) | 1
    _ok(run)
    assert run.digest == reference.digest
    assert run.pass_lines == reference.pass_lines


@pytest.mark.parametrize("mode", [m for m in MODES if m != "native"])
def test_mode_matches_native(reference: MmuRun, tmp_path: Path, mode: str) -> None:
    run = run_mmu(tmp_path, *MODES[mode])
    assert run.returncode == 0, run.console
    _ok(run)
    assert run.digest == reference.digest
    assert run.pass_lines == reference.pass_lines
    assert _deprivileged(run) == ("none" not in MODES[mode])  # a ROM deprivileges the kernel by default
    if mode in ("direct", "shadow", "direct-ignore"):
        assert "INFO: release of a linked table: status=-9 (IN_USE)" in run.console
        assert run.summary is not None
        paging = run.summary["paging"]
        assert isinstance(paging, dict) and not paging["refused_writes"], paging


def test_size_from_command_line(kvm: str, qemu: str, tmp_path: Path) -> None:
    """pages=/switches= change the digest (not the PASS lines), identically on vmikit and QEMU."""
    small = run_mmu(tmp_path, "--rom", "none", "--cmdline", "pages=100 switches=8")
    assert small.returncode == 0, small.console
    _ok(small)
    assert "mmu: pages=100 switches=8" in small.console
    on_qemu = run_mmu_qemu(qemu, "pages=100 switches=8")
    assert on_qemu.returncode == 1, on_qemu.console
    assert on_qemu.digest == small.digest and on_qemu.pass_lines == small.pass_lines


def test_queued_updates_save_exits(reference: MmuRun, tmp_path: Path) -> None:
    """Honoured queue annotations complete thousands of SetPTEs in a few FlushQueue exits."""
    run = run_mmu(tmp_path, "--rom", "full")
    assert run.summary is not None
    by_call = run.summary["exits"]["by_call"]  # type: ignore[index]
    queued = by_call["MMU.SetPTE|queue"]
    assert queued["calls"] > 4000 and queued["exits"] == 0
    assert by_call["MMU.FlushQueue"]["exits"] < queued["calls"] // 16


# --- mmuviolate: every validation rule, direct and queued ------------------------------------

VIOLATION_RE = re.compile(r"^VIOLATION (\S+) (direct|queued) status=(-?\d+)(?: index=(-?\d+) cause=(-?\d+))?$", re.M)
UNCHANGED_RE = re.compile(r"^UNCHANGED (\S+) (yes|no)$", re.M)
BATCH_RE = re.compile(r"^BATCH status=(-?\d+) index=(-?\d+) cause=(-?\d+)$", re.M)
APPLIED_RE = re.compile(r"^BATCH applied=(\d+)$", re.M)

# rule -> the error the validating styles return (spec names; values from the spec header)
RULES = {
    "leaf-non-ram": -4,              # BAD_ADDRESS
    "leaf-writable-table": -5,       # PERMISSION
    "leaf-writable-rom": -5,         # PERMISSION
    "nonleaf-unregistered": -6,      # NOT_PAGE_TABLE
    "nonleaf-non-pool": -6,          # NOT_PAGE_TABLE
    "nonleaf-wrong-level": -7,       # WRONG_LEVEL
    "reserved-pml4-ps": -8,          # RESERVED_PTE_BITS
    "reserved-2m-frame": -8,         # RESERVED_PTE_BITS
    "entry-not-in-table": -6,        # NOT_PAGE_TABLE
    "cr3-unregistered": -6,          # NOT_PAGE_TABLE
    "release-in-use": -9,            # IN_USE
    "allocate-mapped-writable": -5,  # PERMISSION
}
CALL_RULES = {"cr3-unregistered", "release-in-use", "allocate-mapped-writable"}
BATCH_INVALID = -10


def _violations(console: str) -> dict[tuple[str, str], tuple[int, int | None, int | None]]:
    return {(m[1], m[2]): (int(m[3]), int(m[4]) if m[4] else None, int(m[5]) if m[5] else None)
            for m in VIOLATION_RE.finditer(console)}


def _audit(run: MmuRun) -> dict[str, object]:
    assert run.summary is not None, run.console
    audit = run.summary["paging"]["audit"]  # type: ignore[index]
    assert isinstance(audit, dict)
    return audit


@pytest.mark.parametrize("privilege", ["deprivileged", "ring0"])
@pytest.mark.parametrize("mode", ["direct", "shadow"])
def test_every_violation_is_refused(kvm: str, tmp_path: Path, mode: str, privilege: str) -> None:
    run = run_mmu(tmp_path, *MODES[mode], "--privilege", privilege, "--audit", guest="mmuviolate")
    assert run.returncode == 0, run.console
    assert _deprivileged(run) == (privilege == "deprivileged")
    audit = _audit(run)  # the auditor walked every registered table after each update: all invariants hold
    assert audit["problems"] == [] and audit["runs"] > 10
    assert "FAIL" not in run.console
    seen = _violations(run.console)
    unchanged = dict(UNCHANGED_RE.findall(run.console))
    for rule, error in RULES.items():
        assert seen[(rule, "direct")][0] == error, (rule, run.console)
        if rule in CALL_RULES:  # the call itself fails, after the ROM completed the queued update it needs
            assert seen[(rule, "queued")] == (error, -1, error), (rule, run.console)
        else:  # the batch fails at its only entry, with the entry's own error
            assert seen[(rule, "queued")] == (BATCH_INVALID, 0, error), (rule, run.console)
        assert unchanged[rule] == "yes", (rule, run.console)
    batch = BATCH_RE.search(run.console)
    assert batch and batch.groups() == (str(BATCH_INVALID), "2", "-4"), run.console
    applied = APPLIED_RE.search(run.console)
    assert applied and applied[1] == "0", run.console
    assert "PASS: valid update after rejections" in run.console


def test_violations_accepted_natively(kvm: str, tmp_path: Path) -> None:
    """Without a ROM and without validation every attempt goes through: the guest copes and finishes."""
    run = run_mmu(tmp_path, *MODES["native"], guest="mmuviolate")
    assert run.returncode == 0, run.console
    seen = _violations(run.console)
    assert set(rule for rule, _ in seen) == set(RULES)
    assert all(status == 0 for status, _, _ in seen.values()), run.console
    assert "BATCH applied=5" in run.console
    assert "PASS: valid update after rejections" in run.console


@pytest.mark.parametrize("mode", ["trap", "direct", "shadow"])
def test_auditor_finds_every_invariant_after_each_batch(reference: MmuRun, tmp_path: Path, mode: str) -> None:
    run = run_mmu(tmp_path, *MODES[mode], "--audit", "--cmdline", "pages=256 switches=4")
    _ok(run)
    audit = _audit(run)
    assert audit["problems"] == [] and audit["runs"] > 10


def test_trap_refuses_the_stores_it_must(kvm: str, tmp_path: Path) -> None:
    """Under trap paging the guest gets no error code: each bad store is dropped and counted."""
    run = run_mmu(tmp_path, *MODES["trap"], guest="mmuviolate")
    assert run.summary is not None
    refused = run.summary["paging"]["refused_writes"]  # type: ignore[index]
    assert refused.get("PERMISSION", 0) >= 2 and refused.get("RESERVED_PTE_BITS", 0) >= 2, refused
    assert refused.get("BAD_ADDRESS", 0) >= 1 and refused.get("WRONG_LEVEL", 0) >= 1, refused


def test_ignoring_annotations_costs_at_least_50x_the_exits(kvm: str, tmp_path: Path) -> None:
    """Issue 4: under direct paging, an annotation-unaware ROM makes >= 50x the exits (whole run)."""
    size = ("--paging", "direct", "--cmdline", "pages=32768 switches=16", "--timeout", "300")
    honour = run_mmu(tmp_path, *size)
    ignore = run_mmu(tmp_path, *size, "--annotations", "ignore")
    _ok(honour)
    assert ignore.digest == honour.digest and ignore.pass_lines == honour.pass_lines
    assert honour.summary is not None and ignore.summary is not None
    total = {name: run.summary["exits"]["total"] for name, run in (("honour", honour), ("ignore", ignore))}  # type: ignore[index]
    assert total["ignore"] >= 50 * total["honour"], total


# --- every ROM profile under both privileges, against the bare machine -----------------------

# A small mmu workload: a ring-0 kernel is emulated instruction by instruction on this host.
SMALL = ("--cmdline", "pages=256 switches=8")
GUEST_ARGS = {"mmu": SMALL, "mmuviolate": ()}
RESULT_RE = re.compile(r"^(VIOLATION|BATCH) .*$", re.M)


@pytest.fixture(scope="module")
def bare(kvm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, MmuRun]:
    """mmu (small) and mmuviolate on the bare machine: what every ROM and privilege must match."""
    tmp = tmp_path_factory.mktemp("bare")
    runs = {guest: run_mmu(tmp, "--rom", "none", *args, guest=guest) for guest, args in GUEST_ARGS.items()}
    for run in runs.values():
        assert run.returncode == 0 and run.pass_lines and "FAIL" not in run.console, run.console
    assert runs["mmu"].digest is not None
    return runs


@pytest.mark.parametrize("rom", ["full", "minimal"])
@pytest.mark.parametrize("guest", list(GUEST_ARGS))
def test_both_privileges_match_the_bare_machine(bare: dict[str, MmuRun], tmp_path: Path, guest: str, rom: str) -> None:
    """Deprivileged (ring 3) and ring 0 under each ROM profile: the bare machine's PASS lines, DIGEST
    (mmu) and violation statuses (mmuviolate: native paging validates nothing, as bare); and the two
    privileges print exactly the same console."""
    runs = {p: run_mmu(tmp_path, "--rom", rom, "--privilege", p, *GUEST_ARGS[guest], guest=guest)
            for p in ("deprivileged", "ring0")}
    reference = bare[guest]
    for privilege, run in runs.items():
        assert run.returncode == 0, (privilege, run.console)
        assert _deprivileged(run) == (privilege == "deprivileged")
        assert run.pass_lines == reference.pass_lines, (privilege, run.console)
        assert run.digest == reference.digest, privilege
        results = [m.group(0) for m in RESULT_RE.finditer(run.console)]
        assert results == [m.group(0) for m in RESULT_RE.finditer(reference.console)], (privilege, run.console)
        assert bool(results) == (guest == "mmuviolate")
    assert runs["deprivileged"].console == runs["ring0"].console
