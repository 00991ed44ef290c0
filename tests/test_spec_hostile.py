"""A spec file is hostile host input (`vmikit run --spec FILE`): the loader refuses what could
reach generated code or exhaust the host with one UsageError line, and the emitters are safe
even when handed what the loader would refuse."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import threading
import tracemalloc
from pathlib import Path

import pytest

from helpers import require
from vmikit.abi import cheader, refdoc
from vmikit.abi.diff import diff_specs
from vmikit.abi.model import BATCH_ENTRY_ARGS, Constant, Family, Spec
from vmikit.abi.spec import load_spec, spec_path
from vmikit.abi.versioning import Severity
from vmikit.errors import UsageError
from vmikit.hypervisor.eventchannel import EventChannel
from vmikit.rom import RomProfile, build_rom, generate

PACKAGED = spec_path().read_text()
SPEC = load_spec()
SETPTE_DOC = 'doc = "Write a page-table entry'  # the start of MMU.SetPTE's doc in vmi.toml
# The attack: `*\`, CR, `/` closes the C comment for gcc (CR ends a line; backslash-newline
# splices), then an assembler directive, then a comment start to swallow the real `*/`.
INCBIN = '*\\\r/ .incbin "{path}" /*'


def _write(tmp_path: Path, text: str, name: str = "vmi.toml") -> Path:
    path = tmp_path / name  # load_spec caches by path: each test has its own tmp_path
    path.write_text(text)
    return path


def _fails(tmp_path: Path, text: str, *needles: str) -> str:
    with pytest.raises(UsageError) as info:
        load_spec(_write(tmp_path, text))
    message = f"{info.value}; {info.value.fix}"
    assert re.search(r"[\x00-\x1f\x7f]", message) is None, repr(message)  # one line, no control character
    assert info.value.fix
    for needle in needles:
        assert needle in message, message
    return message


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")


# --- 1. spec text that would reach generated code -----------------------------------------------

def test_the_incbin_attack_is_refused_by_the_loader(tmp_path: Path) -> None:
    doc = _toml_escape(INCBIN.format(path="/etc/hostname"))
    assert SETPTE_DOC in PACKAGED
    _fails(_dir(tmp_path, "doc"), PACKAGED.replace(SETPTE_DOC, f'doc = "{doc}', 1),
           "family MMU call SetPTE", "doc contains the control character U+000D")
    _fails(_dir(tmp_path, "name"), PACKAGED.replace('name = "VMI"', f'name = "VMI {doc}"', 1),
           "interface", "name contains the control character U+000D")


def _dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


@pytest.mark.parametrize("char", ["\\r", "\\u2028", "\\u2029", "\\u0085", "\\u202e", "\\u200b", "\\ufeff", "\\u001b"])
def test_unsafe_characters_in_any_string(tmp_path: Path, char: str) -> None:
    _fails(tmp_path, PACKAGED.replace(SETPTE_DOC, f'doc = "x{char}', 1), "control character U+")


@pytest.mark.parametrize(("old", "new", "needle"), [
    # Table keys are names too: `$` in a name pattern let one trailing newline through.
    ("[constants.FLUSH_TLB]", '[constants."FLUSH_TLB\\n"]', "the key 'FLUSH_TLB\\n'"),
    ("[errors.OK]", '[errors."OK\\r"]', "the key 'OK\\r'"),
    ("[types.u64]", '[types."u64\\u2028"]', "the key 'u64\\u2028'"),
    ("[annotations.queue]", '[annotations."queue\\n"]', "the key 'queue\\n'"),
    # Strings the loader only compares or converts still may not hold them.
    ('since = "1.1"', 'since = "1.1\\n"', "since contains the control character U+000A"),
    # A name the pattern must match whole: no trailing newline, no other script's digits.
    ('since = "1.1"', 'since = "1.\u0661"', "is not a version"),
])
def test_names_and_keys_are_checked_whole(tmp_path: Path, old: str, new: str, needle: str) -> None:
    assert old in PACKAGED
    _fails(tmp_path, PACKAGED.replace(old, new, 1), needle)


def _with_text(spec: Spec, text: str) -> Spec:
    """SPEC with TEXT as its name and every doc the header and the ROM sources carry,
    built directly (the loader would refuse it): the emitters must not rely on the loader."""
    families: dict[int, Family] = {}
    for fid, fam in spec.families.items():
        calls = {n: dataclasses.replace(c, doc=c.doc + text) for n, c in fam.calls.items()}
        families[fid] = dataclasses.replace(fam, doc=fam.doc + text, calls=calls)
    shared = spec.shared
    if shared is not None:
        shared = dataclasses.replace(shared, doc=shared.doc + text,
                                     fields=tuple(dataclasses.replace(f, doc=f.doc + text) for f in shared.fields))
    return dataclasses.replace(
        spec, name=spec.name + text, doc=spec.doc + text, families=families, shared=shared,
        error_docs={k: v + text for k, v in spec.error_docs.items()},
        constants={k: dataclasses.replace(c, doc=c.doc + text) for k, c in spec.constants.items()},
        annotations={k: dataclasses.replace(a, title=a.title + text) for k, a in spec.annotations.items()},
        legacy={n: families[c.family].calls[c.number] for n, c in spec.legacy.items()})


def _outside_comments(text: str) -> str:
    """What gcc's preprocessor keeps of TEXT: lines spliced (CR, LF or CRLF after a backslash,
    as gcc reads them), then every /* ... */ comment replaced by a space."""
    text = re.sub(r"\\[ \t]*(\r\n|\r|\n)", "", text)
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


HOSTILE = [INCBIN.format(path="/etc/hostname"), "*/ .incbin \"/etc/hostname\"", "\n.incbin \"x\"\n",
           "\\\n*/ .incbin \"x\" /*", "\u2028.incbin\u2029", "*//*", "/*/"]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_emitters_keep_hostile_text_inside_comments(text: str) -> None:
    clean, hostile = SPEC, _with_text(SPEC, text)
    stubs = generate.plan_stubs(hostile, RomProfile.FULL, True)
    for emit in (cheader.generate, lambda s: generate.entries_asm(s, stubs, True)):
        out = emit(hostile)
        assert re.search(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]", out) is None, "only LF and tab end or space lines"
        assert "incbin" not in _outside_comments(out)
        # Outside comments, the hostile spec's output is the clean spec's, byte for byte.
        assert _outside_comments(out) == _outside_comments(emit(clean))
        for mark in ("/*", "*/"):  # no comment opened or closed that the clean output lacks
            assert out.count(mark) == emit(clean).count(mark), mark


def test_header_with_hostile_text_preprocesses_to_no_directive(tmp_path: Path) -> None:
    require(shutil.which("gcc") is not None, "gcc not installed (apt-get install gcc)")
    (tmp_path / "vmi_spec.h").write_text(cheader.generate(_with_text(SPEC, INCBIN.format(path="/etc/hostname"))))
    proc = subprocess.run(["gcc", "-E", "-P", "-x", "c", "vmi_spec.h"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "incbin" not in proc.stdout
    proc = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Werror", "-x", "c", "vmi_spec.h"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_rom_built_from_hostile_text_holds_no_host_file(tmp_path: Path) -> None:
    """The reported attack end to end, the loader bypassed: the ROM the guest reads must not
    contain a host file named in spec text."""
    require(shutil.which("gcc") is not None and shutil.which("objcopy") is not None, "gcc/objcopy not installed")
    secret = tmp_path / "secret"
    secret.write_bytes(b"HOST-SECRET-" + os.urandom(16).hex().encode())
    hostile = _with_text(SPEC, INCBIN.format(path=secret))
    image = build_rom(RomProfile.FULL, spec=hostile, cache_dir=tmp_path / "cache")
    assert b"HOST-SECRET-" not in image.data
    assert image.entries == build_rom(RomProfile.FULL, cache_dir=tmp_path / "cache").entries


def test_markdown_reference_escapes_markup() -> None:
    text = "<script>alert(1)</script> [click](javascript:alert(1)) ![i](x.png) | cell &amp; *em* _u_ ~~s~~ \\|"
    spec = _with_text(SPEC, text)
    family = next(iter(spec.families.values()))
    spec = dataclasses.replace(spec, families={**spec.families, family.id: dataclasses.replace(family, doc="# heading\r- item")})
    doc = refdoc.generate(spec)
    assert "<script" not in doc and re.search(r"(?<!\\)\]\(", doc) is None and "&amp;amp;" in doc
    assert "\\*em\\*" in doc and "\\_u\\_" in doc and "\\~\\~s\\~\\~" in doc and "\\\\\\|" in doc
    assert "\n\\# headingU+000D- item\n" in doc  # no heading, no list, no line break
    for line in doc.splitlines():
        if line.startswith("| `0x") and "click" in line:  # a call's row keeps its 8 or 9 cells
            assert len(re.findall(r"(?<!\\)\|", line)) in (9, 10), line


def test_a_changed_header_doc_is_not_neutral() -> None:
    call = SPEC.by_name("MMU.SetPTE")
    fam = SPEC.families[call.family]
    changed = dataclasses.replace(call, doc=call.doc + " .")
    new = dataclasses.replace(SPEC, families={**SPEC.families, fam.id: dataclasses.replace(
        fam, calls={**fam.calls, call.number: changed})})
    changes = diff_specs(SPEC, new)
    assert [(c.kind, c.severity) for c in changes] == [("header-doc-changed", Severity.COMPATIBLE)]
    assert cheader.generate(new) != cheader.generate(SPEC)  # why: the header did change


# --- 2. spec-driven allocations are bounded -------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "needles"), [
    ("[constants.EVTCHN_PORTS]\nvalue = 16", "[constants.EVTCHN_PORTS]\nvalue = 0xFFFFFFFFFFFFFFFF",
     ("EVTCHN_PORTS = 18446744073709551615 is outside 1..256", "use a value in 1..256")),
    ("[constants.EVTCHN_DEPTH]\nvalue = 32", "[constants.EVTCHN_DEPTH]\nvalue = 1000000",
     ("EVTCHN_DEPTH = 1000000 is outside 1..256",)),
    ("[constants.EVTCHN_DEPTH]\nvalue = 32", "[constants.EVTCHN_DEPTH]\nvalue = 0", ("outside 1..256",)),
    ("max_entries = 256", "max_entries = 1000000", ("[batch]", "max_entries = 1000000 is above the bound 1024",
                                                     "use max_entries = 1024 or less")),
    ("size = 4096", "size = 65536", ("[shared]", "size = 65536 is above the bound 4096")),
])
def test_sizes_are_bounded(tmp_path: Path, old: str, new: str, needles: tuple[str, ...]) -> None:
    assert old in PACKAGED
    _fails(tmp_path, PACKAGED.replace(old, new, 1), *needles)


def test_event_channel_allocates_nothing_per_port() -> None:
    """Even handed a port count the loader refuses, the handler's memory follows the events held."""
    huge = dataclasses.replace(SPEC, constants={**SPEC.constants, "EVTCHN_PORTS": Constant("EVTCHN_PORTS", 100_000, "x")})
    tracemalloc.start()
    try:
        channel = EventChannel(huge)
        channel.send(99_999, 7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    assert channel.poll(99_999) == (7, 0) and channel.pending(99_999) == 0 and not channel.queues


# --- 3. hostile files ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 5000 + "1" + "}" * 5000,
                                  "x = " + "9" * 5000], ids=["nested-arrays", "nested-tables", "5000-digits"])
