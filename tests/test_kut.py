"""The kvm-unit-tests comparison runner (vmikit kvm-unit-tests): reading a tree, the two machines'
command lines, and judging outcomes. The comparison itself runs against a built tree
(docs/kvm-unit-tests.md); here a small tree stands in for one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmikit.cli import main
from vmikit.errors import UsageError
from vmikit.kut.runner import memory_mib, qemu_command, run_case, vmikit_command
from vmikit.kut.suite import Outcome, covered, load_cases, parse_output, uniprocessor

CFG = """\
# a comment
[one]
file = one.flat

[args]
file = one.flat
test_args = 'cpuid'
qemu_params = -cpu max,+x2apic -m 2048
timeout = 90s

[two_cpus]
file = one.flat
smp = 2

[i386_only]
file = one.flat
arch = i386

[sixteen_cpus]
file = one.flat
smp = 16

[not_built]
file = missing.flat
"""


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text(CFG)
    (tmp_path / "x86" / "one.flat").write_bytes(b"\x7fELF")
    return tmp_path


def test_cases_read_from_the_tree_and_filtered_to_uniprocessor_64_bit(tree: Path) -> None:
    cases = load_cases(tree)
    assert [c.name for c in cases] == ["one", "args", "two_cpus", "i386_only", "sixteen_cpus"]  # not_built left out
    assert [c.name for c in uniprocessor(cases)] == ["one", "args"] == [c.name for c in covered(cases, "up")]
    # SMP cases up to the board's 8 vCPUs; 16 is more than the board has, i386 another build.
    assert [c.name for c in covered(cases)] == ["one", "args", "two_cpus"]
    assert [c.name for c in covered(cases, "smp")] == ["two_cpus"]
    args = cases[1]
    assert args.cmdline == "cpuid" and args.timeout == 90 and memory_mib(args) == 2048


def test_qemu_gets_qemu64_with_the_case_flags_and_vmikit_the_bare_board(tree: Path) -> None:
    args = load_cases(tree)[1]
    cmd = qemu_command(args)
    assert cmd[cmd.index("-cpu") + 1] == "qemu64,+x2apic"  # max/host fail on this host
    assert cmd.count("-m") == 1 and cmd[cmd.index("-m") + 1] == "2048"
    assert cmd[cmd.index("-append") + 1] == "cpuid" and "pc-testdev" in cmd
    assert qemu_command(load_cases(tree)[0])[-2:] == ["-cpu", "qemu64"]
    ours = vmikit_command(args, 90)
    assert ours[ours.index("--rom") + 1] == "none" and ours[ours.index("--cmdline") + 1] == "cpuid"
    two = load_cases(tree)[2]  # smp = 2: the same CPU count on both machines
    assert qemu_command(two)[qemu_command(two).index("-smp") + 1] == "2"
    assert vmikit_command(two, 90)[vmikit_command(two, 90).index("--cpus") + 1] == "2"


def test_a_tree_without_a_config_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unittests.cfg"):
        load_cases(tmp_path)
    result = CliRunner().invoke(main, ["kvm-unit-tests", str(tmp_path)])
    assert result.exit_code == 2 and "unittests.cfg" in result.output


def test_output_parsing_and_judging() -> None:
    text = "PASS: a\nFAIL: b\nSKIP: c\nPASS: d\nSUMMARY: 3 tests, 1 unexpected failures, 1 skipped\n"
    assert parse_output(text) == ("3 tests, 1 unexpected failures, 1 skipped", 2, 1, 1)
    assert parse_output("no summary here\n") == (None, 0, 0, 0)
    a = Outcome("summary", "3 tests", 3, 0, 0, 1.0, 1)
    assert a.same_result(Outcome("summary", "3 tests", 3, 0, 0, 9.0, 1))
    assert not a.same_result(Outcome("summary", "3 tests", 2, 1, 0, 1.0, 3))
    assert not a.same_result(Outcome("timeout", "no SUMMARY", 0, 0, 0, 300.0, None))
    bench = Outcome("no-summary", "ended", 0, 0, 0, 1.0, 1)
    assert bench.same_result(Outcome("no-summary", "ended", 0, 0, 0, 2.0, 1))
    assert not bench.same_result(Outcome("no-summary", "ended", 0, 0, 0, 2.0, 3))


def test_run_case_reads_a_summary_and_kills_a_machine_that_overruns() -> None:
    printer = [sys.executable, "-c", "print('PASS: x'); print('SUMMARY: 1 tests')"]
    done = run_case(printer, 30)
    assert (done.status, done.summary, done.passed, done.exit_code) == ("summary", "1 tests", 1, 0)
    stuck = run_case([sys.executable, "-c", "import time; print('PASS: x', flush=True); time.sleep(60)"], 1)
    assert stuck.status == "timeout" and stuck.exit_code is None and stuck.seconds < 30


def test_qemu_statuses_are_decoded_and_earlier_results_reused(tree: Path, tmp_path: Path) -> None:
    from vmikit.kut.runner import guest_status

    assert guest_status(1, True) == 0 and guest_status(3, True) == 1 and guest_status(2, True) == 2
    assert guest_status(3, False) == 3
    bad = tmp_path / "bad.json"
    bad.write_text('[{"test": "one", "qemu": {"status": 1}}]')
    result = CliRunner().invoke(main, ["kvm-unit-tests", str(tree), "--qemu-results", str(bad), "--test", "one",
                                       "--machine", "qemu"])
    assert result.exit_code == 2 and "cannot read QEMU results" in result.output
    good = tmp_path / "good.json"
    good.write_text('[{"test": "one", "qemu": {"status": "summary", "summary": "1 tests", "passed": 1, '
                    '"failed": 0, "skipped": 0, "seconds": 1.0, "exit_code": 0}}]')
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["kvm-unit-tests", str(tree), "--qemu-results", str(good), "--test", "one",
                                       "--machine", "qemu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert '"summary": "1 tests"' in out.read_text()  # taken from the file: one.flat is no kernel


def test_missing_qemu_is_the_one_line_host_error(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without qemu-system-x86_64 the comparison stops in one line (cause; fix), no traceback."""
    monkeypatch.setattr("vmikit.kut.runner.QEMU", "qemu-system-x86_64-absent")
    result = CliRunner().invoke(main, ["kvm-unit-tests", str(tree), "--test", "one", "--machine", "qemu"])
    assert result.exit_code == 3, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("vmikit: error: qemu-system-x86_64-absent is not installed") and "--machine vmikit" in line
    assert "Traceback" not in result.output
