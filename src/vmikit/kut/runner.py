"""One case, two machines: QEMU with KVM (the suite's own reference flags) and vmikit's bare board.

The QEMU flags are those of the suite's ``x86/run`` for a uniprocessor test, with ``-cpu qemu64``
in place of ``max``/``host`` (which this host's KVM refuses) and the case's own CPU flags kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from vmikit.errors import HostError
from vmikit.kut.suite import Case, Outcome, parse_output
from vmikit.machine import layout

QEMU = "qemu-system-x86_64"
QEMU_BASE = ("-nodefaults", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
             "-display", "none", "-serial", "stdio", "-machine", "accel=kvm", "--no-reboot",
             "-global", "kvm-pit.lost_tick_policy=discard")
OUTPUT_LIMIT = 8 << 20  # a test that floods its console is cut here, not held in memory


def _qemu_params(params: Sequence[str]) -> list[str]:
    """The case's QEMU parameters with its CPU model replaced by qemu64 (flags after the model kept)."""
    out: list[str] = []
    items = list(params)
    has_cpu = False
    while items:
        item = items.pop(0)
        if item == "-cpu" and items:
            model, _, flags = items.pop(0).partition(",")
            out += ["-cpu", "qemu64" + ("," + flags if flags else "")]
            has_cpu = True
        else:
            out.append(item)
    return out if has_cpu else ["-cpu", "qemu64", *out]


def memory_mib(case: Case) -> int:
    """The case's RAM (QEMU's -m, default 128 MiB), at most the board's MAX_MEMORY_MIB (both machines get it)."""
    return min(_memory_mib(case), layout.MAX_MEMORY_MIB)


def _memory_mib(case: Case) -> int:
    params = list(case.qemu_params)
    for i, item in enumerate(params[:-1]):
        if item == "-m":
            size = params[i + 1].upper().rstrip("M")
            if size.endswith("G") and size[:-1].isdigit():
                return int(size[:-1]) * 1024
            if size.isdigit():
                return int(size)
    return 128


def qemu_command(case: Case) -> list[str]:
    cmd = [QEMU, *QEMU_BASE, "-m", str(memory_mib(case)), "-smp", str(case.smp), "-kernel", str(case.image)]
    cmd += [p for p in _qemu_params(case.qemu_params) if p]
    if case.test_args:
        cmd += ["-append", case.cmdline]
    return _dedupe_memory(cmd)


def _dedupe_memory(cmd: list[str]) -> list[str]:
    """Keep one -m (the case's own, parsed into memory_mib already)."""
    out: list[str] = []
    seen = False
    i = 0
    while i < len(cmd):
        if cmd[i] == "-m" and i + 1 < len(cmd):
            if not seen:
                out += cmd[i:i + 2]
                seen = True
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    return out


# What the board's devices are, as QEMU options: the intel-iommu always remaps interrupts, never in
# x2APIC mode; another option of a -device means a device the board does not have, left out.
DEVICE_OPTIONS = {"edu": set[str](), "intel-iommu": {"intremap=on", "eim=off"}}


def vmikit_devices(params: Sequence[str]) -> list[str]:
    """The case's ``-device`` options the board has, as ``--device`` values (other parameters: as before)."""
    items = list(params)
    devices = []
    for item, value in zip(items, items[1:]):
        if item == "-device":
            name, *options = value.split(",")
            if name in DEVICE_OPTIONS and set(options) <= DEVICE_OPTIONS[name]:
                devices.append(name)
    return devices


def vmikit_command(case: Case, timeout: float) -> list[str]:
    cmd = [sys.executable, "-m", "vmikit", "run", str(case.image), "--rom", "none", "--paging", "native",
           "--memory", str(memory_mib(case)), "--cpus", str(case.smp), "--timeout", f"{timeout:g}"]
    for device in vmikit_devices(case.qemu_params):
        cmd += ["--device", device]
    if case.test_args:
        cmd += ["--cmdline", case.cmdline]
    return cmd


def run_case(cmd: list[str], timeout: float, debug_exit: bool = False) -> Outcome:
    """Run one machine to its end (or kill it after ``timeout`` s) and read its SUMMARY.
    ``debug_exit``: the status is QEMU's, ``(code << 1) | 1`` for the guest's exit code."""
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except FileNotFoundError:
        # Only QEMU can be missing (vmikit's side is this Python): the one-line error, not a traceback.
        raise HostError(f"{cmd[0]} is not installed (kvm-unit-tests runs each case on QEMU too)",
                        "install it (apt-get install qemu-system-x86), or run vmikit alone with --machine vmikit, "
                        "or reuse earlier QEMU outcomes with --qemu-results FILE") from None
    timed_out = False
    try:
        data, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        data, _ = proc.communicate()
    seconds = time.monotonic() - start
    text = data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    summary, passed, failed, skipped = parse_output(text)
    if summary is not None:
        status = "summary"
    elif timed_out:
        status, summary = "timeout", f"no SUMMARY within {timeout:g} s"
    elif "vmikit: error:" in text:
        status = "crash"
        summary = next(line for line in text.splitlines() if line.startswith("vmikit: error:"))
    else:
        status, summary = "no-summary", f"ended (status {proc.returncode}) without a SUMMARY"
    return Outcome(status=status, summary=summary, passed=passed, failed=failed, skipped=skipped,
                   seconds=round(seconds, 1), exit_code=None if timed_out else guest_status(proc.returncode, debug_exit))


def guest_status(returncode: int, debug_exit: bool) -> int:
    """The guest's own exit code: QEMU's isa-debug-exit makes it ``(code << 1) | 1``."""
    return returncode >> 1 if debug_exit and returncode > 0 and returncode & 1 else returncode
