"""The loaded interface as plain, read-only values (built by vmikit.abi.loader)."""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from vmikit.abi.callid import CALLID_MAX, CallId

U64_MASK = (1 << 64) - 1

# --- What the hypervisor and the ROM implement; the loader refuses a spec outside it. -----------
# The hypervisor (mmu.BATCH_ENTRY, FlushQueue) reads a fixed entry: u32 call_id, u32 reserved,
# u64 args[BATCH_ENTRY_ARGS] = 32 bytes (hypervisor/mmu.py reads entries by it).
BATCH_ENTRY_ARGS = 3
# The ROM's .bss holds one buffer of max_entries 32-byte entries (32 KiB at this bound, of the
# 60 KiB ROM_BSS_MAX), and FlushQueue copies count * 32 bytes out of the guest per flush.
BATCH_MAX_ENTRIES = 1024
# The shared page is one page at layout.SHARED_PAGE, the last of the ROM data area.
SHARED_MAX_SIZE = 4096
# Constants that size something, as name -> (lowest, highest, why the highest). A guest can fill
# every EventChannel port, so PORTS x DEPTH bounds the events the hypervisor holds (64 Ki).
CONSTANT_BOUNDS: dict[str, tuple[int, int, str]] = {
    "EVTCHN_PORTS": (1, 256, "the hypervisor keeps a queue per port"),
    "EVTCHN_DEPTH": (1, 256, "the hypervisor holds up to this many events per port"),
}
# Constants whose value the hypervisor and the ROM hard-code (mmu.FLUSH_FLAGS, hcall.S's
# testb on FLUSH_*, query.QUERY_*, mmu's levels 1..4, execution's rings 0 and 3).
IMPLEMENTED_CONSTANTS: dict[str, int] = {
    "FLUSH_TLB": 0x01, "FLUSH_GLOBAL": 0x02,
    "QUERY_SUPPORTED": 0x100, "QUERY_NOT_NATIVE": 0x200,
    "LEVEL_PT": 1, "LEVEL_PD": 2, "LEVEL_PDPT": 3, "LEVEL_PML4": 4,
    "PRIVILEGE_RING0": 0, "PRIVILEGE_DEPRIVILEGED": 3,
}

# Characters no spec string may hold and no emitter may copy into generated text: C0/C1
# controls (CR ends a line for gcc, so `*\`+CR+`/` closes a comment), line and paragraph
# separators, format characters (bidi overrides reorder what a reader sees), surrogates,
# private-use and unassigned code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def unsafe_char(text: str) -> str | None:
    """The first character of TEXT that must not reach generated code, or None."""
    for ch in text:
        if ch < " " or ch == "\x7f" or (ch > "\x7f" and unicodedata.category(ch) in _UNSAFE_CATEGORIES):
            return ch
    return None


def visible(text: str) -> str:
    """TEXT with each unsafe character spelled as U+XXXX (for emitters handed what the loader refuses)."""
    if unsafe_char(text) is None:
        return text
    return "".join(f"U+{ord(ch):04X}" if unsafe_char(ch) else ch for ch in text)


class Version(NamedTuple):
    major: int
    minor: int

    @property
    def packed(self) -> int:
        """The Query.GetVersion answer: major << 16 | minor."""
        return (self.major << 16) | self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True, slots=True)
class TypeDef:
    name: str
    bits: int
    doc: str


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str

    def __str__(self) -> str:
        return f"{self.type} {self.name}"


@dataclass(frozen=True, slots=True)
class Annotation:
    name: str
    bit: int
    title: str
    doc: str


@dataclass(frozen=True, slots=True)
class ErrorCode:
    name: str
    value: int  # 0 or negative; RAX carries it as value & U64_MASK
    doc: str


@dataclass(frozen=True, slots=True)
class Constant:
    name: str
    value: int
    doc: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Layout of the FlushQueue buffer: u32 call_id, u32 reserved, u64 args[max_args]."""

    max_entries: int
    max_args: int
    doc: str

    @property
    def entry_size(self) -> int:
        return 8 + 8 * self.max_args


@dataclass(frozen=True, slots=True)
class Call:
    family: int
    number: int
    name: str
    family_name: str
    doc: str
    args: tuple[Arg, ...] = ()
    results: tuple[Arg, ...] = ()  # result slots 1..n; slot 0 (RAX) is always the status
    optional: bool = False
    annotations: frozenset[str] = frozenset()
    legacy: int | None = None
    legacy_name: str | None = None
    since: Version = Version(1, 0)
    user: bool = False  # safe from guest user mode; any other call from user mode gets PERMISSION

    @property
    def qualified_name(self) -> str:
        return f"{self.family_name}.{self.name}"

    @property
    def result(self) -> str:
        """Result type summary: 'status' when only RAX, else the slot types."""
        if not self.results:
            return "status"
        return ", ".join(str(r) for r in self.results)

    def call_id(self, annotation: int = 0) -> int:
        return CallId(self.family, self.number, 0, annotation).encode()

    def __str__(self) -> str:
        return self.qualified_name


@dataclass(frozen=True, slots=True)
class LegacyOnly:
    """A VMI 3.0 flat number with no family call: the hypervisor answers NOT_SUPPORTED."""

    number: int
    name: str
    doc: str


@dataclass(frozen=True, slots=True)
class Family:
    id: int
    name: str
    doc: str
    calls: dict[int, Call] = field(default_factory=dict)
    since: Version = Version(1, 0)
    runtime: bool = False  # calls are registered from Python at run time (Experimental)


# Field types of the shared page and their sizes in bytes (the C header spells them out).
SHARED_TYPES: dict[str, int] = {"u32": 4, "u64": 8}


@dataclass(frozen=True, slots=True)
class SharedField:
    name: str
    offset: int  # bytes from the start of the page, a multiple of size
    type: str  # a key of SHARED_TYPES
    doc: str

    @property
    def size(self) -> int:
        return SHARED_TYPES[self.type]

    @property
    def end(self) -> int:
        """One past the field's last byte."""
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class SharedPage:
    """The layout of the per-vCPU page shared by guest and hypervisor ([shared])."""

    size: int
    doc: str
    fields: tuple[SharedField, ...]  # in spec order (the loader checks they do not overlap)

    def field(self, name: str) -> SharedField:
        for f in self.fields:
            if f.name == name.strip().lower():
                return f
        known = ", ".join(f.name for f in self.fields)
        raise UnknownName(f"unknown shared-page field {name!r}: known fields are {known}")

    def offset(self, name: str) -> int:
        """Byte offset of field NAME, e.g. offset('vif') == 8; UnknownName (a KeyError) otherwise."""
        return self.field(name).offset


