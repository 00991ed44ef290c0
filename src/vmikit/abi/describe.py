"""Human-readable decoding of a call ID; never fails, names every oddity instead."""

from __future__ import annotations

from vmikit.abi.callid import CallId
from vmikit.abi.model import Spec, visible


def call_name(spec: Spec, cid: CallId) -> str:
    """'MMU.SetPTE', 'Legacy.38 SetPxE -> MMU.SetPTE', or what is unknown about it."""
    family = spec.families.get(cid.family)
    if family is None:
        return f"<unknown family 0x{cid.family:02x}>.<call 0x{cid.call:02x}>"
    if cid.family == 0x00:
        call = spec.legacy.get(cid.call)
        if call is not None:
            return f"Legacy.{cid.call} {spec.legacy_name(cid.call)} -> {call.qualified_name}"
        only = spec.legacy_only.get(cid.call)
        if only is not None:
            return f"Legacy.{cid.call} {only.name} (legacy-only, not supported)"
        return f"Legacy.<unknown call {cid.call}>"
    call = family.calls.get(cid.call)
    if call is None:
        where = " (its calls are registered at run time)" if family.runtime else ""
        return f"{family.name}.<unknown call 0x{cid.call:02x}>{where}"
    return call.qualified_name


def annotation_text(spec: Spec, cid: CallId) -> str:
    """'annotation 0x01 queue (may be queued)' plus notes on bits the call ignores."""
    text = f"annotation 0x{cid.annotation:02x}"
    if cid.annotation == 0:
        return text + " (none)"
    names, unknown = spec.annotation_names(cid.annotation)
    call = spec.lookup(cid.encode())
    parts: list[str] = []
    for name in names:
        ann = spec.annotations[name]
        note = ""
        if call is not None and name not in call.annotations:
            note = f", not accepted by {call.qualified_name}: ignored"
        parts.append(f"{name} ({visible(ann.title)}{note})")  # free text: never a control character to the terminal
    if unknown:
        parts.append(f"unknown bits 0x{unknown:02x} (treated as absent)")
    return text + " " + " + ".join(parts)


def describe(spec: Spec, value: int) -> str:
    """One line: ID, call name, reserved byte if set, annotation."""
    cid = CallId.decode(value)
    fields = [f"0x{value:08x}", call_name(spec, cid)]
    if cid.reserved:
        fields.append(f"reserved 0x{cid.reserved:02x} (must be zero: the hypervisor answers RESERVED_BITS)")
    fields.append(annotation_text(spec, cid))
    return "  ".join(fields)
