"""Parse and check vmi.toml. Every mistake becomes one UsageError line: file, problem, fix."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, NoReturn

from vmikit.abi.callid import FIELD_MASK
from vmikit.abi.model import (
    BATCH_ENTRY_ARGS,
    BATCH_MAX_ENTRIES,
    CONSTANT_BOUNDS,
    IMPLEMENTED_CONSTANTS,
    SHARED_MAX_SIZE,
    Annotation,
    Arg,
    Batch,
    Call,
    Constant,
    ErrorCode,
    Family,
    LegacyOnly,
    SHARED_TYPES,
    SharedField,
    SharedPage,
    Spec,
    TypeDef,
    Version,
    unsafe_char,
)
from vmikit.errors import UsageError

MAX_ARGS = 4  # argument slots a hypercall can carry in registers
MAX_RESULTS = 4  # result slots after the status
ERROR_MIN = -4095  # errors live in the top page of the u64 range, as Linux errnos do
LEGACY_FAMILY = 0x00
MAX_SPEC_BYTES = 1 << 20  # the packaged spec is ~40 KiB; a bigger file is not a spec

# What vmikit reads from a spec by name, by the feature that reads it. A spec with the feature
# but not the name would raise KeyError at run time (every EventChannel call, every ROM build),
# so the loader refuses it. Kinds: "constants", "fields" (of [shared]), "calls".
REQUIRES: dict[str, dict[str, tuple[str, ...]]] = {
    # rom/generate.py layout_header -> hcall.S's FlushTLB tail; built for every spec.
    "the ROM": {"constants": ("FLUSH_TLB", "FLUSH_GLOBAL")},
    # hypervisor/eventchannel.py sizes its ports from these.
    "family EventChannel": {"constants": ("EVTCHN_PORTS", "EVTCHN_DEPTH")},
    # rom/generate.py (the deprivileged ROM's shared-page code) and hypervisor/execution.py.
    "[shared]": {"fields": ("vif", "pending", "cr2", "privilege"),
                 "calls": ("CPU.EnableInterrupts", "CPU.DisableInterrupts", "CPU.GetInterruptMask",
                           "CPU.SetInterruptMask", "CPU.GetCR2")},
}

# Always used with fullmatch: `$` alone would let a trailing newline through.
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_UPPER = re.compile(r"[A-Z][A-Z0-9_]*")
_LOWER = re.compile(r"[a-z][a-z0-9_]*")
_SINCE = re.compile(r"([0-9]{1,5})\.([0-9]{1,5})")  # not \d: that takes any script's digits
# Names the C header cannot use as struct members or VMI_SHARED_<NAME> macros.
_C_KEYWORDS = frozenset(
    "auto break case char const continue default do double else enum extern float for goto if inline "
    "int long register restrict return short signed sizeof static struct switch typedef union unsigned "
    "void volatile while".split()
)

_Table = dict[str, Any]


class _Checker:
    """Carries the file name so every failure names it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str, fix: str) -> NoReturn:
        raise UsageError(f"bad spec file {self.path}: {where}: {problem}", fix)

    def table(self, value: Any, where: str) -> _Table:
        if not isinstance(value, dict):
            self.fail(where, f"expected a table, got {type(value).__name__}", "write it as [section] or { key = value }")
        return value

    def keys(self, table: _Table, where: str, required: set[str], optional: set[str] | None = None) -> None:
        optional = optional or set()
        missing = sorted(required - table.keys())
        if missing:
            fix = f"add a [{missing[0]}] section" if where == "top level" else f"add {missing[0]} = ..."
            self.fail(where, f"missing field {missing[0]!r}", fix)
        extra = sorted(table.keys() - required - optional)
        if extra:
            allowed = ", ".join(sorted(required | optional))
            self.fail(where, f"unknown field {extra[0]!r}", f"remove it or use one of: {allowed}")

    def int_(self, table: _Table, key: str, where: str, lo: int, hi: int) -> int:
        value = table[key]
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(where, f"{key} must be an integer, got {value!r}", f"write {key} = {lo}")
        if not lo <= value <= hi:
            self.fail(where, f"{key} = {value:#x} is out of range", f"use a value in {lo:#x}..{hi:#x}")
        return value

    def str_(self, table: _Table, key: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"{key} must be a non-empty string, got {value!r}", f'write {key} = "..."')
        if "\n" in value:
            self.fail(where, f"{key} spans several lines", "keep it to one line")
        bad = unsafe_char(value)
        if bad is not None:  # parse_spec refused these already; kept for parse_spec's callers' sake
            self.fail(where, f"{key} contains the control character U+{ord(bad):04X}", "remove it (spec text ends up in C comments and Markdown)")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(where, f"{key} {value!r} is not a valid name", f"match {pattern.pattern}")
        return value

    def bool_(self, table: _Table, key: str, where: str, default: bool = False) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.fail(where, f"{key} must be true or false, got {value!r}", f"write {key} = true")
        return value

    def list_(self, table: _Table, key: str, where: str) -> list[Any]:
        value = table.get(key, [])
        if not isinstance(value, list):
            self.fail(where, f"{key} must be an array, got {value!r}", f"write {key} = [ ... ]")
        return value

    def since(self, table: _Table, where: str, version: Version) -> Version:
        if "since" not in table:
            return Version(1, 0)
        text = table["since"]
        m = _SINCE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            self.fail(where, f"since = {text!r} is not a version", 'write since = "1.1"')
        since = Version(int(m.group(1)), int(m.group(2)))
        if since > version:
            self.fail(where, f"since {since} is newer than the interface version {version}", "raise [interface] version or lower since")
        return since


