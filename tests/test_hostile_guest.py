"""What a hostile guest cannot do to the VMM: grow its memory, outlive the watchdog, flood stderr
(issue 12's guest-side findings). Each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kvm")


def _run_measured(*args: str) -> tuple[int, int, str, str]:
    """(exit status, peak RSS in KiB, stdout, stderr) of the CLI in a child process. wait4 gives
    the child's own peak; the CLI's --timeout bounds the wait."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "vmikit", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return child.returncode, usage.ru_maxrss, out.read(), err.read()


def test_distinct_refused_ids_do_not_grow_the_vmm(tmp_path: Path) -> None:
    """Finding 3: 250,000 distinct unknown IDs (per-ID counters grew ~130 bytes each, some
    30 MiB here) leave the VMM's peak RSS within 16 MiB of a 1,000-ID run, and the summary
    reports them in a few buckets."""
    base_status, base_rss, _, base_err = _run_measured("run", "idflood", "--cmdline", "ids=1000",
                                                       "--timeout", "120")
    summary = tmp_path / "flood.json"
    status, rss, out, err = _run_measured("run", "idflood", "--cmdline", "ids=250000", "--timeout", "240",
                                          "--json", str(summary))
    assert base_status == 0 and status == 0, base_err + err
    assert "RESULT ids=250000 not_supported=125000 reserved_bits=125000 other=0" in out
    assert rss - base_rss < 16 * 1024, f"peak RSS grew by {(rss - base_rss) / 1024:.1f} MiB"
    by_call = json.loads(summary.read_text())["exits"]["by_call"]
    assert len(by_call) < 10, sorted(by_call)
    assert by_call["refused: unknown call IDs (NOT_SUPPORTED)"] == {"id": None, "calls": 125000, "exits": 125000}
    assert by_call["refused: reserved bits set (RESERVED_BITS)"]["calls"] == 125000


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _vm_size_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1])
    raise AssertionError("no VmSize in /proc/self/status")


class _Boom(Exception):
    pass


@pytest.mark.parametrize("failure", [BrokenPipeError, KeyboardInterrupt, _Boom])
def test_a_failing_run_releases_the_vm(failure: type[BaseException]) -> None:
    """Finding 6: an exception out of the run loop (a closed pipe, Ctrl-C, a raising handler)
    reaches the caller as itself, not as BufferError from closing the run mmap, and the VM's fds
    and guest memory are released: five such sessions leave no fd and no address space behind."""
    from vmikit.guest.build import build_guest
    from vmikit.session import Session

    image = build_guest("hello")

    def sink(data: bytes) -> None:
        raise failure("the console sink failed")

    def once() -> None:
        with pytest.raises(failure), Session(image, console=sink, memory_mib=256, paging="direct") as session:
            session.run()

    once()  # warm up: imports, caches, the first session's one-off allocations
    fds, size = _open_fds(), _vm_size_kib()
    for _ in range(5):
        once()
    assert _open_fds() == fds
    assert _vm_size_kib() - size < 64 * 1024, "guest memory (256 MiB a session) was not unmapped"


def test_a_raising_extension_is_bounded(tmp_path: Path) -> None:
    """Finding 5: a handler that raises on each of 3,000 calls gives a bounded stderr (one line
    per failure grew it without bound) and a bounded failure list, while every failure is
    counted and every call still answered."""
    extension = tmp_path / "broken.py"
    extension.write_text("@vmi.register(0x07, 'Broken')\n"
                         "def broken(ctx, a, b, c):\n"
                         "    raise RuntimeError('x' * 100000)\n")
    summary = tmp_path / "run.json"
    status, _, out, err = _run_measured("run", "experiment", "--extension", str(extension), "--cmdline",
                                        "repeat=3000", "--json", str(summary))
    assert status == 0 and "RESULT status=-3 r0=0x0 r1=0x0" in out, err[-2000:]
    assert len(err.splitlines()) <= 12 and len(err) < 8000, err[-2000:]
    assert "further hypercall handler failures are counted" in err
    data = json.loads(summary.read_text())
    assert data["handler_failures"] == 3000
    assert data["exits"]["by_call"]["Experimental.Broken"]["calls"] == 3000


def _stopped_within(args: list[str], limit: float) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with stdout a pipe nobody reads; it must end by itself within ``limit`` s."""
    child = subprocess.Popen([sys.executable, "-m", "vmikit", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        child.wait(limit)  # stdout is never read: a flooding guest fills the pipe and blocks
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"vmikit {' '.join(args)} outlived its watchdog by more than {limit} s")
    assert child.stderr is not None and child.stdout is not None
    err = child.stderr.read()
    child.stdout.close(), child.stderr.close()
    return subprocess.CompletedProcess(args, child.returncode, b"", err)


def test_the_watchdog_stops_a_guest_whose_console_nobody_reads() -> None:
    """Finding 4a: the VMM blocked writing the console of a flooding guest to a full pipe kept
    running far past --timeout; now the watchdog interrupts it (exit 5, one line)."""
    done = _stopped_within(["run", "hang", "--cmdline", "print", "--timeout", "2"], 40)
    assert done.returncode == 5, done.stderr[-2000:]
    assert b"watchdog" in done.stderr and b"Traceback" not in done.stderr


def test_the_watchdog_stops_a_handler_that_never_returns(tmp_path: Path) -> None:
    """Finding 4 (the class of 4b): a hypercall handler that does not return (an extension's
    loop; a huge allocation in Python) outlived --timeout; now a hard kick ends it."""
    extension = tmp_path / "spin.py"
    extension.write_text("@vmi.register(0x07, 'Spin')\n"
                         "def spin(ctx, a, b, c):\n"
                         "    while True:\n"
                         "        pass\n")
    done = _stopped_within(["run", "experiment", "--extension", str(extension), "--timeout", "2"], 40)
    assert done.returncode == 5, done.stderr[-2000:]
    assert b"watchdog" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["inf", "1e10", "nan", "0", "-1"])
def test_a_timeout_that_would_disarm_the_watchdog_is_refused(value: str) -> None:
    """Finding 4c: --timeout inf or 1e10 killed the watchdog thread (the guest then ran forever)
    and nan stopped at once; every such value is refused in one line, exit 2."""
    from vmikit.guest.build import build_guest
    from vmikit.errors import UsageError
    from vmikit.machine.board import Machine

    with pytest.raises(UsageError, match="--timeout"):
        Machine(build_guest("hello"), timeout=float(value))


def test_trap_audit_findings_are_bounded() -> None:
    """Finding 9: under trap paging with --audit every emulated store runs the auditor, and a
    broken invariant that every later audit reports again grew the problem list by one entry a
    store (20,001 for 20,000 stores). The list keeps the first 100; all are counted."""
    from vmikit.guest.build import build_guest
    from vmikit.machine import layout
    from vmikit.session import AUDIT_PROBLEMS_KEPT, Session

    root = layout.PT_POOL_BASE
    with Session(build_guest("hello"), paging="trap", audit=True) as session:
        session._guest_store(root, 8, 0)  # the guest's first store: a root
        session.machine.memory.write_u64(root + 8, 0x100000 | 1 | (1 << 51))  # behind the MMU's back
        for _ in range(300):
            session._guest_store(root + 16, 8, 0)
        assert len(session.audit_problems) == AUDIT_PROBLEMS_KEPT
        assert session.audit_problem_count >= 300
