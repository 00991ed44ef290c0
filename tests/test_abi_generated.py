"""The generated C header and reference doc agree with the spec (and the header compiles)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import require
from vmikit.abi import cheader, refdoc
from vmikit.abi.history import available_versions
from vmikit.abi.model import SharedField, SharedPage, Spec, Version
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
    for call in spec.calls():  # defined (1) for user-safe calls only, so #ifdef works
        assert d.get(f"{cheader.call_macro(call)}_USER") == (1 if call.user else None), call
    assert d["VMI_CALL_QUERY_GETVERSION_USER"] == 1 and "VMI_CALL_CPU_SETCR3_USER" not in d
    assert spec.shared is not None and d["VMI_SHARED_SIZE"] == spec.shared.size == 4096
    for f in spec.shared.fields:
        assert d[f"VMI_SHARED_{f.name.upper()}"] == f.offset
    assert d["VMI_SHARED_VIF"] == 8 and d["VMI_SHARED_EXCEPTIONS"] == 40
    assert d["VMI_PRIVILEGE_RING0"] == 0 and d["VMI_PRIVILEGE_DEPRIVILEGED"] == 3


@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_header_compiles_and_macros_evaluate(spec, header: str, tmp_path: Path, arch: str) -> None:
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
    for call in spec.calls():
        macro = f"{cheader.call_macro(call)}_USER"
        checks += [f"#if {'!' if call.user else ''}defined({macro})", f"#error {macro}", "#endif"]
    checks += _shared_checks(spec)
    (tmp_path / "check.c").write_text("\n".join(checks) + "\n")
    _compile(tmp_path, arch, "vmi_spec.h", "check.c")
    # Assembly can include it too (the structs are hidden from it) and use the offsets.
    (tmp_path / "a.S").write_text('#include "vmi_spec.h"\nmov $VMI_CALL_MMU_SETPTE, %eax\n'
                                  "movl VMI_SHARED_VIF(%eax), %ecx\n")
    proc = subprocess.run([_gcc(), arch, "-c", "a.S", "-o", "a.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _compile(where: Path, arch: str, *sources: str) -> None:
    for source in sources:
        lang = "c-header" if source.endswith(".h") else "c"
        proc = subprocess.run([_gcc(), arch, "-std=c11", "-ffreestanding", "-Wall", "-Wextra", "-Werror", "-pedantic",
                               "-fsyntax-only", "-x", lang, source], cwd=where, capture_output=True, text=True)
        if proc.returncode and "-m32" in arch and "bits/" in proc.stderr:
            pytest.skip("no 32-bit gcc support")
        assert proc.returncode == 0, proc.stderr


def _shared_checks(spec: Spec) -> list[str]:
    """struct vmi_shared as the spec lays it out, checked by the compiler with the spec's numbers."""
    assert spec.shared is not None
    out = ['#include <stddef.h>', '#include "vmi_spec.h"',
           f"_Static_assert(sizeof(struct vmi_shared) == {spec.shared.size}, \"size\");"]
    for f in spec.shared.fields:
        out += [f"_Static_assert(offsetof(struct vmi_shared, {f.name}) == {f.offset}, \"{f.name}\");",
                f"_Static_assert(sizeof(((struct vmi_shared *)0)->{f.name}) == {f.size}, \"{f.name} size\");"]
    return out


@pytest.mark.parametrize("arch", ["-m64", "-m32"])
def test_shared_struct_with_gaps(tmp_path: Path, arch: str) -> None:
    """Explicit padding puts every field at its offset, also where the ABI would align differently
    (a u64 after a u32 hole; -m32 aligns u64 to 4 in structs)."""
    layout = [("a", 4, "u32"), ("b", 8, "u64"), ("c", 20, "u32"), ("d", 24, "u32"), ("e", 4000, "u64")]
    fields = tuple(SharedField(n, o, t, n) for n, o, t in reversed(layout))  # any order: sorted by offset
    spec = dataclasses.replace(load_spec(), shared=SharedPage(4096, "gaps", fields))
    header = cheader.generate(spec)
    assert "\tunsigned char _pad0[4];" in header and "\tunsigned char _pad16[4];" in header
    assert "\tunsigned char _pad28[3972];" in header and "\tunsigned char _pad4008[88];" in header
    (tmp_path / "vmi_spec.h").write_text(header)
    (tmp_path / "check.c").write_text("\n".join(_shared_checks(spec)) + "\n")
    _compile(tmp_path, arch, "vmi_spec.h", "check.c")


@pytest.mark.parametrize("version", list(available_versions()), ids=str)
def test_every_fixture_header_compiles(tmp_path: Path, version: Version) -> None:
    spec = load_spec(available_versions()[version])
    header = cheader.generate(spec)
    assert ("struct vmi_shared" in header) == (spec.shared is not None)
    assert ("_USER " in header) == any(c.user for c in spec.calls())
    (tmp_path / "vmi_spec.h").write_text(header)
    _compile(tmp_path, "-m64", "vmi_spec.h")


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
    assert "| 33 | IRET | CPU.ReturnToUser |" in doc


def test_refdoc_shared_page_and_user(spec) -> None:
    doc = refdoc.generate(spec)
    assert "## Shared page" in doc and "| offset | field | type | meaning |" in doc
    for f in spec.shared.fields:
        assert f"| {f.offset} | `{f.name}` | `{f.type}` |" in doc
    assert "| ID | call | args | result | optional | user | annotations | legacy | doc |" in doc
    assert "| `0x04000000` | GetVersion | — | status; `u32 version` | no | yes |" in doc
    assert "| `0x01090000` | SetCR3 | `gpa root` | status | no | no |" in doc
    assert "answers `PERMISSION`" in doc


def test_refdoc_without_shared_page_or_user_calls() -> None:
    doc = refdoc.generate(load_spec(available_versions()[Version(1, 2)]))
    assert "## Shared page" not in doc and "| optional | annotations |" in doc and "| user |" not in doc
