"""The chipset's small parts a PC guest relies on: the reset paths and the ACPI PM timer.

Reset: writing 0x06 or 0x0E to the reset control register (0xCF9), the keyboard controller's
pulse-reset command (0xFE to port 0x64), or setting bit 0 of port 0x92. A reset ends the run
(as QEMU's -no-reboot does) and the run result says which path was taken.

The PM timer is a free-running 32-bit counter at 3.579545 MHz (the FADT announces it and its
port), read from the host's monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmikit.machine import layout
from vmikit.machine.ports import Ports

PM_TIMER_HZ = 3_579_545
RESET_CONTROL_RST_CPU = 0x04  # with SYS_RST (0x02): a hard reset; either way the machine resets
KBC_PULSE_RESET = 0xFE
KBC_STATUS_SYSTEM = 0x04  # "system flag": POST passed; input and output buffers empty
PORT_SYSTEM_CONTROL_A = 0x92  # bit 0: fast reset
PORT_KBC_DATA = 0x60


class Chipset:
    def __init__(self, reset: Callable[[str], None]) -> None:
        self._reset = reset
        self._reset_control = 0
        self._epoch = time.monotonic_ns()

    def attach(self, board: Ports) -> None:
        board.on_out(layout.PORT_RESET_CONTROL, self._write_reset_control)
        board.on_in(layout.PORT_RESET_CONTROL, lambda port, size: self._reset_control)
        board.on_out(layout.PORT_KBC_STATUS, self._kbc_command)
        board.on_in(layout.PORT_KBC_STATUS, lambda port, size: KBC_STATUS_SYSTEM)
        board.on_in(PORT_KBC_DATA, lambda port, size: 0)
        board.on_out(PORT_SYSTEM_CONTROL_A, self._system_control)
        board.on_in(PORT_SYSTEM_CONTROL_A, lambda port, size: 0x02)  # A20 on
        board.on_in(layout.PORT_PM_TIMER, self._pm_timer)

    def _write_reset_control(self, port: int, size: int, value: int) -> None:
        self._reset_control = value & 0x0E
        if value & RESET_CONTROL_RST_CPU:
            self._reset(f"port {layout.PORT_RESET_CONTROL:#x}")

    def _kbc_command(self, port: int, size: int, value: int) -> None:
        if value & 0xFF == KBC_PULSE_RESET:
            self._reset("keyboard controller")

    def _system_control(self, port: int, size: int, value: int) -> None:
        if value & 0x01:
            self._reset(f"port {PORT_SYSTEM_CONTROL_A:#x}")

    def _pm_timer(self, port: int, size: int) -> int:
        ticks = (time.monotonic_ns() - self._epoch) * PM_TIMER_HZ // 1_000_000_000
        return ticks & 0xFFFFFFFF
