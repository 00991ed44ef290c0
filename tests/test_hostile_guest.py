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
