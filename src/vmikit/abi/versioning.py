"""The versioning rules of the interface, as data: what each kind of change between two spec
versions is, and which version bump it needs. `vmikit spec diff` enforces them and the
generated reference prints them (one table, so the two cannot drift apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vmikit.abi.model import Version


class Severity(str, Enum):
    """What a change does to binaries built for the other version."""

    BREAKING = "breaking"  # an old guest or ROM can misbehave: needs a major bump
    COMPATIBLE = "compatible"  # additive: old binaries run unchanged; needs a minor bump
    NEUTRAL = "neutral"  # wording only: no binary, ROM source or header changes; no bump needed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str
    severity: Severity
    what: str


_B, _C, _N = Severity.BREAKING, Severity.COMPATIBLE, Severity.NEUTRAL

# Every kind `vmikit spec diff` reports, in the order the reference lists them.
RULES: dict[str, Rule] = {r.kind: r for r in (
    Rule("family-added", _C, "a new family (new ID); old guests never call it, new guests check Query.HasFamily"),
    Rule("call-added", _C, "a new call in an existing family; new guests check Query.QueryCall or fall back"),
    Rule("optional-call-added", _C, "a new optional call: neither side must implement it"),
    Rule("annotation-added", _C, "a new annotation bit; hypervisors that do not know it ignore it"),
    Rule("call-accepts-annotation", _C, "an existing call accepts an existing annotation (a hint old hypervisors ignore)"),
    Rule("error-added", _C, "a new error code (returned only by new calls or for newly defined cases)"),
    Rule("constant-added", _C, "a new constant"),
    Rule("type-added", _C, "a new argument/result type"),
    Rule("legacy-added", _C, "a legacy VMI 3.0 number that answered NOT_SUPPORTED now maps onto a call"),
    Rule("call-allows-user", _C, "an existing call became safe from guest user mode (`user = true`): it answered PERMISSION there before"),
    Rule("shared-added", _C, "a shared page ([shared]) is defined where there was none"),
    Rule("shared-field-added", _C, "a new field in bytes of the shared page no field used (old guests and hypervisors ignore them)"),
    Rule("header-doc-changed", _C, "the wording of a doc string the C header carries as a comment (a call's, an error's, "
         "a constant's, the shared page's or a field's): generated code changes, binaries do not"),
    Rule("legacy-only-changed", _C, "a legacy-only number listed, dropped or renamed: the header's VMI_LEGACY_* macros "
         "change (the number answers NOT_SUPPORTED either way)"),
    Rule("doc-changed", _N, "the wording of a doc string only the reference shows (the interface's, a family's, a type's, "
         "the batch's, a legacy-only number's; not an annotation's: its doc is its meaning)"),
    Rule("arg-renamed", _N, "an argument or result renamed, same slot and type (names are documentation)"),
    Rule("interface-renamed", _B, "the interface name changed"),
    Rule("family-removed", _B, "a family disappeared"),
    Rule("family-renumbered", _B, "a family kept its name but got another ID"),
    Rule("family-renamed", _B, "a family ID got another name (the header's VMI_FAMILY_* macro changes)"),
    Rule("family-kind-changed", _B, "a family became run-time (Experimental-style) or stopped being one"),
    Rule("call-removed", _B, "a call disappeared"),
    Rule("call-renumbered", _B, "a call kept its name but got another ID"),
    Rule("call-renamed", _B, "a call ID got another name (the header's VMI_CALL_* macro changes)"),
    Rule("args-changed", _B, "a call's arguments changed in number or type"),
    Rule("results-changed", _B, "a call's results changed in number or type"),
    Rule("became-required", _B, "an optional call became required: old hypervisors may not implement it"),
    Rule("became-optional", _B, "a required call became optional: old guests count on it"),
    Rule("annotation-removed", _B, "an annotation disappeared"),
    Rule("annotation-bit-changed", _B, "an annotation moved to another bit"),
    Rule("annotation-meaning-changed", _B, "an annotation's title or doc changed: same bit, another meaning"),
    Rule("call-drops-annotation", _B, "a call no longer accepts an annotation it accepted"),
    Rule("error-removed", _B, "an error code disappeared"),
    Rule("error-value-changed", _B, "an error code got another value"),
    Rule("constant-removed", _B, "a constant disappeared"),
    Rule("constant-value-changed", _B, "a constant got another value"),
    Rule("type-removed", _B, "a type disappeared"),
    Rule("type-bits-changed", _B, "a type got another width"),
    Rule("batch-changed", _B, "the FlushQueue buffer layout or capacity changed"),
    Rule("legacy-removed", _B, "a legacy number no longer maps onto a call"),
    Rule("legacy-remapped", _B, "a legacy number maps onto another call or has another name"),
    Rule("call-disallows-user", _B, "a call stopped being safe from guest user mode: user code that made it gets PERMISSION"),
    Rule("shared-removed", _B, "the shared page is no longer defined"),
    Rule("shared-size-changed", _B, "the shared page got another size"),
    Rule("shared-field-removed", _B, "a shared-page field disappeared"),
    Rule("shared-field-changed", _B, "a shared-page field moved to another offset or got another type"),
)}

# The rules in prose: printed in the generated reference, above the table of RULES.
POLICY: tuple[str, ...] = (
    ("A version is MAJOR.MINOR. **Major** changes are breaking: a guest never uses an interface "
     "whose major differs from the one it was built for (the guest VMI layer rejects such a ROM and "
     "runs natively). **Minor** changes are additive: a guest built for 1.x runs unchanged on 1.y "
     "for any y, older or newer."),
    ("A guest states the **minimum version** it needs: `VMI_MIN_VERSION` (default "
     "`VMI_VERSION_MAJOR << 16`, any minor; define it before including `vmi.h`). The guest VMI "
     "layer accepts a ROM of the same major whose version is at least that, resolves every call "
     "its header names through the ROM's entry table, and falls back to the native instruction for "
     "any call the ROM lacks."),
    ("A guest learns **what it can use** from the hypervisor: `Query.GetVersion`, `Query.HasFamily` "
     "and `Query.QueryCall` (since 1.1; on a 1.0 hypervisor the Query calls answer `NOT_SUPPORTED` "
     "and the ROM header's version is all there is). A new family or call is used only after the "
     "query says it is there; otherwise the guest does the work itself."),
    ("The hypervisor **advertises what it supports**: its ROM header carries its version and an "
     "entry for each call it implements, and the Query family answers for calls, families and "
     "honoured annotations."),
    ("Released versions are kept as fixtures (`src/vmikit/abi/versions/vmi-MAJOR.MINOR.toml`) and "
     "never edited. `vmikit spec diff OLD NEW` prints one line per change with its class and exits "
     "non-zero when NEW's version does not follow from the changes: a breaking change needs a "
     "higher major; a compatible change needs a higher minor (or major); a neutral change needs "
     "nothing; a version never goes down; everything added says `since` = a version newer than OLD."),
)


def required_bump(severities: set[Severity]) -> str:
    """'major', 'minor' or 'none': the smallest bump these changes allow."""
    if Severity.BREAKING in severities:
        return "major"
    if Severity.COMPATIBLE in severities:
        return "minor"
    return "none"


def bump_problems(old: Version, new: Version, bump: str) -> list[str]:
    """Why NEW's version does not follow from OLD's and the required bump ([] when it does)."""
    if new < old:
        return [f"the version went down: {old} -> {new}"]
    if bump == "major" and new.major <= old.major:
        return [f"breaking changes need a major bump ({old.major + 1}.0), got {new}"]
    if bump == "minor" and new.major == old.major and new.minor <= old.minor:
        return [f"compatible changes need a minor bump ({old.major}.{old.minor + 1}), got {new}"]
    return []