def parse_spec(text: str, path: Path) -> Spec:
    ck = _Checker(path)
    if len(text) > MAX_SPEC_BYTES:
        ck.fail("size", f"more than {MAX_SPEC_BYTES} characters", f"a spec is well under {MAX_SPEC_BYTES >> 20} MiB: pass the right file")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        ck.fail("invalid TOML", str(exc).replace("\n", " "), "fix the syntax at that line")
    except RecursionError:
        ck.fail("invalid TOML", "arrays or tables nested too deeply", "a spec nests a few levels: flatten it")
    except (ValueError, MemoryError) as exc:  # e.g. an integer past int()'s digit limit
        reason = str(exc).split(";")[0].strip() or type(exc).__name__
        ck.fail("invalid TOML", f"a value cannot be read ({reason})", "fix the value")
    _refuse_unsafe_text(ck, doc)
    ck.keys(doc, "top level", {"interface", "types", "annotations", "errors", "batch", "family"}, {"constants", "legacy_only", "shared"})

    iface = ck.table(doc["interface"], "[interface]")
    ck.keys(iface, "[interface]", {"name", "version", "doc"})
    ver = ck.table(iface["version"], "[interface] version")
    ck.keys(ver, "[interface] version", {"major", "minor"})
    version = Version(ck.int_(ver, "major", "[interface] version", 0, 0xFFFF), ck.int_(ver, "minor", "[interface] version", 0, 0xFFFF))

    types = _types(ck, ck.table(doc["types"], "[types]"))
    annotations = _annotations(ck, ck.table(doc["annotations"], "[annotations]"))
    errors = _errors(ck, ck.table(doc["errors"], "[errors]"))
    constants = _constants(ck, ck.table(doc.get("constants", {}), "[constants]"))
    batch = _batch(ck, ck.table(doc["batch"], "[batch]"))
    families = _families(ck, doc["family"], version, types, annotations, batch)
    legacy, legacy_only = _legacy(ck, families, doc.get("legacy_only", []))
    shared = _shared(ck, ck.table(doc["shared"], "[shared]")) if "shared" in doc else None
    _requires(ck, constants, families, shared)
    return Spec(
        path=path,
        name=ck.str_(iface, "name", "[interface]"),
        version=version,
        doc=ck.str_(iface, "doc", "[interface]"),
        types=types,
        annotations=annotations,
        errors={e.name: e.value for e in errors},
        error_docs={e.name: e.doc for e in errors},
        constants=constants,
        batch=batch,
        families=families,
        legacy=legacy,
        legacy_only=legacy_only,
        shared=shared,
    )


