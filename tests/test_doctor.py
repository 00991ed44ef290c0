"""`vmikit doctor`: KVM usable here; a missing or unreadable device is named with its fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from helpers import vmikit
from vmikit.doctor import run_checks


def test_doctor_reports_kvm_usable(kvm: str) -> None:
    proc = vmikit("doctor")
    assert proc.returncode == 0, proc.stdout
    assert "[ok  ] kvm: /dev/kvm usable, KVM API version 12" in proc.stdout
    assert "SYNC_REGS" in proc.stdout and "READONLY_MEM" in proc.stdout


def test_doctor_missing_device(tmp_path: Path) -> None:
    missing = tmp_path / "kvm"
    proc = vmikit("doctor", "--device", str(missing))
    assert proc.returncode == 3
    line = next(l for l in proc.stdout.splitlines() if l.startswith("[FAIL] kvm"))
    assert f"{missing} does not exist" in line and "fix: load the kvm module" in line


def test_doctor_unreadable_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Root ignores file modes, so the permission failure is injected at os.open.
    device = tmp_path / "kvm"
    device.write_text("")
    real_open = os.open

    def denying_open(path: str, flags: int, *args: int) -> int:
        if str(path) == str(device):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denying_open)
    kvm_check = run_checks(str(device))[0]
    assert not kvm_check.ok
    assert kvm_check.detail == f"no permission to open {device}"
    assert "add your user to the group" in kvm_check.fix


def test_doctor_rejects_a_device_that_is_not_kvm(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_text("")
    proc = vmikit("doctor", "--device", str(fake))
    assert proc.returncode == 3
    assert "does not answer KVM_GET_API_VERSION" in proc.stdout


def test_doctor_failure_ends_with_one_error_line_on_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "kvm"
    proc = vmikit("doctor", "--device", str(missing))
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith(f"vmikit: error: this host cannot run vmikit: kvm: {missing} does not exist")
    assert "; load the kvm module" in proc.stderr


def test_doctor_success_is_silent_on_stderr(kvm: str) -> None:
    proc = vmikit("doctor")
    assert proc.returncode == 0 and proc.stderr == ""
