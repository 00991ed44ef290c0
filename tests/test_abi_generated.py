"""The generated C header and reference doc agree with the spec (and the header compiles)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import require
from vmikit.abi import cheader, refdoc
from vmikit.abi.spec import load_spec

_DEFINE = re.compile(r"^#define\s+(VMI_\w+)\s+(\(-?\d+\)|0x[0-9a-fA-F]+u?|\d+)(?:\s|$)")


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def header(spec) -> str:
    return cheader.generate(spec)


def _defines(header: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in header.splitlines():
        m = _DEFINE.match(line)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} defined twice"
            out[m.group(1)] = int(m.group(2).strip("()").rstrip("u"), 0)
    return out


def _gcc() -> str:
    path = shutil.which("gcc")
    require(path is not None, "gcc not installed (apt-get install gcc)")
    assert path is not None
    return path


def test_deterministic(spec, header: str) -> None:
    assert cheader.generate(spec) == header
    assert refdoc.generate(spec) == refdoc.generate(spec)


def test_header_says_generated(header: str) -> None:
    assert "#ifndef VMIKIT_VMI_SPEC_H" in header and header.rstrip().endswith("#endif /* VMIKIT_VMI_SPEC_H */")
    assert "vmikit spec header" in header and "DO NOT EDIT" in header


def test_header_agrees_with_spec(spec, header: str) -> None:
    d = _defines(header)
    assert d["VMI_VERSION_MAJOR"] == spec.version.major and d["VMI_VERSION_MINOR"] == spec.version.minor
    assert d["VMI_VERSION"] == spec.version.packed
    assert d["VMI_CALL_COUNT"] == len(list(spec.calls()))
    for family in spec.families.values():
        assert d[cheader.family_macro(family)] == family.id
    for call in spec.calls():
        suffix = f"{call.family_name.upper()}_{call.name.upper()}"
        assert d[cheader.call_macro(call)] == call.call_id()
        assert d[f"VMI_OPTIONAL_{suffix}"] == int(call.optional)
        assert d[f"VMI_ANNMASK_{suffix}"] == spec.annotation_mask(call)
        assert d[f"VMI_NARGS_{suffix}"] == len(call.args)
    for ann in spec.annotations.values():
        assert d[f"VMI_ANN_{ann.name.upper()}"] == ann.bit
    for name, value in spec.errors.items():
        assert d[f"VMI_ERR_{name}"] == value
    for number in set(spec.legacy) | set(spec.legacy_only):
        assert d[f"VMI_LEGACY_{spec.legacy_name(number).upper()}"] == number
    assert d["VMI_LEGACY_SETPXE"] == 38 and d["VMI_CALL_MMU_SETPTE"] == 0x03000000
    assert d["VMI_BATCH_ENTRY_SIZE"] == spec.batch.entry_size


@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_header_compiles_and_macros_evaluate(spec, header: str, tmp_path: Path, arch: str) -> None:
    gcc = _gcc()
    (tmp_path / "vmi_spec.h").write_text(header)
    # The compiler, not our parser, evaluates the macros here.
    checks = ['#include "vmi_spec.h"',
              "_Static_assert(VMI_CALLID(3, 0, VMI_ANN_QUEUE) == 0x03000001u, \"VMI_CALLID\");",
              "_Static_assert(VMI_CALLID_FAMILY(0x03020001u) == 3 && VMI_CALLID_CALL(0x03020001u) == 2, \"fields\");",
              "_Static_assert(VMI_CALLID_RESERVED(0x0300ab00u) == 0xab && VMI_CALLID_ANNOTATION(0x030000cdu) == 0xcd, \"fields\");"]
    for call in spec.calls():
        checks.append(f"_Static_assert({cheader.call_macro(call)} == VMI_CALLID({call.family}, {call.number}, 0), \"{call}\");")
    for name, value in spec.errors.items():
        checks.append(f"_Static_assert(VMI_ERR_{name} == {value}, \"{name}\");")
    (tmp_path / "check.c").write_text("\n".join(checks) + "\n")
    for source in ("vmi_spec.h", "check.c"):
        lang = "c-header" if source.endswith(".h") else "c"
        proc = subprocess.run([gcc, arch, "-std=c11", "-ffreestanding", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                               "-x", lang, source], cwd=tmp_path, capture_output=True, text=True)
        if proc.returncode and "-m32" in arch and "bits/" in proc.stderr:
            pytest.skip("no 32-bit gcc support")
        assert proc.returncode == 0, proc.stderr
    # Assembly can include it too (the struct is hidden from it).
    (tmp_path / "a.S").write_text('#include "vmi_spec.h"\nmov $VMI_CALL_MMU_SETPTE, %eax\n')
    proc = subprocess.run([gcc, arch, "-c", "a.S", "-o", "a.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_refdoc_covers_everything(spec) -> None:
    doc = refdoc.generate(spec)
    assert "31--------24-23---------16-15--------8-7-----------0" in doc
    assert "## Versioning" in doc and f"0x{spec.version.packed:08x}" in doc
    for call in spec.calls():
        assert f"`0x{call.call_id():08x}` | {call.name} |" in doc
    for name in spec.errors:
        assert f"`{name}`" in doc
    for number in spec.legacy_only:
        assert f"| {number} | {spec.legacy_only[number].name} |" in doc
    assert "| 38 | SetPxE | MMU.SetPTE |" in doc
