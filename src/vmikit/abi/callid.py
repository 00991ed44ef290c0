"""The 32-bit VMI call ID, read as a tuple (family, call, reserved, annotation).

    31--------24-23---------16-15--------8-7-----------0
     | family   | call number | reserved  | annotation |

The layout is fixed by the source mail, so it lives in code, not in the spec file.
"""

from __future__ import annotations

from dataclasses import dataclass

FIELD_BITS = 8
FIELD_MASK = 0xFF
FAMILY_SHIFT = 24
CALL_SHIFT = 16
RESERVED_SHIFT = 8
ANNOTATION_SHIFT = 0

FAMILY_MASK = FIELD_MASK << FAMILY_SHIFT
CALL_MASK = FIELD_MASK << CALL_SHIFT
RESERVED_MASK = FIELD_MASK << RESERVED_SHIFT
ANNOTATION_MASK = FIELD_MASK << ANNOTATION_SHIFT

CALLID_MAX = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class CallId:
    """A decoded call ID; every field is one byte."""

    family: int
    call: int
    reserved: int = 0
    annotation: int = 0

    def __post_init__(self) -> None:
        for field in ("family", "call", "reserved", "annotation"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value <= FIELD_MASK:
                raise ValueError(f"call ID {field} must be 0..0xff, got {value!r}")

    def encode(self) -> int:
        return (
            (self.family << FAMILY_SHIFT)
            | (self.call << CALL_SHIFT)
            | (self.reserved << RESERVED_SHIFT)
            | (self.annotation << ANNOTATION_SHIFT)
        )

    @classmethod
    def decode(cls, value: int) -> CallId:
        """Split a 32-bit value; anything outside 0..2**32-1 is a ValueError."""
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= CALLID_MAX:
            raise ValueError(f"call ID must be 0..0xffffffff, got {value!r}")
        return cls(
            family=(value >> FAMILY_SHIFT) & FIELD_MASK,
            call=(value >> CALL_SHIFT) & FIELD_MASK,
            reserved=(value >> RESERVED_SHIFT) & FIELD_MASK,
            annotation=(value >> ANNOTATION_SHIFT) & FIELD_MASK,
        )

    def without_annotation(self) -> CallId:
        return CallId(self.family, self.call, self.reserved, 0)

    def with_annotation(self, annotation: int) -> CallId:
        return CallId(self.family, self.call, self.reserved, annotation)

    def __int__(self) -> int:
        return self.encode()

    def __str__(self) -> str:
        return f"0x{self.encode():08x}"


def encode(family: int, call: int, annotation: int = 0) -> int:
    """Shorthand for CallId(family, call, 0, annotation).encode()."""
    return CallId(family, call, 0, annotation).encode()