def _refuse_unsafe_text(ck: _Checker, doc: _Table) -> None:
    """Every key and string anywhere in the file, before anything reads them: spec text reaches
    C comments, assembly and Markdown, and error messages, so no control character gets in."""
    # (where, key, value); where reads like "family MMU call SetPTE" (items by their name).
    stack: list[tuple[str, str, Any]] = [("top level", "", doc)]
    while stack:  # iterative: tomllib already bounded the depth, this must not recurse either
        where, key, value = stack.pop()
        if isinstance(value, dict):
            inner = f"{where} {key}".strip() if where != "top level" else key or where
            for sub, item in value.items():
                bad = unsafe_char(sub)
                if bad is not None:
                    ck.fail(inner, f"the key {sub!r} contains the control character U+{ord(bad):04X}", "remove it")
                stack.append((inner, sub, item))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                name = item.get("name") if isinstance(item, dict) else None
                label = name if isinstance(name, str) and unsafe_char(name) is None else f"#{i + 1}"
                stack.append((where, f"{key} {label}", item))
        elif isinstance(value, str):
            bad = unsafe_char(value)
            if bad is not None:
                ck.fail(where, f"{key} contains the control character U+{ord(bad):04X}",
                        "remove it (spec text ends up in C comments, assembly and Markdown)")


def _requires(ck: _Checker, constants: dict[str, Constant], families: dict[int, Family], shared: SharedPage | None) -> None:
    """Refuse a spec with a feature (REQUIRES) but without a name vmikit reads for it."""
    present = {"the ROM"}
    present |= {f"family {f.name}" for f in families.values() if f.name.lower() == "eventchannel"}
    if shared is not None:
        present.add("[shared]")
    calls = {f"{f.name}.{c.name}".lower() for f in families.values() for c in f.calls.values()}
    for feature, needs in REQUIRES.items():
        if feature.lower() not in {p.lower() for p in present}:
            continue
        for name in needs.get("constants", ()):
            if name not in constants:
                ck.fail("[constants]", f"{feature} needs constant {name}, which is missing",
                        f"add [constants.{name}] with value = {IMPLEMENTED_CONSTANTS.get(name, CONSTANT_BOUNDS.get(name, (1,))[0])}")
        for name in needs.get("fields", ()):
            if shared is not None and all(f.name != name for f in shared.fields):
                ck.fail("[shared]", f"the shared page needs field {name}, which is missing", f"add {{ name = \"{name}\", ... }} to [shared] fields")
        for name in needs.get("calls", ()):
            if name.lower() not in calls:
                ck.fail(f"family {name.split('.')[0]}", f"{feature} needs call {name}, which is missing", f"add it, or remove {feature}")


def _types(ck: _Checker, raw: _Table) -> dict[str, TypeDef]:
    out: dict[str, TypeDef] = {}
    for name, body in raw.items():
        where = f"[types.{name}]"
        if not _LOWER.fullmatch(name):
            ck.fail(where, f"type name {name!r} is not a lower-case identifier", "rename it, e.g. u64")
        body = ck.table(body, where)
        ck.keys(body, where, {"bits", "doc"})
        bits = ck.int_(body, "bits", where, 8, 64)
        if bits not in (8, 16, 32, 64):
            ck.fail(where, f"bits = {bits} is not a register width", "use 8, 16, 32 or 64")
        out[name] = TypeDef(name, bits, ck.str_(body, "doc", where))
    return out


def _annotations(ck: _Checker, raw: _Table) -> dict[str, Annotation]:
    out: dict[str, Annotation] = {}
    used: dict[int, str] = {}
    for name, body in raw.items():
        where = f"[annotations.{name}]"
        if not _LOWER.fullmatch(name):
            ck.fail(where, f"annotation name {name!r} is not a lower-case identifier", "rename it, e.g. queue")
        body = ck.table(body, where)
        ck.keys(body, where, {"bit", "title", "doc"})
        bit = ck.int_(body, "bit", where, 1, FIELD_MASK)
        if bit & (bit - 1):
            ck.fail(where, f"bit = {bit:#04x} is not a single bit", "use one of 0x01, 0x02, 0x04 ... 0x80")
        if bit in used:
            ck.fail(where, f"bit {bit:#04x} is already used by annotation {used[bit]!r}", "give each annotation its own bit")
        used[bit] = name
        out[name] = Annotation(name, bit, ck.str_(body, "title", where), ck.str_(body, "doc", where))
    return out


