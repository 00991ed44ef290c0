"""A broken spec file ends in one UsageError line naming the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmikit.abi.spec import load_spec, spec_path
from vmikit.errors import UsageError

MINIMAL = """
[interface]
name = "VMI"
version = { major = 1, minor = 1 }
doc = "test"

[types.u64]
bits = 64
doc = "u64"

[annotations.queue]
bit = 0x01
title = "may be queued"
doc = "q"

[errors.OK]
value = 0
doc = "ok"
[errors.NOT_SUPPORTED]
value = -1
doc = "no"

[batch]
max_entries = 32
max_args = 3
doc = "b"

[[family]]
id = 0x00
name = "Legacy"
doc = "legacy"

[[family]]
id = 0x03
name = "MMU"
doc = "mmu"

[[family.call]]
number = 0x00
name = "SetPTE"
doc = "set"
args = [{ name = "ptep", type = "u64" }, { name = "pte", type = "u64" }]
annotations = ["queue"]
legacy = 38

[[family.call]]
number = 0x01
name = "SetLongPTE"
doc = "set long"
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "vmi.toml"
    path.write_text(text)
    return load_spec(path)


def _fails(tmp_path: Path, text: str, *needles: str) -> str:
    with pytest.raises(UsageError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "vmi.toml") in message
    assert info.value.fix, "every spec error says how to fix it"
    for needle in needles:
        assert needle in message, message
    return message


def test_minimal_is_valid(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL)
    assert spec.by_name("MMU.SetPTE").legacy == 38
    assert spec.legacy[38].name == "SetPTE"


def test_invalid_toml(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL + "\nthis is = = not toml\n", "invalid TOML", "line")


def test_duplicate_call_number(tmp_path: Path) -> None:
    text = MINIMAL.replace('number = 0x01\nname = "SetLongPTE"', 'number = 0x00\nname = "SetLongPTE"')
    _fails(tmp_path, text, "MMU.SetLongPTE", "0x00", "already MMU.SetPTE")


def test_duplicate_family_id(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[family]]\nid = 0x03\nname = "MMU2"\ndoc = "x"\n'
    _fails(tmp_path, text, "family MMU2", "already family MMU")


def test_unknown_annotation(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace('["queue"]', '["qeue"]'), "MMU.SetPTE", "unknown annotation 'qeue'", "queue")


def test_unknown_type(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace('type = "u64" }]', 'type = "u65" }]'), "unknown type 'u65'")


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("number = 0x01", "number = 0x100", "number = 0x100 is out of range"),
        ("id = 0x03", "id = 256", "out of range"),
        ("legacy = 38", "legacy = 300", "legacy = 0x12c is out of range"),
        ("bit = 0x01", "bit = 0x03", "not a single bit"),
        ("value = -1", "value = 5", "out of range"),
        ("max_args = 3", "max_args = 1", "queueable call has 2 args"),
    ],
)
def test_out_of_range(tmp_path: Path, old: str, new: str, needle: str) -> None:
    _fails(tmp_path, MINIMAL.replace(old, new, 1), needle)


def test_missing_fields(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace('doc = "set long"\n', ""), "missing field 'doc'")
    _fails(tmp_path, MINIMAL.replace('name = "VMI"\n', ""), "[interface]", "missing field 'name'")
    _fails(tmp_path, MINIMAL.replace("[batch]", "[notbatch]"), "missing field 'batch'")


def test_unknown_field_is_a_typo(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace('doc = "set long"', 'doc = "set long"\noptinal = true'), "unknown field 'optinal'", "optional")


def test_duplicate_legacy_number(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL + "legacy = 38\n", "legacy = 38 is already MMU.SetPTE")
    text = MINIMAL + '\n[[legacy_only]]\nnumber = 38\nname = "SetPxE"\ndoc = "x"\n'
    _fails(tmp_path, text, "legacy number 38 is already MMU.SetPTE")


def test_legacy_family_has_no_calls(tmp_path: Path) -> None:
    text = MINIMAL.replace('doc = "legacy"\n', 'doc = "legacy"\n[[family.call]]\nnumber = 0\nname = "X"\ndoc = "x"\n')
    _fails(tmp_path, text, "legacy family lists calls")


def test_ok_must_be_zero(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace("value = 0\n", "value = -7\n"), "OK = 0 is missing")


def test_since_newer_than_version(tmp_path: Path) -> None:
    _fails(tmp_path, MINIMAL.replace('doc = "set long"', 'doc = "set long"\nsince = "1.2"'), "newer than the interface version")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_spec(tmp_path / "absent.toml")


def test_packaged_spec_passes_its_own_checks() -> None:
    assert load_spec(spec_path()).name == "VMI"
