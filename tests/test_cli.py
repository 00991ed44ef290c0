"""The command line a new user meets: one-line errors, output paths checked first, Ctrl-C and
broken pipes, help that says enough, a bundled extension, a safe console, a readable cache."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import vmikit
from vmikit.cli import CMDLINE_MAX_BYTES, console_sink, escape_console, main


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, which must be exactly one `vmikit: error:` line with no traceback."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmikit: error: "), proc.stderr
    return lines[0]


def _invoke(*args: str, **kw: object):
    return CliRunner().invoke(main, list(args), prog_name="vmikit", **kw)  # type: ignore[arg-type]


# 1. Output paths are checked before the work starts.

OUTPUT_OPTIONS = [
    ("run", "hello", "--json"),
    ("bench", "--quick", "--json"),
    ("bench", "--quick", "--plot"),
    ("fuzz", "--calls", "100", "--json"),
    ("compat", "--json"),
    ("spec", "header", "-o"),
]


@pytest.mark.parametrize("command", OUTPUT_OPTIONS, ids=lambda c: " ".join(c))
def test_output_into_a_missing_directory_is_refused_before_the_run(command: tuple[str, ...], tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.file"
    proc = vmikit(*command, str(target), timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc)
    assert str(target) in line and "does not exist" in line and "choose a writable path" in line
    assert proc.stdout == ""  # nothing ran: no guest output, no table


def test_output_path_that_is_a_directory_or_under_a_file(tmp_path: Path) -> None:
    proc = vmikit("run", "hello", "--json", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in _one_error_line(proc)
    plain = tmp_path / "plain"
    plain.write_text("")
    proc = vmikit("compat", "--json", str(plain / "out.json"))
    assert proc.returncode == 2 and "is not a directory" in _one_error_line(proc)


# 2. Ctrl-C and a closed stdout.

def test_ctrl_c_during_a_guest_is_one_line_and_130(kvm: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vmikit", "run", "hang", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert b"spinning forever" in proc.stdout.readline()  # the guest runs: now it spins
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode() == "vmikit: interrupted\n"


def test_a_closed_stdout_is_silence(kvm: str) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the guest prints its first line
    try:
        proc = subprocess.run([sys.executable, "-m", "vmikit", "run", "hello"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr
    assert proc.returncode == 141


def test_ctrl_c_in_bench_writes_partial_json(kvm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmikit.bench import runner

    real = runner.run_profile
    seen: list[str] = []

    def interrupted_after_the_first(image: Path, profile: object, *args: object, **kw: object) -> object:
        seen.append(profile.name)  # type: ignore[attr-defined]
        if len(seen) > 1:
            raise KeyboardInterrupt
        return real(image, profile, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run_profile", interrupted_after_the_first)
    out = tmp_path / "bench.json"
    result = _invoke("bench", "--profile", "native,direct-honour", "--workload", "null", "--calls", "200",
                     "--reps", "1", "--no-c-reference", "--no-memory", "--json", str(out))
    assert result.exit_code == 130, result.output
    assert result.stderr == "vmikit: interrupted\n"
    partial = json.loads(out.read_text())
    assert partial["partial"] is True
    assert set(partial["cells"]["null"]) == {"native"}  # what was measured before Ctrl-C


# 3. compat: progress where stderr is not a terminal; no KVM is one line and exit 3.

def test_compat_reports_progress_on_a_plain_stderr(kvm: str) -> None:
    proc = vmikit("compat", "--versions", "1.3", "--workload", "conformance")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("compat: 0/1 cells done")
    assert lines[-1].startswith("compat: 1/1 cells done") and lines[-1].endswith(" s")


def test_compat_without_kvm_is_one_line_and_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmikit.compat import cli as compat_cli

    missing = tmp_path / "kvm"
    monkeypatch.setattr(compat_cli, "KVM_DEVICE", str(missing))
    result = _invoke("compat")
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"vmikit: error: {missing} does not exist")


# 4. A cache the user cannot read or write.

def test_unreadable_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmikit.guest.build import vmi_header_dir

    monkeypatch.setenv("VMIKIT_CACHE_DIR", str(tmp_path))
    header = vmi_header_dir() / "vmi_spec.h"  # a cache that exists, made by "someone else" (root, 0600)
    real = pathlib.Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == header:  # tests run as root, who reads anything: the refusal is injected
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    result = _invoke("build", "hello")
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert result.stderr.splitlines() == [line] and line.startswith("vmikit: error: cannot use the guest cache")
    assert str(tmp_path / "guests") in line and "VMIKIT_CACHE_DIR" in line


def test_cache_under_a_file_is_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    proc = vmikit("build", "hello", env={**os.environ, "VMIKIT_CACHE_DIR": str(plain / "cache")})
    assert proc.returncode == 3
    assert "VMIKIT_CACHE_DIR" in _one_error_line(proc)


def test_cache_files_are_readable_by_all_whatever_the_umask(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "vmikit", "build", "hello"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VMIKIT_CACHE_DIR": str(cache)},
                          preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr
    entries = [cache, *cache.rglob("*")]
    files = [p for p in entries if p.is_file()]
    assert {p.name for p in files} >= {"hello.elf", "hello.json", "vmi_spec.h"}
    for path in entries:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o644 if path.is_file() else 0o755), f"{path}: {oct(mode)}"


# 5. Click's usage errors are one line; -h is help; bare vmikit is help.

@pytest.mark.parametrize("args", [
    ("run", "--rom", "bogus"), ("fuzz", "--calls", "-1"), ("run", "--memory", "abc"), ("run", "--memory", "99999"),
    ("bench", "--reps", "0"), ("spec", "decode"), ("nosuchcommand",), ("run", "--nosuchoption"),
], ids=lambda a: " ".join(a))
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    proc = vmikit(*args)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    command = " ".join(("vmikit", *(() if args[0].startswith("nosuch") else args[:2] if args[0] == "spec" else args[:1])))
    assert line.endswith(f"; see '{command} --help'"), line


@pytest.mark.parametrize("args", [("-h",), ("run", "-h"), ("bench", "-h"), ("spec", "show", "-h"), ("fuzz", "-h")])
def test_dash_h_is_help(args: tuple[str, ...]) -> None:
    proc = vmikit(*args)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: vmikit"), proc.stderr


def test_bare_vmikit_prints_help_and_succeeds() -> None:
    proc = vmikit()
    assert proc.returncode == 0 and "Commands:" in proc.stdout and proc.stderr == ""


# 6. Help that says enough.

def _commands(help_text: str) -> dict[str, str]:
    section = help_text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0]: line.split(None, 1)[1] for line in section.splitlines() if line.strip()}


@pytest.mark.parametrize("group", [(), ("spec",)])
def test_command_summaries_are_whole_sentences(group: tuple[str, ...]) -> None:
    summaries = _commands(_invoke(*group, "--help").output)
    assert len(summaries) >= 6
    for name, summary in summaries.items():
        assert summary.endswith(".") and not summary.endswith("...") and "(e.g." not in summary, (name, summary)


def test_help_lists_guests_ranges_and_exit_statuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIKIT_CACHE_DIR", str(tmp_path / "cache"))
    top = _invoke("--help").output
    run_help = _invoke("run", "--help").output
    build_help = _invoke("build", "--help").output
    flat = " ".join(run_help.split())
    for text in (top, run_help):
        assert "Exit status:" in text and "130  interrupted" in text and "5    the guest hung" in text
    for text in (run_help, build_help):
        assert "Bundled guests:" in text and "hello" in text and "conformance" in text
    assert "Guest RAM in MiB, 4 to 3072" in flat
    assert "docs/paging.md" not in flat and "shadow (the hypervisor keeps the tables the hardware walks)" in flat
    assert not (tmp_path / "cache").exists()  # listing the guests built nothing
    fuzz_help = " ".join(_invoke("fuzz", "--help").output.split())
    assert "--annotations [honour|ignore] Whether the hypervisor honours" in fuzz_help


def test_old_option_spellings_still_work(tmp_path: Path) -> None:
    from vmikit.abi.history import version_path
    from vmikit.abi.model import Version

    old = str(version_path(Version(1, 0)))
    assert _invoke("spec", "--file", old, "path").output.strip() == str(Path(old).resolve())
    assert _invoke("spec", "--spec", "1.0", "path").output.strip() == str(Path(old).resolve())
    bench_help = _invoke("bench", "--help").output
    assert "-n, --pages" in bench_help and "--paging STYLE" in bench_help
    compat_help = _invoke("compat", "--help").output
    assert "-n, --pages" in compat_help and "--workload NAME[,NAME]" in compat_help
    result = _invoke("bench", "--paging", "nosuch")
    assert result.exit_code == 2 and "unknown paging style 'nosuch'" in result.stderr


# 8. The extension example ships with the package.

def test_bundled_extension_by_name(kvm: str, tmp_path: Path) -> None:
    proc = vmikit("run", "experiment", "--extension", "muladd", cwd=tmp_path)  # no examples/ here
    assert proc.returncode == 0, proc.stderr
    assert "RESULT status=0 r0=0x2b r1=0x2a" in proc.stdout


def test_the_example_lives_in_the_package() -> None:
    from vmikit.examples import bundled_extensions

    path = bundled_extensions()["muladd"]
    assert Path(__import__("vmikit").__file__).resolve().parent in path.parents
    checkout = Path(__file__).resolve().parent.parent / "examples" / "muladd.py"
    assert checkout.resolve() == path  # one source: the checkout's examples/ points into the package
    proc = vmikit("run", "--extension", "nosuch")
    assert proc.returncode == 2 and "a bundled one: muladd" in _one_error_line(proc)


# 9. Host input: command line, timeout.

def test_non_utf8_cmdline_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "vmikit", "run", "hello", "--cmdline", b"pages=\xff"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not valid UTF-8" in _one_error_line(proc)


def test_overlong_cmdline_is_refused() -> None:
    proc = vmikit("run", "hello", "--cmdline", "é" * (CMDLINE_MAX_BYTES // 2 + 1))
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"{CMDLINE_MAX_BYTES + 1} bytes" in line and f"holds {CMDLINE_MAX_BYTES}" in line


@pytest.mark.parametrize("value", ["inf", "1e10", "nan", "0", "-1", "86401", "soon"])
@pytest.mark.parametrize("command", [("run", "hello"), ("fuzz", "--calls", "100")], ids=lambda c: c[0])
def test_timeout_must_be_finite_positive_and_at_most_a_day(command: tuple[str, ...], value: str) -> None:
    proc = vmikit(*command, "--timeout", value)
    assert proc.returncode == 2
    assert "--timeout" in _one_error_line(proc)


# 10. Terminal control sequences from a guest or a spec.

def test_escape_console_keeps_text_and_shows_controls() -> None:
    hostile = b"title\x1b]0;owned\x07 clip\x1b]52;c;aGk=\x07 clear\x1b[2J\x1bc ok\n\tnext\r\x9b\xc2\x9b\xff"
    assert escape_console(hostile) == (b"title\\x1b]0;owned\\x07 clip\\x1b]52;c;aGk=\\x07 clear\\x1b[2J\\x1bc ok\n"
                                       b"\tnext\\x0d\\x9b\\xc2\\x9b\\xff")
    assert escape_console(b"PASS: plain text\n") == b"PASS: plain text\n"


class _Stdout:
    def __init__(self, tty: bool) -> None:
        import io

        self.buffer = io.BytesIO()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, raw, escaped", [(True, False, True), (True, True, False), (False, False, False)])
def test_console_sink_escapes_only_a_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool, raw: bool,
                                              escaped: bool) -> None:
    out = _Stdout(tty)
    monkeypatch.setattr(sys, "stdout", out)
    console_sink(raw)(b"a\x1b]52;c;x\x07\n")
    assert out.buffer.getvalue() == (b"a\\x1b]52;c;x\\x07\n" if escaped else b"a\x1b]52;c;x\x07\n")


def test_a_pipe_gets_the_guest_console_bytes_unchanged(kvm: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vmikit", "run", "hello"], capture_output=True, timeout=120)
    assert proc.returncode == 0
    assert b"PASS" in proc.stdout and b"\\x" not in proc.stdout


def test_spec_show_prints_spec_strings_as_text(tmp_path: Path) -> None:
    from vmikit.abi.spec import spec_path

    text = spec_path().read_text()
    assert '\nname = "VMI"\n' in text
    spec = tmp_path / "vmi.toml"
    spec.write_text(text.replace('\nname = "VMI"\n', '\nname = "[bold red]VMI[/bold red]"\n', 1))
    result = _invoke("spec", "--file", str(spec), "show")
    assert result.exit_code == 0, result.output
    assert "[bold red]VMI[/bold red]" in result.stdout
