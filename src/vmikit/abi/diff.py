"""Compare two spec versions: every change, classified by the rules in vmikit.abi.versioning.

    changes = diff_specs(load_spec(old), load_spec(new))
    report = check(old_spec, new_spec)   # changes + version-rule problems
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmikit.abi.model import Arg, Call, Family, SharedPage, Spec, Version
from vmikit.abi.versioning import RULES, Severity, bump_problems, required_bump


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # a key of RULES
    subject: str  # what changed, e.g. "MMU.SetPTE" or "annotation queue"
    detail: str

    @property
    def severity(self) -> Severity:
        return RULES[self.kind].severity

    def line(self) -> str:
        return f"{self.severity:<10}  {self.kind:<26}  {self.subject}: {self.detail}"


@dataclass
class DiffReport:
    old: Version
    new: Version
    changes: list[Change]
    problems: list[str] = field(default_factory=list)  # version-rule violations

    @property
    def bump(self) -> str:
        return required_bump({c.severity for c in self.changes})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = {s: sum(c.severity is s for c in self.changes) for s in Severity}
        parts = ", ".join(f"{counts[s]} {s}" for s in Severity)
        verdict = "OK" if self.ok else "VIOLATES THE VERSIONING RULES"
        needs = "no bump" if self.bump == "none" else f"a {self.bump} bump"
        return f"{self.old} -> {self.new}: {parts}; needs {needs}: {verdict}"


def _sig(args: tuple[Arg, ...]) -> list[str]:
    return [a.type for a in args]


def _doc(out: list[Change], subject: str, old: str, new: str, *, header: bool) -> None:
    """HEADER: the string is a comment in vmi_spec.h, so changing it changes generated code and
    is never neutral (a spec's text reached the ROM's build that way); else only the reference
    shows it."""
    if old != new:
        out.append(Change("header-doc-changed" if header else "doc-changed", subject,
                          "doc text changed" + (" (a vmi_spec.h comment)" if header else "")))


def _call_changes(out: list[Change], spec_old: Spec, old: Call, new: Call) -> None:
    subject = f"{old.qualified_name} (0x{old.call_id():08x})"
    if old.name.lower() != new.name.lower() or old.family_name.lower() != new.family_name.lower():
        out.append(Change("call-renamed", subject, f"now named {new.qualified_name}"))
    for what, a, b in (("args", old.args, new.args), ("results", old.results, new.results)):
        if _sig(a) != _sig(b):
            out.append(Change(f"{what}-changed", subject,
                              f"({', '.join(map(str, a))}) -> ({', '.join(map(str, b))})"))
        elif [x.name for x in a] != [x.name for x in b]:
            out.append(Change("arg-renamed", subject,
                              f"{what} ({', '.join(x.name for x in a)}) -> ({', '.join(x.name for x in b)})"))
    if old.optional != new.optional:
        out.append(Change("became-optional" if new.optional else "became-required", subject,
                          f"optional {str(old.optional).lower()} -> {str(new.optional).lower()}"))
    if old.user != new.user:
        out.append(Change("call-allows-user" if new.user else "call-disallows-user", subject,
                          f"user {str(old.user).lower()} -> {str(new.user).lower()}"))
    for ann in sorted(new.annotations - old.annotations):
        out.append(Change("call-accepts-annotation", subject, f"accepts `{ann}`"))
    for ann in sorted(old.annotations - new.annotations):
        out.append(Change("call-drops-annotation", subject, f"no longer accepts `{ann}`"))
    _doc(out, subject, old.doc, new.doc, header=True)


def _families(out: list[Change], old: Spec, new: Spec) -> None:
    new_by_name = {f.name.lower(): f for f in new.families.values()}
    old_by_name = {f.name.lower(): f for f in old.families.values()}
    for fid, fam in old.families.items():
        other = new.families.get(fid)
        moved = new_by_name.get(fam.name.lower())
        if moved is not None and moved.id != fid:
            out.append(Change("family-renumbered", f"family {fam.name}", f"0x{fid:02x} -> 0x{moved.id:02x}"))
        if other is None:
            if moved is None:
                out.append(Change("family-removed", f"family {fam.name} (0x{fid:02x})", "gone"))
            continue
        if other.name.lower() != fam.name.lower():
            out.append(Change("family-renamed", f"family 0x{fid:02x}", f"{fam.name} -> {other.name}"))
        if other.runtime != fam.runtime:
            out.append(Change("family-kind-changed", f"family {fam.name}", f"runtime {fam.runtime} -> {other.runtime}"))
        _doc(out, f"family {fam.name}", fam.doc, other.doc, header=False)
    for fid, fam in new.families.items():
        if fid not in old.families and fam.name.lower() not in old_by_name:
            out.append(Change("family-added", f"family {fam.name} (0x{fid:02x})",
                              f"{len(fam.calls)} call(s), since {fam.since}"))


def _calls(out: list[Change], old: Spec, new: Spec) -> None:
    old_ids = {c.call_id(): c for c in old.calls()}
    new_ids = {c.call_id(): c for c in new.calls()}
    new_names = {c.qualified_name.lower(): c for c in new.calls()}
    old_names = {c.qualified_name.lower(): c for c in old.calls()}
    for cid, call in old_ids.items():
        same = new_ids.get(cid)
        if same is not None:
            _call_changes(out, old, call, same)
            continue
        moved = new_names.get(call.qualified_name.lower())
        if moved is not None:
            out.append(Change("call-renumbered", call.qualified_name, f"0x{cid:08x} -> 0x{moved.call_id():08x}"))
        else:
            out.append(Change("call-removed", f"{call.qualified_name} (0x{cid:08x})", "gone"))
    for cid, call in new_ids.items():
        if cid in old_ids or call.qualified_name.lower() in old_names:
            continue
        kind = "optional-call-added" if call.optional else "call-added"
        out.append(Change(kind, f"{call.qualified_name} (0x{cid:08x})", f"since {call.since}"))


def _annotations(out: list[Change], old: Spec, new: Spec) -> None:
    for name, ann in old.annotations.items():
        other = new.annotations.get(name)
        if other is None:
            out.append(Change("annotation-removed", f"annotation {name}", f"bit 0x{ann.bit:02x} gone"))
            continue
        if other.bit != ann.bit:
            out.append(Change("annotation-bit-changed", f"annotation {name}", f"0x{ann.bit:02x} -> 0x{other.bit:02x}"))
        if (other.title, other.doc) != (ann.title, ann.doc):
            what = "title" if other.title != ann.title else "doc"
            out.append(Change("annotation-meaning-changed", f"annotation {name}", f"{what} changed"))
    for name, ann in new.annotations.items():
        if name not in old.annotations:
            out.append(Change("annotation-added", f"annotation {name}", f"bit 0x{ann.bit:02x}: {ann.title}"))


def _value(what: str, value: int) -> str:
    return f"{value} bits" if what == "type" else str(value) if what == "error" else f"{value:#x}"


def _named_values(out: list[Change], what: str, old: dict[str, tuple[int, str]], new: dict[str, tuple[int, str]]) -> None:
    """Errors, constants and types: name -> (value, doc)."""
    changed = "bits" if what == "type" else "value"
    for name, (value, doc) in old.items():
        if name not in new:
            out.append(Change(f"{what}-removed", f"{what} {name}", "gone"))
            continue
        if new[name][0] != value:
            out.append(Change(f"{what}-{changed}-changed", f"{what} {name}",
                              f"{_value(what, value)} -> {_value(what, new[name][0])}"))
        _doc(out, f"{what} {name}", doc, new[name][1], header=what != "type")  # error and constant docs are header comments
    for name, (value, _doc_) in new.items():
        if name not in old:
            out.append(Change(f"{what}-added", f"{what} {name}", _value(what, value)))


def _legacy(out: list[Change], old: Spec, new: Spec) -> None:
    for number in sorted(set(old.legacy) | set(new.legacy)):
        a, b = old.legacy.get(number), new.legacy.get(number)
        subject = f"legacy {number}"
        if a is None and b is not None:
            out.append(Change("legacy-added", subject, f"-> {b.qualified_name}"))
        elif a is not None and b is None:
            out.append(Change("legacy-removed", subject, f"no longer -> {a.qualified_name}"))
        elif a is not None and b is not None:
            if a.call_id() != b.call_id() or old.legacy_name(number) != new.legacy_name(number):
                out.append(Change("legacy-remapped", subject,
                                  f"{old.legacy_name(number)} -> {a.qualified_name} became "
                                  f"{new.legacy_name(number)} -> {b.qualified_name}"))
    for number in sorted(set(old.legacy_only) | set(new.legacy_only)):
        a_only, b_only = old.legacy_only.get(number), new.legacy_only.get(number)
        # A move between legacy-only and mapped is reported above.
        if number in new.legacy or number in old.legacy or a_only == b_only:
            continue
        if a_only is not None and b_only is not None and a_only.name == b_only.name:
            _doc(out, f"legacy {number}", a_only.doc, b_only.doc, header=False)  # its doc is only in the reference
            continue
        out.append(Change("legacy-only-changed", f"legacy {number}",  # its name is a VMI_LEGACY_* macro
                          "listed" if a_only is None else "dropped" if b_only is None else "renamed"))


def _shared(out: list[Change], old: SharedPage | None, new: SharedPage | None) -> None:
    if old is None and new is None:
        return
    if old is None:
        assert new is not None
        out.append(Change("shared-added", "shared page", f"{new.size} bytes, {len(new.fields)} field(s)"))
        return
    if new is None:
        out.append(Change("shared-removed", "shared page", "gone"))
        return
    if old.size != new.size:
        out.append(Change("shared-size-changed", "shared page", f"{old.size} -> {new.size} bytes"))
    _doc(out, "shared page", old.doc, new.doc, header=True)
    new_fields = {f.name: f for f in new.fields}
    old_names = {f.name for f in old.fields}
    for f in old.fields:
        subject = f"shared field {f.name}"
        other = new_fields.get(f.name)
        if other is None:
            out.append(Change("shared-field-removed", subject, f"{f.type} at offset {f.offset} gone"))
            continue
        if (f.offset, f.type) != (other.offset, other.type):
            out.append(Change("shared-field-changed", subject,
                              f"{f.type} at offset {f.offset} -> {other.type} at offset {other.offset}"))
        _doc(out, subject, f.doc, other.doc, header=True)
    for f in new.fields:
        if f.name not in old_names:
            out.append(Change("shared-field-added", f"shared field {f.name}", f"{f.type} at offset {f.offset}"))


def diff_specs(old: Spec, new: Spec) -> list[Change]:
    """Every change from OLD to NEW, in a stable order (breaking first)."""
    out: list[Change] = []
    if old.name != new.name:
        out.append(Change("interface-renamed", "interface", f"{old.name} -> {new.name}"))
    _doc(out, "interface", old.doc, new.doc, header=False)
    _named_values(out, "type", {k: (t.bits, t.doc) for k, t in old.types.items()},
                  {k: (t.bits, t.doc) for k, t in new.types.items()})
    _annotations(out, old, new)
    _named_values(out, "error", {k: (v, old.error_docs[k]) for k, v in old.errors.items()},
                  {k: (v, new.error_docs[k]) for k, v in new.errors.items()})
    _named_values(out, "constant", {k: (c.value, c.doc) for k, c in old.constants.items()},
                  {k: (c.value, c.doc) for k, c in new.constants.items()})
    ob, nb = old.batch, new.batch
    if (ob.max_entries, ob.max_args) != (nb.max_entries, nb.max_args):
        out.append(Change("batch-changed", "batch", f"{ob.max_entries} x {ob.max_args} args -> {nb.max_entries} x {nb.max_args} args"))
    _doc(out, "batch", ob.doc, nb.doc, header=False)
    _shared(out, old.shared, new.shared)
    _families(out, old, new)
    _calls(out, old, new)
    _legacy(out, old, new)
    order = list(Severity)
    return sorted(out, key=lambda c: order.index(c.severity))  # stable: within a class, spec order


def _since_problems(old: Spec, new: Spec) -> list[str]:
    """Everything added must say it is newer than OLD (its `since`, defaulting to 1.0)."""
    problems = []
    # "Added" as the diff sees it: neither the ID nor the name existed (a rename is not an addition).
    old_families = {f.name.lower() for f in old.families.values()}
    old_calls = {c.qualified_name.lower() for c in old.calls()}
    old_ids = {c.call_id() for c in old.calls()}
    fams: list[Family] = [f for f in new.families.values()
                          if f.id not in old.families and f.name.lower() not in old_families]
    calls = [c for c in new.calls() if c.call_id() not in old_ids and c.qualified_name.lower() not in old_calls]
    for subject, since in [(f"family {f.name}", f.since) for f in fams] + [(c.qualified_name, c.since) for c in calls]:
        if since <= old.version:
            problems.append(f"{subject} is new since {old.version} but says since {since}: write since = \"{new.version}\"")
    return problems


def check(old: Spec, new: Spec) -> DiffReport:
    """The changes and whether NEW's version follows the rules from OLD's."""
    changes = diff_specs(old, new)
    report = DiffReport(old.version, new.version, changes)
    report.problems = bump_problems(old.version, new.version, report.bump) + _since_problems(old, new)
    return report
