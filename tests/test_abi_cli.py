"""`vmikit spec ...` through click's runner: output and one-line failures."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from vmikit.abi.cli import spec_group
from vmikit.abi.spec import spec_path


def run(*args: str):
    return CliRunner().invoke(spec_group, list(args))


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_path() -> None:
    result = run("path")
    assert result.exit_code == 0 and result.output.strip() == str(spec_path().resolve())


def test_decode_names_call_and_annotation() -> None:
    result = run("decode", "0x03000001")
    assert result.exit_code == 0
    assert result.output.strip() == "0x03000001  MMU.SetPTE  annotation 0x01 queue (may be queued)"
    assert "MMU.SetPTE" in run("decode", str(0x03000001)).output  # decimal too


def test_decode_names_oddities() -> None:
    out = run("decode", "0x03001281").output
    assert "MMU.SetPTE" in out and "reserved 0x12" in out and "RESERVED_BITS" in out
    assert "unknown bits 0x80" in out
    assert "unknown family 0x07" in run("decode", "0x07000000").output
    assert "MMU.<unknown call 0x7f>" in run("decode", "0x037f0000").output
    assert "Legacy.38 SetPxE -> MMU.SetPTE" in run("decode", "0x00260000").output
    assert "Legacy.33 IRET -> CPU.ReturnToUser" in run("decode", "0x00210000").output  # since 1.3
    assert "SYSEXIT" in run("decode", "0x00220000").output and "not supported" in run("decode", "0x00220000").output


def test_decode_bad_input() -> None:
    line = _one_line_error(run("decode", "banana"))
    assert "banana" in line and "hex" in line
    assert "32 bits" in _one_line_error(run("decode", "0x1ffffffff"))


def test_encode() -> None:
    assert run("encode", "MMU.SetPTE", "--annotation", "queue").output.strip() == "0x03000001"
    assert run("encode", "mmu.setpte", "-a", "0x01").output.strip() == "0x03000001"
    assert run("encode", "MMU.FlushTLB").output.strip() == "0x03020000"


def test_encode_unknown_name_one_line() -> None:
    line = _one_line_error(run("encode", "MMU.SetPTX"))
    assert "MMU.SetPTX" in line and "MMU.SetPTE" in line


def test_encode_annotation_not_accepted() -> None:
    line = _one_line_error(run("encode", "MMU.FlushTLB", "--annotation", "queue"))
    assert "MMU.FlushTLB" in line and "accepts: none" in line
    line = _one_line_error(run("encode", "MMU.SetPTE", "-a", "0x80"))
    assert "accepts: queue" in line
    assert "unknown annotation" in _one_line_error(run("encode", "MMU.SetPTE", "-a", "fast"))


def test_show() -> None:
    result = run("show")
    assert result.exit_code == 0
    assert "SetPTE" in result.output and "0x03000000" in result.output and "queue" in result.output
    header = next(line for line in result.output.splitlines() if "optional" in line)
    assert "user" in header.split()  # the user column
    row = next(line for line in result.output.splitlines() if "GetVersion" in line)
    assert "yes" in row.split()  # Query.GetVersion is safe from user mode (not optional)


def test_header_and_doc_to_file(tmp_path: Path) -> None:
    assert "#define VMI_CALL_MMU_SETPTE" in run("header").output
    assert run("header", "-o", str(tmp_path / "vmi_spec.h")).exit_code == 0
    assert "VMI_CALL_MMU_SETPTE" in (tmp_path / "vmi_spec.h").read_text()
    assert run("doc", "-o", str(tmp_path / "vmi.md")).exit_code == 0
    assert "# VMI 1.5" in (tmp_path / "vmi.md").read_text()
    line = _one_line_error(run("header", "-o", str(tmp_path / "missing-dir" / "x.h")))
    assert "cannot write" in line


def test_bad_spec_file_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "vmi.toml"
    bad.write_text("[interface\n")
    line = _one_line_error(run("--file", str(bad), "show"))
    assert str(bad) in line and "invalid TOML" in line


def test_through_the_main_cli() -> None:
    from helpers import vmikit

    ok = vmikit("spec", "encode", "MMU.SetPTE", "--annotation", "queue")
    assert ok.returncode == 0 and ok.stdout.strip() == "0x03000001", ok.stderr
    bad = vmikit("spec", "encode", "Nope.Call")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Nope.Call" in bad.stderr
