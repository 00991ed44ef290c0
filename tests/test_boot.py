"""Real guests on real KVM: the hello guest, and every way a guest can fail."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import vmikit
from vmikit.guest.build import build_guest
from vmikit.machine.board import Machine
from vmikit.session import Session

PASS_RE = re.compile(r"^(PASS|FAIL): ", re.M)


def pass_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if PASS_RE.match(line)]


def test_hello_boots_on_kvm(kvm: str) -> None:
    with Machine(build_guest("hello"), memory_mib=64, timeout=30) as machine:
        result = machine.run()
    lines = pass_lines(result.console)
    assert result.exit_status == 0, result.console
    assert "vmikit hello guest" in result.console
    assert len(lines) >= 4 and all(line.startswith("PASS: ") for line in lines), result.console
    assert "DONE pass=" in result.console
    assert result.exits_by_reason["io"] >= len(result.console)  # one exit per console byte, at least


def test_cli_run_streams_console_and_writes_json(kvm: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    proc = vmikit("run", "hello", "--stats", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "PASS: " in proc.stdout and "FAIL: " not in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["exit_status"] == 0
    assert summary["exits"]["total"] == sum(summary["exits"]["by_reason"].values()) > 0
    assert "io" in summary["exits"]["by_reason"]
    assert "io" in proc.stderr  # --stats table


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vmikit: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_triple_fault(kvm: str) -> None:
    proc = vmikit("run", "triplefault", "--timeout", "20")
    assert proc.returncode == 4
    assert "triple fault" in _one_line_error(proc)
    assert "rip=" in proc.stderr and "cr0=" in proc.stderr  # register dump


def test_divide_by_zero(kvm: str) -> None:
    proc = vmikit("run", "divzero", "--timeout", "20")
    assert proc.returncode == 4
    line = _one_line_error(proc)
    assert "#DE divide error" in line and "rip 0x" in line
    assert "EXCEPTION: vector 0" in proc.stdout  # the guest's own report
    assert "rip=" in proc.stderr


def test_hang_stopped_by_watchdog(kvm: str) -> None:
    proc = vmikit("run", "hang", "--timeout", "1", timeout=30)
    assert proc.returncode == 5
    assert "watchdog" in _one_line_error(proc)
    assert "rip=" in proc.stderr


def test_truncated_elf(tmp_path: Path) -> None:
    image = build_guest("hello").read_bytes()
    bad = tmp_path / "truncated.elf"
    bad.write_bytes(image[: len(image) // 2])
    proc = vmikit("run", str(bad))
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "truncated" in line


def test_non_multiboot_elf() -> None:
    proc = vmikit("run", "/bin/true")
    assert proc.returncode == 2
    assert "not a multiboot kernel" in _one_line_error(proc)


def test_not_an_elf(tmp_path: Path) -> None:
    bad = tmp_path / "junk.elf"
    bad.write_bytes(b"hello world" * 100)
    proc = vmikit("run", str(bad))
    assert proc.returncode == 2
    assert "not an ELF file" in _one_line_error(proc)


def test_unknown_guest_name() -> None:
    proc = vmikit("run", "no-such-guest")
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "unknown guest 'no-such-guest'" in line and "hello" in line


@pytest.mark.parametrize("memory", ["1", "100000"])
def test_memory_out_of_range(kvm: str, memory: str) -> None:
    proc = vmikit("run", "hello", "--memory", memory)
    assert proc.returncode == 2
    assert "--memory" in _one_line_error(proc)


def run_qemu(qemu: str, image: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The same ELF on QEMU as the bare machine (KVM acceleration when available, else TCG)."""
    return subprocess.run(
        [qemu, "-kernel", str(image), "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
         "-display", "none", "-no-reboot", "-m", "128", "-accel", "kvm", "-accel", "tcg"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_hello_same_pass_lines_on_qemu(kvm: str, qemu: str) -> None:
    image = build_guest("hello")
    bare = run_qemu(qemu, image)
    assert bare.returncode == (0 << 1) | 1, bare.stderr  # isa-debug-exit: (code << 1) | 1
    with Machine(image, memory_mib=128, timeout=30) as machine:
        ours = machine.run()
    assert pass_lines(bare.stdout) == pass_lines(ours.console)
    assert len(pass_lines(ours.console)) >= 4


# Under the hypervisor: every ROM profile with the kernel deprivileged (ring 3, the default) and at
# ring 0; the PASS lines are those of the bare machine (--rom none), which QEMU's match above.
HELLO_CONFIGS = [(rom, privilege) for rom in ("full", "minimal") for privilege in ("deprivileged", "ring0")]


@pytest.fixture(scope="module")
def hello_bare(kvm: str) -> list[str]:
    with Session(build_guest("hello"), rom="none") as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    return pass_lines(result.console)


@pytest.mark.parametrize("rom,privilege", HELLO_CONFIGS, ids=[f"{r}-{p}" for r, p in HELLO_CONFIGS])
def test_hello_same_pass_lines_under_every_rom_and_privilege(hello_bare: list[str], rom: str, privilege: str) -> None:
    with Session(build_guest("hello"), rom=rom, privilege=privilege) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    assert pass_lines(result.console) == hello_bare and len(hello_bare) >= 4
    assert result.execution is not None and result.execution["deprivileged"] == (privilege == "deprivileged")
