"""COM1 as a 16550A UART: the eight registers, 16-byte FIFOs, loopback, IRQ 4, host input.

Transmission is instant (the line is infinitely fast): THR and the transmitter are always empty,
so a guest that polls LSR before each byte pays one exit for the poll and one for the byte, and
the bytes go to the board's console, which batches them into lines. Received bytes come from
loopback or from a host file descriptor (the terminal or a pipe), read by a thread of its own
into a bounded buffer; the guest's RX FIFO refills from it as the guest reads.

The interrupt line follows the 16550's rules: an enabled, pending cause (line status, data
ready, THR empty, modem status, in that priority) raises IRQ 4 when MCR.OUT2 gates it through,
as on a PC; reading IIR while THR-empty is the cause acknowledges that cause.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable

from vmikit.background import Background
from vmikit.machine import layout
from vmikit.machine.ports import Ports

FIFO_SIZE = 16
HOST_INPUT_MAX = 64 << 10  # bytes read ahead from the host; the reader waits while this is full
INPUT_POLL_S = 0.1  # how often the reader thread looks whether the board is closing

# Register offsets from the base port.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDA, IER_THRE, IER_RLS, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MSI, IIR_THRE, IIR_RDA, IIR_RLS, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
TRIGGER_LEVELS = (1, 4, 8, 14)


class HostInput(Background):
    """Reads a host file descriptor into the UART, a chunk at a time, without ever holding more
    than HOST_INPUT_MAX bytes: a guest that never reads its input cannot make the VMM grow."""

    def __init__(self, fd: int, uart: Uart16550) -> None:
        super().__init__("vmikit-uart-input")
        self._fd = fd
        self._uart = uart

    def _loop(self) -> None:
        while not self._done.is_set():
            if not self._uart.room_for_host_input():
                self._done.wait(INPUT_POLL_S)
                continue
            try:
                ready, _, _ = select.select([self._fd], [], [], INPUT_POLL_S)
                if not ready:
                    continue
                data = os.read(self._fd, 4096)
            except (OSError, ValueError):  # closed or not selectable any more: input ends
                return
            if not data:  # end of file
                return
            self._uart.host_bytes(data)


class Uart16550:
    def __init__(self, transmit: Callable[[int], None], base: int = layout.PORT_SERIAL,
                 irq: int = layout.IRQ_SERIAL) -> None:
        self._transmit = transmit
        self.base = base
        self.irq = irq
        self._lock = threading.Lock()  # the host-input thread and the vCPU both touch the FIFO
        self._board: Ports | None = None
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud, as a BIOS leaves it
        self._rx: deque[int] = deque()
        self._host: deque[int] = deque()
        self._overrun = False
        self._thre_pending = True  # THR empty, not yet acknowledged
        self._msr_delta = 0
        self._level = False
        self.transmitted = 0
        self.received = 0
        self.on_host_input: Callable[[], None] | None = None  # the hypervisor's console event source

    def attach(self, board: Ports) -> None:
        self._board = board
        board.on_out(self.base, self._write_thr)  # the hot register, without the dispatch below
        for offset in range(1, 8):
            board.on_out(self.base + offset, self._write)
        for offset in range(8):
            board.on_in(self.base + offset, self._read)

    # --- host side -------------------------------------------------------

    def room_for_host_input(self) -> bool:
        return len(self._host) < HOST_INPUT_MAX

    def host_bytes(self, data: bytes) -> None:
        """Bytes typed or piped in (any thread): they reach the RX FIFO as it empties."""
        with self._lock:
            self._host.extend(data)
            self._refill()
            self._update_irq()
        listener = self.on_host_input
        if listener is not None:
            listener()

    # --- registers -------------------------------------------------------

    def _write_thr(self, port: int, size: int, value: int) -> None:
        if self.lcr & LCR_DLAB:
            self.dll = value & 0xFF
            return
        byte = value & 0xFF
        with self._lock:
            if self.mcr & MCR_LOOP:
                self._receive(byte)
            else:
                self.transmitted += 1
            self._thre_pending = True  # sent at once: the THR is empty again
            self._update_irq()
        if not self.mcr & MCR_LOOP:
            self._transmit(byte)  # outside the lock: the console may block on a slow reader

    def _write(self, port: int, size: int, value: int) -> None:
        offset, value = port - self.base, value & 0xFF
        with self._lock:
            if offset == IER_DLM:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    if value & IER_THRE and not self.ier & IER_THRE:
                        self._thre_pending = True  # enabling it with THR empty raises it
                    self.ier = value & 0x0F
            elif offset == IIR_FCR:
                if value & FCR_CLEAR_RX or (value ^ self.fcr) & FCR_ENABLE:
                    self._rx.clear()
                self.fcr = value & (FCR_ENABLE | 0xC0)
                self._refill()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                old, self.mcr = self.mcr, value & 0x1F
                if (old ^ self.mcr) & MCR_LOOP:
                    self._refill()
                self._msr_delta |= (self._modem_lines(old) ^ self._modem_lines(self.mcr)) >> 4  # the delta bits 0-3
            elif offset == SCR:
                self.scr = value
            # LSR and MSR are read-only: writes are dropped, as the chip does.
            self._update_irq()

    def _read(self, port: int, size: int) -> int:
        offset = port - self.base
        with self._lock:
            try:
                return self._read_locked(offset)
            finally:
                self._update_irq()

    def _read_locked(self, offset: int) -> int:
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                return self.dll
            if not self._rx:
                return 0
            byte = self._rx.popleft()
            self.received += 1
            self._refill()
            return byte
        if offset == IER_DLM:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            cause = self._cause()
            if cause == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THR empty
            return cause | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | (LSR_OE if self._overrun else 0)
            self._overrun = False  # reading LSR clears the error bits
            return lsr
        if offset == MSR:
            value = self._modem_lines(self.mcr) | self._msr_delta
            self._msr_delta = 0
            return value
        return self.scr

    # --- internals (lock held) --------------------------------------------

    def _modem_lines(self, mcr: int) -> int:
        """MSR's line bits: in loopback, RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD; otherwise a
        cable with the other end ready (CTS, DSR, DCD)."""
        if mcr & MCR_LOOP:
            return ((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5) | ((mcr & MCR_OUT1) << 4) | ((mcr & MCR_OUT2) << 4)
        return 0x10 | 0x20 | 0x80

    def _depth(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _receive(self, byte: int) -> None:
        if len(self._rx) >= self._depth():
            self._overrun = True  # the byte is lost, as on the wire
            return
        self._rx.append(byte)

    def _refill(self) -> None:
        if self.mcr & MCR_LOOP:
            return  # in loopback the chip is cut off from the line
        while self._host and len(self._rx) < self._depth():
            self._rx.append(self._host.popleft())

    def _cause(self) -> int:
        if self.ier & IER_RLS and self._overrun:
            return IIR_RLS
        if self.ier & IER_RDA and self._rx:
            trigger = TRIGGER_LEVELS[self.fcr >> 6] if self.fcr & FCR_ENABLE else 1
            # Fewer bytes than the trigger level: the character-timeout cause (the line is idle).
            return IIR_RDA if len(self._rx) >= trigger else IIR_TIMEOUT
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        if self.ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = bool(self.mcr & MCR_OUT2) and self._cause() != IIR_NONE
        if level != self._level and self._board is not None:
            self._level = level
            self._board.irq_line(self.irq, level)