def test_hostile_toml_is_one_line(tmp_path: Path, text: str) -> None:
    _fails(tmp_path, text, "invalid TOML")


def test_huge_file_is_refused_before_parsing(tmp_path: Path) -> None:
    _fails(tmp_path, "#" * (2 << 20) + "\n", "larger than 1 MiB")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "vmi.toml"
    os.mkfifo(fifo)

    def writer() -> None:  # blocks until someone opens the FIFO for reading
        try:
            with open(fifo, "w") as f:
                f.write(PACKAGED)
        except BrokenPipeError:
            pass  # the fixed loader never reads: the reader we open to unblock us closes at once

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(UsageError, match="is not a regular file"):
            load_spec(fifo)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        thread.join(timeout=60)


def test_a_device_is_refused() -> None:
    with pytest.raises(UsageError, match="is not a regular file"):
        load_spec(Path("/dev/zero"))


# --- 4. values the hypervisor would not honour, names it would not find -------------------------

@pytest.mark.parametrize(("old", "new", "needles"), [
    ("max_args = 3", "max_args = 4", ("max_args = 4 but the hypervisor reads entries of 3 args (32 bytes)",
                                      "write max_args = 3")),
    ("max_args = 3", "max_args = 2", ("max_args = 2 but",)),
    ("[constants.FLUSH_TLB]\nvalue = 0x01", "[constants.FLUSH_TLB]\nvalue = 0x04",
     ("FLUSH_TLB = 0x4 but the hypervisor and ROM implement 0x1",)),
    ("[constants.QUERY_SUPPORTED]\nvalue = 0x100", "[constants.QUERY_SUPPORTED]\nvalue = 0x400", ("implement 0x100",)),
    ("[constants.EVTCHN_PORTS]", "[constants.EVTCHN_PORTZ]",
     ("family EventChannel needs constant EVTCHN_PORTS, which is missing", "add [constants.EVTCHN_PORTS]")),
    ("[constants.FLUSH_GLOBAL]", "[constants.FLUSH_GLOBALS]", ("the ROM needs constant FLUSH_GLOBAL",)),
    ('name = "pending"', 'name = "pendings"', ("the shared page needs field pending",)),
    ('name = "GetCR2"', 'name = "GetCR2X"', ("[shared] needs call CPU.GetCR2",)),
])
def test_what_the_hypervisor_cannot_honour_is_refused(tmp_path: Path, old: str, new: str, needles: tuple[str, ...]) -> None:
    assert old in PACKAGED
    _fails(tmp_path, PACKAGED.replace(old, new, 1), *needles)


def test_the_batch_layout_is_the_hypervisors() -> None:
    assert SPEC.batch.max_args == BATCH_ENTRY_ARGS and SPEC.batch.entry_size == 32