class UnknownName(KeyError):
    """KeyError whose str() is the plain message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Spec:
    """The whole interface. Treat every field as read-only: load_spec() caches it."""

    path: Path
    name: str
    version: Version
    doc: str
    types: dict[str, TypeDef]
    annotations: dict[str, Annotation]
    errors: dict[str, int]  # name -> value (0 or negative)
    error_docs: dict[str, str]
    constants: dict[str, Constant]
    batch: Batch
    families: dict[int, Family]
    legacy: dict[int, Call]  # flat legacy number -> family call
    legacy_only: dict[int, LegacyOnly]
    shared: SharedPage | None = None  # the per-vCPU shared page (since 1.3; None before)

    # -------------------------------------------------------------- calls
    def calls(self) -> Iterator[Call]:
        """Every family call, in call-ID order."""
        for fid in sorted(self.families):
            family = self.families[fid]
            for number in sorted(family.calls):
                yield family.calls[number]

    def lookup(self, call_id: int) -> Call | None:
        """The call a call ID names, ignoring annotation bits and not checking reserved.

        Family 0x00 (legacy) resolves through the legacy table. Values that are
        not 32-bit call IDs give None, as unknown calls do.
        """
        if not isinstance(call_id, int) or not 0 <= call_id <= CALLID_MAX:
            return None
        cid = CallId.decode(call_id)
        if cid.family == 0x00:
            return self.legacy.get(cid.call)
        family = self.families.get(cid.family)
        return family.calls.get(cid.call) if family else None

    def by_name(self, name: str) -> Call:
        """'MMU.SetPTE' (case-insensitive) -> Call; UnknownName (a KeyError) otherwise."""
        table = {c.qualified_name.lower(): c for c in self.calls()}
        call = table.get(name.strip().lower())
        if call is not None:
            return call
        names = [c.qualified_name for c in self.calls()]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if not close:  # case-insensitive second try
            lowered = difflib.get_close_matches(name.lower(), list(table), n=1, cutoff=0.6)
            close = [table[lowered[0]].qualified_name] if lowered else []
        hint = f"did you mean {close[0]}?" if close else "names look like MMU.SetPTE"
        raise UnknownName(f"unknown call {name!r}: {hint} (`vmikit spec show` lists every call)")

    def family_by_name(self, name: str) -> Family:
        for family in self.families.values():
            if family.name.lower() == name.strip().lower():
                return family
        known = ", ".join(f.name for f in self.families.values())
        raise UnknownName(f"unknown family {name!r}: known families are {known}")

    def legacy_name(self, number: int) -> str | None:
        call = self.legacy.get(number)
        if call is not None:
            return call.legacy_name or call.name
        only = self.legacy_only.get(number)
        return only.name if only else None

    # -------------------------------------------------------------- annotations
    def annotation_mask(self, call: Call) -> int:
        """Bits of the annotation byte this call accepts."""
        mask = 0
        for name in call.annotations:
            mask |= self.annotations[name].bit
        return mask

    def annotation_names(self, bits: int) -> tuple[list[str], int]:
        """Split an annotation byte into known names and the unknown remainder."""
        names = [a.name for a in sorted(self.annotations.values(), key=lambda a: a.bit) if bits & a.bit]
        known = sum(self.annotations[n].bit for n in names)
        return names, bits & ~known & 0xFF

    def annotation_bits(self, name: str) -> int:
        try:
            return self.annotations[name.strip().lower()].bit
        except KeyError:
            known = ", ".join(sorted(self.annotations))
            raise UnknownName(f"unknown annotation {name!r}: known annotations are {known}") from None

    # -------------------------------------------------------------- errors
    def error(self, name: str) -> int:
        """Error code value (0 or negative) by name, e.g. error('BAD_ADDRESS') == -4."""
        try:
            return self.errors[name.strip().upper()]
        except KeyError:
            known = ", ".join(self.errors)
            raise UnknownName(f"unknown error {name!r}: known errors are {known}") from None

    def error_rax(self, name: str) -> int:
        """The error as the unsigned 64-bit value the hypervisor writes to RAX."""
        return self.error(name) & U64_MASK

    def error_name(self, value: int) -> str | None:
        """Name of an error code given signed or as an unsigned 64-bit RAX value."""
        if value > (U64_MASK >> 1):
            value -= 1 << 64
        for name, code in self.errors.items():
            if code == value:
                return name
        return None