def _errors(ck: _Checker, raw: _Table) -> list[ErrorCode]:
    out: list[ErrorCode] = []
    seen: dict[int, str] = {}
    for name, body in raw.items():
        where = f"[errors.{name}]"
        if not _UPPER.fullmatch(name):
            ck.fail(where, f"error name {name!r} is not an upper-case identifier", "rename it, e.g. BAD_ADDRESS")
        body = ck.table(body, where)
        ck.keys(body, where, {"value", "doc"})
        value = ck.int_(body, "value", where, ERROR_MIN, 0)
        if value in seen:
            ck.fail(where, f"value {value} is already used by {seen[value]}", "give each error its own value")
        seen[value] = name
        out.append(ErrorCode(name, value, ck.str_(body, "doc", where)))
    if seen.get(0) != "OK":
        ck.fail("[errors]", "OK = 0 is missing", "add [errors.OK] with value = 0")
    return sorted(out, key=lambda e: -e.value)


def _constants(ck: _Checker, raw: _Table) -> dict[str, Constant]:
    out: dict[str, Constant] = {}
    for name, body in raw.items():
        where = f"[constants.{name}]"
        if not _UPPER.fullmatch(name):
            ck.fail(where, f"constant name {name!r} is not an upper-case identifier", "rename it, e.g. LEVEL_PT")
        body = ck.table(body, where)
        ck.keys(body, where, {"value", "doc"})
        value = ck.int_(body, "value", where, 0, (1 << 64) - 1)
        if name in CONSTANT_BOUNDS:  # it sizes something the hypervisor allocates
            lo, hi, why = CONSTANT_BOUNDS[name]
            if not lo <= value <= hi:
                ck.fail(where, f"{name} = {value} is outside {lo}..{hi} ({why})", f"use a value in {lo}..{hi}")
        if name in IMPLEMENTED_CONSTANTS and value != IMPLEMENTED_CONSTANTS[name]:
            ck.fail(where, f"{name} = {value:#x} but the hypervisor and ROM implement {IMPLEMENTED_CONSTANTS[name]:#x}",
                    f"write value = {IMPLEMENTED_CONSTANTS[name]:#x}")
        out[name] = Constant(name, value, ck.str_(body, "doc", where))
    return out


def _batch(ck: _Checker, raw: _Table) -> Batch:
    ck.keys(raw, "[batch]", {"max_entries", "max_args", "doc"})
    max_entries = ck.int_(raw, "max_entries", "[batch]", 1, (1 << 64) - 1)
    if max_entries > BATCH_MAX_ENTRIES:  # the ROM's buffer and each flush's copy are this big
        ck.fail("[batch]", f"max_entries = {max_entries} is above the bound {BATCH_MAX_ENTRIES} (the ROM's queue buffer holds at most that)",
                f"use max_entries = {BATCH_MAX_ENTRIES} or less")
    max_args = ck.int_(raw, "max_args", "[batch]", 0, (1 << 64) - 1)
    if max_args != BATCH_ENTRY_ARGS:  # the hypervisor reads fixed 32-byte entries
        ck.fail("[batch]", f"max_args = {max_args} but the hypervisor reads entries of {BATCH_ENTRY_ARGS} args "
                f"({8 + 8 * BATCH_ENTRY_ARGS} bytes)", f"write max_args = {BATCH_ENTRY_ARGS}")
    return Batch(max_entries=max_entries, max_args=max_args, doc=ck.str_(raw, "doc", "[batch]"))


