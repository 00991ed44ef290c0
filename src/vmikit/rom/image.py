"""The ROM image as bytes: header layout, final patching (length, size, checksum), parsing.

The header is fixed by docs/rom-abi.md; parse_rom() checks what the guest checks
(signature, major version, checksum, every offset inside the image) and a little more.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from vmikit.abi.model import Spec
from vmikit.abi.spec import load_spec
from vmikit.machine import layout

BLOCK = 512
OPTION_ROM_SIGNATURE = 0xAA55
LEGACY_INIT = b"\xc3\x90\x90"  # `ret; nop; nop`: the unused option-ROM init entry
FLAG_HONOURS_ANNOTATIONS = 1 << 0
CHECKSUM_OFFSET = 47

# u16 sig, u8 len, 3s init, u16 0, 4s "VMIK", u16 major, u16 minor, u32 size, u32 count,
# u32 table, u32 flags, u32 raw, u32 data base, u32 data size, 3s 0, u8 checksum adjust
HEADER = struct.Struct("<HB3sH4sHHIIIIIII3sB")
ENTRY = struct.Struct("<II")  # call_id, offset from the ROM base
assert HEADER.size == 48


class RomProfile(enum.Enum):
    """Which calls the ROM provides ("none" = no ROM at all, handled by the board)."""

    FULL = "full"  # every call; optional plain-instruction calls run natively in the ROM
    MINIMAL = "minimal"  # no optional call: the guest falls back to native instructions


@dataclass(frozen=True)
class RomImage:
    data: bytes
    profile: RomProfile
    honours_annotations: bool
    entries: dict[int, int] = field(default_factory=dict)  # call_id -> offset from the ROM base
    raw_entry: int = 0  # offset of the raw-call entry

    @property
    def size(self) -> int:
        return len(self.data)

    def resolve(self, call_id: int) -> int | None:
        """The guest's lookup: (family, call, annotation), else (family, call, 0), else None."""
        offset = self.entries.get(call_id)
        return offset if offset is not None else self.entries.get(call_id & ~0xFF)


def checksum_adjust(image: bytes | bytearray) -> int:
    """The byte at CHECKSUM_OFFSET that makes every byte of the image sum to 0 mod 256."""
    rest = sum(image) - image[CHECKSUM_OFFSET]
    return -rest & 0xFF


def finalize(linked: bytes) -> bytes:
    """Pad the linked image to whole 512-byte blocks and patch length, size and checksum."""
    if len(linked) < HEADER.size:
        raise ValueError(f"linked ROM is {len(linked)} bytes, smaller than its header")
    size = -(-len(linked) // BLOCK) * BLOCK
    if size > layout.ROM_IMAGE_MAX:
        raise ValueError(f"ROM image is {size} bytes, more than the {layout.ROM_IMAGE_MAX}-byte window")
    image = bytearray(linked.ljust(size, b"\0"))
    image[2] = size // BLOCK
    struct.pack_into("<I", image, 16, size)
    image[CHECKSUM_OFFSET] = checksum_adjust(image)
    return bytes(image)


def parse_rom(data: bytes, spec: Spec | None = None) -> RomImage:
    """Validate a ROM image as the guest would; ValueError naming the first problem."""
    spec = spec or load_spec()
    if len(data) < HEADER.size:
        raise ValueError(f"image is {len(data)} bytes, too short for the {HEADER.size}-byte header")
    (sig, blocks, init, zero, magic, major, _minor, size, count, table, flags, raw,
     data_base, data_size, pad, _adjust) = HEADER.unpack_from(data)
    if sig != OPTION_ROM_SIGNATURE:
        raise ValueError(f"bad option-ROM signature {sig:#06x} (want {OPTION_ROM_SIGNATURE:#06x})")
    if magic != layout.ROM_SIGNATURE:
        raise ValueError(f"bad VMI signature {magic!r} (want {layout.ROM_SIGNATURE!r})")
    if init != LEGACY_INIT or zero or any(pad):
        raise ValueError("header padding or legacy init bytes are not as specified")
    if major != spec.version.major:
        raise ValueError(f"interface major {major} does not match the spec's {spec.version.major}")
    if blocks * BLOCK != size or size != len(data):
        raise ValueError(f"length {blocks} blocks, size field {size} and image length {len(data)} disagree")
    if size > layout.ROM_IMAGE_MAX:
        raise ValueError(f"image is {size} bytes, more than the {layout.ROM_IMAGE_MAX}-byte window")
    if sum(data) % 256:
        raise ValueError(f"checksum: bytes sum to {sum(data) % 256} mod 256, not 0")
    if data_base != layout.ROM_DATA_BASE or data_size == 0:
        raise ValueError(f"data area {data_base:#x}+{data_size:#x} is not the board's {layout.ROM_DATA_BASE:#x}")
    if not (HEADER.size <= table and table + count * ENTRY.size <= size):
        raise ValueError(f"entry table at {table:#x} with {count} entries lies outside the image")
    if not HEADER.size <= raw < size:
        raise ValueError(f"raw-call entry offset {raw:#x} lies outside the image")
    entries: dict[int, int] = {}
    previous = -1
    for i in range(count):
        call_id, offset = ENTRY.unpack_from(data, table + i * ENTRY.size)
        if call_id <= previous:
            raise ValueError(f"entry table not sorted by call ID at entry {i} ({call_id:#010x})")
        if call_id & 0xFF00:
            raise ValueError(f"entry {i} call ID {call_id:#010x} has a non-zero reserved byte")
        if not HEADER.size <= offset < size:
            raise ValueError(f"entry {i} ({call_id:#010x}) offset {offset:#x} lies outside the image")
        entries[call_id] = offset
        previous = call_id
    honours = bool(flags & FLAG_HONOURS_ANNOTATIONS)
    if not honours and any(cid & 0xFF for cid in entries):
        raise ValueError("annotated entries in a ROM whose flags say it does not honour annotations")
    optional = {c.call_id() for c in spec.calls() if c.optional}
    profile = RomProfile.FULL if optional & entries.keys() else RomProfile.MINIMAL
    return RomImage(bytes(data), profile, honours, entries, raw)
