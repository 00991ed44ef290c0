"""QEMU's fw_cfg interface, the legacy I/O form: the facts a PC guest asks its firmware for.

A 16-bit write to the selector port picks an item and rewinds it; each byte read from the data
port returns the next byte of the item, zero past its end or for an item the board does not have.
kvm-unit-tests reads the CPU count and RAM size this way. No DMA interface (ID bit 1 clear).
"""

from __future__ import annotations

import struct

from vmikit.machine import layout
from vmikit.machine.ports import Ports

SIGNATURE = 0x00
ID = 0x01
RAM_SIZE = 0x03
NB_CPUS = 0x05
MAX_CPUS = 0x0F
FILE_DIR = 0x19
ENTRY_MASK = 0x3FFF  # the selector's item number; bit 14 (write) and 15 (arch-local) are flags


class FwCfg:
    """Ports PORT_FW_CFG (selector) and PORT_FW_CFG + 1 (data)."""

    def __init__(self, ram_bytes: int, cpus: int = 1) -> None:
        self._items: dict[int, bytes] = {
            SIGNATURE: b"QEMU",
            ID: struct.pack("<I", 1),  # the traditional interface only
            RAM_SIZE: struct.pack("<Q", ram_bytes),
            NB_CPUS: struct.pack("<H", cpus),
            MAX_CPUS: struct.pack("<H", cpus),
            FILE_DIR: struct.pack(">I", 0),  # no named files
        }
        self._item = b""
        self._offset = 0
        self.selects = 0

    def attach(self, board: Ports) -> None:
        board.on_out(layout.PORT_FW_CFG, self._select)
        board.on_in(layout.PORT_FW_CFG + 1, self._read)

    def _select(self, port: int, size: int, value: int) -> None:
        self.selects += 1
        self._item = self._items.get(value & 0xFFFF & ENTRY_MASK, b"")
        self._offset = 0

    def _read(self, port: int, size: int) -> int:
        # A wider read returns that many bytes, little-endian, as QEMU's data port does.
        chunk = self._item[self._offset:self._offset + size]
        self._offset += size
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")