def _shared(ck: _Checker, raw: _Table) -> SharedPage:
    """[shared]: size, doc, fields = [{ name, offset, type, doc }, ...], laid out without overlap."""
    ck.keys(raw, "[shared]", {"size", "doc", "fields"})
    size = ck.int_(raw, "size", "[shared]", 8, 1 << 16)
    if size > SHARED_MAX_SIZE:  # the hypervisor maps one page at layout.SHARED_PAGE
        ck.fail("[shared]", f"size = {size} is above the bound {SHARED_MAX_SIZE} (the shared page is one page)",
                f"use size = {SHARED_MAX_SIZE} or less")
    if size % 8:
        ck.fail("[shared]", f"size = {size} is not a multiple of 8", "round it up to a multiple of 8 (4096 for a page)")
    doc = ck.str_(raw, "doc", "[shared]")
    items = ck.list_(raw, "fields", "[shared]")
    if not items:
        ck.fail("[shared]", "fields is empty", 'list at least one { name, offset, type, doc }')
    fields: list[SharedField] = []
    for i, item in enumerate(items):
        where = f"[shared] fields[{i}]"
        item = ck.table(item, where)
        ck.keys(item, where, {"name", "offset", "type", "doc"})
        name = ck.str_(item, "name", where, _LOWER)
        where = f"[shared] field {name}"
        if name in _C_KEYWORDS or name == "size":
            taken = "VMI_SHARED_SIZE" if name == "size" else "a C keyword"
            ck.fail(where, f"the name {name!r} is taken by {taken}", "rename the field")
        if any(f.name == name for f in fields):
            ck.fail(where, "the name is used twice", "give each field its own name")
        typ = ck.str_(item, "type", where)
        if typ not in SHARED_TYPES:
            ck.fail(where, f"type {typ!r} is not a shared-page type", f"use one of {', '.join(SHARED_TYPES)}")
        offset = ck.int_(item, "offset", where, 0, 1 << 16)
        field = SharedField(name, offset, typ, ck.str_(item, "doc", where))
        if offset % field.size:
            ck.fail(where, f"offset {offset} is not aligned to its {typ} size ({field.size} bytes)", f"use a multiple of {field.size}")
        if field.end > size:
            ck.fail(where, f"bytes {offset}..{field.end - 1} run past size = {size}", "move it down or raise size")
        for other in fields:
            if field.offset < other.end and other.offset < field.end:
                ck.fail(where, f"bytes {offset}..{field.end - 1} overlap field {other.name} ({other.offset}..{other.end - 1})",
                        "give each field its own bytes")
        fields.append(field)
    return SharedPage(size, doc, tuple(fields))


def _args(ck: _Checker, body: _Table, key: str, where: str, types: dict[str, TypeDef], limit: int) -> tuple[Arg, ...]:
    raw = ck.list_(body, key, where)
    if len(raw) > limit:
        ck.fail(where, f"{len(raw)} {key} exceed the {limit} register slots", f"pass at most {limit}, or pass a gpa to a structure")
    out: list[Arg] = []
    for i, item in enumerate(raw):
        w = f"{where} {key}[{i}]"
        item = ck.table(item, w)
        ck.keys(item, w, {"name", "type"})
        name, typ = ck.str_(item, "name", w, _IDENT), ck.str_(item, "type", w)
        if typ not in types:
            ck.fail(w, f"unknown type {typ!r}", f"use one of {', '.join(types)} or add [types.{typ}]")
        if any(a.name == name for a in out):
            ck.fail(w, f"duplicate name {name!r}", "give each one its own name")
        out.append(Arg(name, typ))
    return tuple(out)


def _families(
    ck: _Checker,
    raw: Any,
    version: Version,
    types: dict[str, TypeDef],
    annotations: dict[str, Annotation],
    batch: Batch,
) -> dict[int, Family]:
    if not isinstance(raw, list):
        ck.fail("[[family]]", "family must be an array of tables", "write each family as [[family]]")
    families: dict[int, Family] = {}
    names: dict[str, int] = {}
    for i, fam in enumerate(raw):
        where = f"[[family]] #{i + 1}"
        fam = ck.table(fam, where)
        ck.keys(fam, where, {"id", "name", "doc"}, {"since", "runtime", "call"})
        name = ck.str_(fam, "name", where, _IDENT)
        where = f"family {name}"
        fid = ck.int_(fam, "id", where, 0, FIELD_MASK)
        if fid in families:
            ck.fail(where, f"id {fid:#04x} is already family {families[fid].name}", "give each family its own id")
        if name.lower() in names:
            ck.fail(where, "the name is used twice (names are compared without case)", "rename one of them")
        names[name.lower()] = fid
        runtime = ck.bool_(fam, "runtime", where)
        since = ck.since(fam, where, version)
        raw_calls = ck.list_(fam, "call", where)
        if raw_calls and (fid == LEGACY_FAMILY or runtime):
            kind = "the legacy family" if fid == LEGACY_FAMILY else "a runtime family"
            fix = "set legacy = N on the family call instead" if fid == LEGACY_FAMILY else "register its calls from Python at run time"
            ck.fail(where, f"{kind} lists calls", fix)
        calls: dict[int, Call] = {}
        for j, raw_call in enumerate(raw_calls):
            call = _call(ck, raw_call, f"family {name} call #{j + 1}", fid, name, since, version, types, annotations, batch)
            if call.number in calls:
                ck.fail(f"call {call.qualified_name}", f"number {call.number:#04x} is already {calls[call.number].qualified_name}", "give each call in a family its own number")
            if any(c.name.lower() == call.name.lower() for c in calls.values()):
                ck.fail(f"call {call.qualified_name}", "the name is used twice in its family (compared without case)", "rename one of them")
            calls[call.number] = call
        families[fid] = Family(fid, name, ck.str_(fam, "doc", where), calls, since, runtime)
    if LEGACY_FAMILY not in families:
        ck.fail("[[family]]", "the Legacy family (id 0x00) is missing", 'add [[family]] id = 0x00, name = "Legacy"')
    return dict(sorted(families.items()))


