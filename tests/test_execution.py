"""The VMI execution model (docs/execution-model.md) on real KVM: a deprivileged kernel's
privileged instructions fault to its own handler, user mode cannot make privileged calls,
and no stale translation survives a page-table change made through VMI.

The guests are ``privilege`` and ``staletlb`` (src/vmikit/guest/src/guests/).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import vmikit
from vmikit.session import Session

PASS_RE = re.compile(r"^(PASS|FAIL): .*$", re.M)
PRIVILEGED = ("mov %rax,%cr3", "wrmsr", "lgdt", "hlt", "cli", "invlpg")


def _run(tmp_path: Path, guest: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    out = tmp_path / f"{guest}-{len(list(tmp_path.iterdir()))}.json"
    proc = vmikit("run", guest, *args, "--json", str(out), timeout=300)
    summary = json.loads(out.read_text()) if out.exists() else {}
    return proc, summary


def _passes(console: str) -> list[str]:
    return [m.group(0) for m in PASS_RE.finditer(console)]


@pytest.mark.parametrize("rom", ["full", "minimal"])
def test_privileged_instructions_raise_gp_to_the_kernel(kvm: str, tmp_path: Path, rom: str) -> None:
    proc, summary = _run(tmp_path, "privilege", "--rom", rom)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["privilege"] == "deprivileged"
    lines = _passes(proc.stdout)
    for insn in PRIVILEGED:
        assert f"PASS: deprivileged: {insn} raises #GP to the kernel's own handler" in lines, proc.stdout
    assert "PASS: deprivileged: none of them changed CR3, LSTAR, the GDT or the interrupt flag" in lines
    execution = summary["execution"]
    assert isinstance(execution, dict)
    assert execution["by_vector"].get("13", 0) >= len(PRIVILEGED)  # each one went through the hypervisor


@pytest.mark.parametrize("privilege", ["deprivileged", "ring0"])
def test_user_mode_gets_permission_and_comes_back(kvm: str, tmp_path: Path, privilege: str) -> None:
    proc, summary = _run(tmp_path, "privilege", "--privilege", privilege)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["privilege"] == privilege
    lines = _passes(proc.stdout)
    assert not [line for line in lines if line.startswith("FAIL")], proc.stdout
    for call in ("CPU.GetCR0", "CPU.WRMSR(LSTAR)", "CPU.SetCR4"):
        assert any(line.startswith(f"PASS: user mode: {call} is refused with PERMISSION") for line in lines), call
    assert any(line.startswith("PASS: user mode: the user-safe Query.GetVersion works") for line in lines)
    assert "PASS: nothing user mode asked for changed: LSTAR and CR4 are the kernel's" in lines
    assert "PASS: the kernel's own calls still work afterwards" in lines
    assert "PASS: kernel -> user -> kernel: the user's syscall comes back to the kernel (rax = 42)" in lines
    assert "PASS: kernel -> user -> kernel: a user #UD reaches the kernel's handler (1006)" in lines
    execution = summary["execution"]
    assert isinstance(execution, dict)
    assert execution["user_refused"] == 3
    if privilege == "deprivileged":
        assert execution["user_entries"] == 2 and execution["syscalls"] == 1


def test_user_round_trip_on_a_bare_machine(kvm: str, tmp_path: Path) -> None:
    proc, summary = _run(tmp_path, "privilege", "--rom", "none")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["privilege"] == "ring0"
    assert "PASS: kernel -> user -> kernel: a user #UD reaches the kernel's handler (1006)" in _passes(proc.stdout)


STALE_MODES = [("direct", "honour"), ("direct", "ignore"), ("shadow", "honour"), ("shadow", "ignore")]


@pytest.mark.parametrize(("paging", "annotations"), STALE_MODES)
def test_no_stale_translation_after_vmi_changes(kvm: str, tmp_path: Path, paging: str, annotations: str) -> None:
    proc, summary = _run(tmp_path, "staletlb", "--paging", paging, "--annotations", annotations, "--memory", "256")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = _passes(proc.stdout)
    assert len(lines) == 5 and all(line.startswith("PASS") for line in lines), proc.stdout
    execution = summary["execution"]
    assert isinstance(execution, dict) and execution["deprivileged"] is True
    assert execution["by_vector"]["14"] == 4 * 64 + 1  # every round's demand faults and the one write fault
    assert execution["flushes"] > 0


def test_staletlb_fails_without_the_flush(kvm: str) -> None:
    """The check above can fail: with the flush disabled, stale translations are seen."""
    image = Path(vmikit("build", "staletlb", timeout=300).stdout.strip())
    with Session(image, paging="direct", memory_mib=256) as session:
        assert session.hypervisor is not None and session.hypervisor.execution is not None
        session.hypervisor.execution._flush = lambda stale: "none"
        result = session.run()
    fails = [line for line in _passes(result.console) if line.startswith("FAIL")]
    assert any("demand paging" in line for line in fails), result.console
    assert any("remap then read" in line for line in fails), result.console
    assert any("write-protect" in line for line in fails), result.console


def test_deprivileged_needs_a_rom(kvm: str) -> None:
    proc = vmikit("run", "hello", "--rom", "none", "--privilege", "deprivileged")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vmikit: error: a deprivileged kernel needs")
