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

[constants.FLUSH_TLB]
value = 0x01
doc = "flush"
[constants.FLUSH_GLOBAL]
value = 0x02
doc = "flush global"

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
        ("max_args = 3", "max_args = 1", "max_args = 1 but the hypervisor reads entries of 3 args"),
        ('type = "u64" }]\nannotations', 'type = "u64" }, { name = "a", type = "u64" }, { name = "b", type = "u64" }]\nannotations',
         "queueable call has 4 args"),
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


# --- the `user` key (since 1.3) -----------------------------------------------------------------

def _dir(tmp_path: Path, name: str) -> Path:
    """A directory of its own: load_spec caches by path."""
    path = tmp_path / name
    path.mkdir()
    return path


def test_user_key(tmp_path: Path) -> None:
    spec = _load(tmp_path, MINIMAL.replace('doc = "set long"', 'doc = "set long"\nuser = true'))
    assert spec.by_name("MMU.SetLongPTE").user and not spec.by_name("MMU.SetPTE").user


@pytest.mark.parametrize("bad", ['"yes"', "1", "[true]"])
def test_user_must_be_a_bool(tmp_path: Path, bad: str) -> None:
    _fails(tmp_path, MINIMAL.replace('doc = "set long"', f'doc = "set long"\nuser = {bad}'),
           "call MMU.SetLongPTE", "user must be true or false")


@pytest.mark.parametrize("char", ["\\t", "\\u001b", "\\u007f"])
def test_control_characters_in_docs(tmp_path: Path, char: str) -> None:
    _fails(tmp_path, MINIMAL.replace('doc = "set long"', f'doc = "set{char}long"'), "family MMU call SetLongPTE", "doc contains the control character")


# --- [shared] (since 1.3) -----------------------------------------------------------------------

# The calls a ROM for a shared-page interface reads by name (loader.REQUIRES).
SHARED_CALLS = "".join(f'\n[[family.call]]\nnumber = {n}\nname = "{name}"\ndoc = "{name}"\n' for n, name in enumerate(
    ("EnableInterrupts", "DisableInterrupts", "GetInterruptMask", "SetInterruptMask", "GetCR2")))
SHARED = """
[[family]]
id = 0x01
name = "CPU"
doc = "cpu"
""" + SHARED_CALLS + """
[shared]
size = 4096
doc = "the shared page"

[[shared.fields]]
name = "cr2"
offset = 0
type = "u64"
doc = "cr2"

[[shared.fields]]
name = "vif"
offset = 8
type = "u32"
doc = "vif"

[[shared.fields]]
name = "pending"
offset = 24
type = "u32"
doc = "pending"

[[shared.fields]]
name = "privilege"
offset = 28
type = "u32"
doc = "privilege"
"""
REQUIRED_FIELDS = [("pending", 24), ("privilege", 28)]


def test_shared_page_is_valid(tmp_path: Path) -> None:
    assert _load(_dir(tmp_path, "without"), MINIMAL).shared is None
    page = _load(_dir(tmp_path, "with"), MINIMAL + SHARED).shared
    assert page is not None and page.size == 4096 and page.offset("vif") == 8
    assert [(f.name, f.offset, f.type, f.doc) for f in page.fields][:2] == [("cr2", 0, "u64", "cr2"), ("vif", 8, "u32", "vif")]


def test_shared_fields_in_any_order(tmp_path: Path) -> None:
    text = MINIMAL + SHARED.replace('name = "cr2"\noffset = 0', 'name = "cr2"\noffset = 16')
    page = _load(tmp_path, text).shared
    assert page is not None and [(f.name, f.offset) for f in page.fields] == [("cr2", 16), ("vif", 8), *REQUIRED_FIELDS]


def _field(name: str, offset: int, typ: str = "u32", doc: str = "x") -> str:
    return f'\n[[shared.fields]]\nname = "{name}"\noffset = {offset}\ntype = "{typ}"\ndoc = "{doc}"\n'


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        # misaligned
        (lambda t: t + _field("odd", 13), ("[shared] field odd", "offset 13 is not aligned to its u32 size (4 bytes)")),
        (lambda t: t.replace("offset = 8\ntype = \"u32\"", "offset = 4\ntype = \"u64\""),
         ("field vif", "offset 4 is not aligned to its u64 size (8 bytes)")),
        # overlapping
        (lambda t: t + _field("low", 4), ("field low", "bytes 4..7 overlap field cr2 (0..7)")),
        (lambda t: t + _field("again", 8), ("field again", "overlap field vif (8..11)")),
        # out of size
        (lambda t: t + _field("last", 4096), ("field last", "bytes 4096..4099 run past size = 4096")),
        (lambda t: t.replace("size = 4096", "size = 8"), ("field vif", "bytes 8..11 run past size = 8")),
        (lambda t: t + _field("far", 1 << 20), ("field far", "out of range")),
        # names, types, size, docs, keys
        (lambda t: t + _field("vif", 12), ("field vif", "the name is used twice")),
        (lambda t: t + _field("Big", 12), ("[shared] fields[4]", "'Big' is not a valid name")),
        (lambda t: t + _field("int", 12), ("field int", "taken by a C keyword")),
        (lambda t: t + _field("size", 12), ("field size", "taken by VMI_SHARED_SIZE")),
        (lambda t: t + _field("wide", 16, "gpa"), ("field wide", "type 'gpa' is not a shared-page type", "u32, u64")),
        (lambda t: t + _field("ctl", 12, doc="a\\u0007b"), ("shared fields ctl", "doc contains the control character")),
        (lambda t: t.replace("size = 4096", "size = 4092"), ("[shared]", "size = 4092 is not a multiple of 8")),
        (lambda t: t.replace("size = 4096", "size = true"), ("[shared]", "size must be an integer")),
        (lambda t: t.replace('doc = "the shared page"', 'doc = "the shared page"\nalign = 8'),
         ("[shared]", "unknown field 'align'")),
        (lambda t: t.replace('name = "vif"\n', ""), ("[shared] fields[1]", "missing field 'name'")),
        (lambda t: t.replace('name = "pending"', 'name = "pendin"'), ("[shared]", "needs field pending")),
        (lambda t: t.replace('name = "GetCR2"', 'name = "GetCR3"'), ("[shared] needs call CPU.GetCR2",)),
        (lambda t: t.split("[[shared.fields]]")[0], ("[shared]", "missing field 'fields'")),
        (lambda t: t.split("[[shared.fields]]")[0] + "fields = []\n", ("[shared]", "fields is empty")),
        (lambda t: "shared = 4\n" + t.split("\n[shared]")[0], ("[shared]", "expected a table")),
    ],
)
def test_bad_shared_page(tmp_path: Path, edit, needles: tuple[str, ...]) -> None:
    _fails(tmp_path, edit(MINIMAL + SHARED), *needles)