def _call(
    ck: _Checker,
    raw: Any,
    where: str,
    fid: int,
    family_name: str,
    family_since: Version,
    version: Version,
    types: dict[str, TypeDef],
    annotations: dict[str, Annotation],
    batch: Batch,
) -> Call:
    body = ck.table(raw, where)
    ck.keys(body, where, {"number", "name", "doc"}, {"args", "results", "optional", "annotations", "legacy", "legacy_name", "since", "user"})
    name = ck.str_(body, "name", where, _IDENT)
    where = f"call {family_name}.{name}"
    anns = ck.list_(body, "annotations", where)
    for ann in anns:
        if ann not in annotations:
            ck.fail(where, f"unknown annotation {ann!r}", f"use one of {', '.join(annotations) or '(none defined)'} or add [annotations.{ann}]")
    args = _args(ck, body, "args", where, types, MAX_ARGS)
    # A queued call travels in a batch entry, so its args must fit one.
    if "queue" in anns and len(args) > batch.max_args:
        ck.fail(where, f"a queueable call has {len(args)} args but a batch entry holds {batch.max_args}", "raise [batch] max_args or drop `queue`")
    legacy = ck.int_(body, "legacy", where, 0, FIELD_MASK) if "legacy" in body else None
    legacy_name = ck.str_(body, "legacy_name", where, _IDENT) if "legacy_name" in body else None
    if legacy_name and legacy is None:
        ck.fail(where, "legacy_name without legacy", "add legacy = N or remove legacy_name")
    since = max(ck.since(body, where, version), family_since)
    return Call(
        family=fid,
        number=ck.int_(body, "number", where, 0, FIELD_MASK),
        name=name,
        family_name=family_name,
        doc=ck.str_(body, "doc", where),
        args=args,
        results=_args(ck, body, "results", where, types, MAX_RESULTS),
        optional=ck.bool_(body, "optional", where),
        annotations=frozenset(anns),
        legacy=legacy,
        legacy_name=legacy_name,
        since=since,
        user=ck.bool_(body, "user", where),
    )


def _legacy(ck: _Checker, families: dict[int, Family], raw: Any) -> tuple[dict[int, Call], dict[int, LegacyOnly]]:
    legacy: dict[int, Call] = {}
    for family in families.values():
        for call in family.calls.values():
            if call.legacy is None:
                continue
            if call.legacy in legacy:
                ck.fail(f"call {call.qualified_name}", f"legacy = {call.legacy} is already {legacy[call.legacy].qualified_name}", "each legacy number maps to one call")
            legacy[call.legacy] = call
    if not isinstance(raw, list):
        ck.fail("[[legacy_only]]", "legacy_only must be an array of tables", "write each entry as [[legacy_only]]")
    only: dict[int, LegacyOnly] = {}
    for i, item in enumerate(raw):
        where = f"[[legacy_only]] #{i + 1}"
        item = ck.table(item, where)
        ck.keys(item, where, {"number", "name", "doc"})
        number = ck.int_(item, "number", where, 0, FIELD_MASK)
        if number in legacy or number in only:
            other = legacy[number].qualified_name if number in legacy else only[number].name
            ck.fail(where, f"legacy number {number} is already {other}", "list each legacy number once")
        only[number] = LegacyOnly(number, ck.str_(item, "name", where, _IDENT), ck.str_(item, "doc", where))
    return dict(sorted(legacy.items())), dict(sorted(only.items()))
