"""`vmikit run --gdb [HOST:]PORT`: a GDB remote-serial-protocol stub for the guest.

The guest stops before its first instruction and waits for one gdb client. The stub runs in
the VMM's own thread: a stop is the run loop blocked in the stub serving gdb's packets; resuming
returns to the loop. A reader thread parses the socket into packets (bounded) and turns gdb's
Ctrl-C (0x03) into ``KvmVcpuEngine.interrupt``.

How each stop is made on this host's KVM (``kvm_pvm``, docs/observe.md has the probe results):

- ring 0 (emulated: the boot code, a ``--privilege ring0`` kernel): single step is
  KVM_GUESTDBG_SINGLESTEP and hardware breakpoints KVM_GUESTDBG_USE_HW_BP (KVM_EXIT_DEBUG); a
  software breakpoint's int3 makes KVM report an emulation failure at its address, which the
  engine hands to ``on_exit`` first.
- ring 3 (native: a deprivileged kernel): KVM's single step and hardware breakpoints never fire
  there, but every exception passes the hypervisor's monitor stubs (the event port), so a
  software breakpoint is int3 caught as #BP and a single step is RFLAGS.TF caught as #DB, and the
  stub puts the guest back as the CPU had it before the exception. Hardware breakpoints are refused
  (an error to gdb and one line on stderr); so is a step at ring 3 when no monitor routes the #DB.

Everything from the socket is hostile: packets are bounded (PACKET_MAX), checksummed, and every
malformed one gets an error reply. If gdb disconnects or detaches, breakpoints are removed and the
guest runs on to its end; ``kill`` ends the run (status 1).
"""

from __future__ import annotations

import ctypes
import queue
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from vmikit.errors import UsageError, VmikitError
from vmikit.hypervisor.execution import STUB_SIZE, STUBS_OFFSET
from vmikit.hypervisor.walk import translate
from vmikit.kvm import structs as ks
from vmikit.machine import layout
from vmikit.memory import GuestMemoryError

if TYPE_CHECKING:
    from vmikit.engine.kvm import KvmVcpuEngine
    from vmikit.session import Session, SessionResult

PACKET_MAX = 16384  # bytes of one packet's payload; gdb is told PacketSize (hex) below this
MEMORY_MAX = 4096  # bytes per m/M/X request
QUEUE_MAX = 16  # packets parsed ahead of the VMM thread: then the reader stops reading (backpressure)
HW_SLOTS = 4  # DR0-DR3
TF = 1 << 8
SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
_RESUME = object()

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_X87 = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "efer")
# (name, bytes) in gdb's register numbering, the order of target.xml below.
REGISTERS: tuple[tuple[str, int], ...] = (
    *((name, 8) for name in _GPRS), ("eflags", 4), *((name, 4) for name in _SEGMENTS),
    *((f"st{i}", 10) for i in range(8)), *((name, 4) for name in _X87),
    ("fs_base", 8), ("gs_base", 8), *((name, 8) for name in _CONTROL),
)
REG_INDEX = {name: i for i, (name, _) in enumerate(REGISTERS)}


def _target_xml() -> str:
    def reg(name: str, bits: int, kind: str, group: str = "") -> str:
        return f'    <reg name="{name}" bitsize="{bits}" type="{kind}"{f" group={chr(34)}{group}{chr(34)}" if group else ""}/>\n'

    kinds = {"rip": "code_ptr", "rsp": "data_ptr", "rbp": "data_ptr"}
    core = "".join(reg(n, 64, kinds.get(n, "int64")) for n in _GPRS)
    core += reg("eflags", 32, "int32") + "".join(reg(n, 32, "int32") for n in _SEGMENTS)
    core += "".join(reg(f"st{i}", 80, "i387_ext") for i in range(8))
    core += "".join(reg(n, 32, "int", "float") for n in _X87)
    control = "".join(reg(n, 64, "int64", "system") for n in _CONTROL)
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target version="1.0">\n'
            "  <architecture>i386:x86-64</architecture>\n"
            f'  <feature name="org.gnu.gdb.i386.core">\n{core}  </feature>\n'
            '  <feature name="org.gnu.gdb.i386.segments">\n'
            f'{reg("fs_base", 64, "int")}{reg("gs_base", 64, "int")}  </feature>\n'
            f'  <feature name="org.vmikit.control">\n{control}  </feature>\n</target>\n')


TARGET_XML = _target_xml().encode()


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); a one-line UsageError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"--gdb {text}: not a [HOST:]PORT", "give a TCP port, e.g. --gdb 1234 or --gdb 127.0.0.1:1234")
    return host, port


class DebuggerKilled(VmikitError):
    exit_status = 1


def _checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def _unescape(data: bytes) -> bytes:
    if b"}" not in data:
        return data
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    return bytes(out)


class _PacketReader:
    """The socket's bytes as packets (a thread): acks them, NAKs bad ones, and passes 0x03 on."""

    def __init__(self, sock: socket.socket, send_raw: object, on_interrupt: object) -> None:
        self.packets: queue.Queue[bytes | None] = queue.Queue(QUEUE_MAX)
        self._sock = sock
        self._send_raw = send_raw
        self._on_interrupt = on_interrupt
        self.thread = threading.Thread(target=self._loop, name="vmikit-gdb-reader", daemon=True)

    def _loop(self) -> None:
        send, interrupt = self._send_raw, self._on_interrupt
        assert callable(send) and callable(interrupt)
        state, body, csum = 0, bytearray(), bytearray()  # state 0: between packets, 1: body, 2: checksum
        overflow = False
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.packets.put(None)
                return
            for byte in data:
                if state == 0:
                    if byte == 0x03:
                        interrupt()
                    elif byte == 0x24:  # '$'
                        state, overflow = 1, False
                        body.clear()
                    # '+', '-' and anything else between packets: ignored
                elif state == 1:
                    if byte == 0x23:  # '#'
                        state = 2
                        csum.clear()
                    elif len(body) >= PACKET_MAX:
                        overflow = True
                    else:
                        body.append(byte)
                else:
                    csum.append(byte)
                    if len(csum) == 2:
                        state = 0
                        if overflow or bytes(csum).lower() != _checksum(bytes(body)):
                            send(b"-")
                        else:
                            send(b"+")
                            self.packets.put(_unescape(bytes(body)))


class GdbStub:
    """One gdb client for one session's vCPU; ``run()`` replaces ``session.run()``."""

    def __init__(self, session: Session, address: tuple[str, int], image: Path | None = None) -> None:
        self._session = session
        self._machine = session.machine
        self._memory = session.machine.memory
        engine = session.machine.vcpu
        if not hasattr(engine, "kvm_vcpu"):
            raise UsageError("--gdb needs the KVM engine", "run on KVM")
        self._engine: KvmVcpuEngine = engine  # type: ignore[assignment]
        self._kvm = self._engine.kvm_vcpu
        self._address = address
        self._image = image
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._reader: _PacketReader | None = None
        self._connected = False
        self._running = False
        self._ran = False  # the vCPU has entered the guest once (its sync regs are live)
        self._last_stop = b"S05"
        self._regs = ks.KvmRegs()
        self._sw: dict[int, tuple[int, int]] = {}  # va -> (gpa, original byte)
        self._hw: list[int] = []  # addresses in DR0.. order
        self._kvm_step = False
        self._tf_step = False
        self._physical = False  # monitor mode physical: m/M take guest-physical addresses
        self._said: set[str] = set()
        execution = session.hypervisor.execution if session.hypervisor is not None else None
        self._execution = execution
        if execution is not None:  # ring-3 breakpoints and steps arrive as #BP/#DB on the monitor's stubs
            self._pass_event = execution.on_event
            self._machine.on_out(layout.PORT_EVENT, self._on_event)
        self._engine.debugger = self

    # --- connection ------------------------------------------------------------

    def _listen(self) -> None:
        host, port = self._address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)
            listener.listen(1)
        except OSError as err:
            raise UsageError(f"--gdb {host}:{port}: cannot listen ({err.strerror or err})",
                             "choose a free port (or 0 for any), on an address of this host") from None
        self._listener = listener
        bound = listener.getsockname()
        target = f"{bound[0]}:{bound[1]}"
        hint = (f"gdb -ex 'set architecture i386:x86-64' -ex 'file {self._image}' -ex 'target remote {target}'"
                if self._image else f"target remote {target}")
        print(f"vmikit: gdb: waiting on {target}, guest stopped before its first instruction; connect with: {hint}",
              file=sys.stderr, flush=True)

    def _accept(self) -> None:
        assert self._listener is not None
        sock, _ = self._listener.accept()  # Ctrl-C here: KeyboardInterrupt, the CLI's `interrupted`
        self._listener.close()
        self._listener = None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._connected = True
        self._reader = _PacketReader(sock, self._send_raw, self._on_interrupt)
        self._reader.thread.start()

    def _send_raw(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        with self._send_lock:
            try:
                sock.sendall(data)
            except OSError:
                pass  # a vanished client: the reader sees EOF and detaches

    def _send(self, payload: bytes) -> None:
        self._send_raw(b"$" + payload + b"#" + _checksum(payload))

    def _on_interrupt(self) -> None:
        if self._running:
            self._engine.interrupt()

    def _say(self, key: str, text: str) -> None:
        """One line on stderr per kind of refusal, however often gdb asks."""
        if key not in self._said:
            self._said.add(key)
            print(f"vmikit: gdb: {text}", file=sys.stderr, flush=True)

    # --- the run ---------------------------------------------------------------

    def run(self) -> SessionResult:
        self._listen()
        try:
            self._accept()
            self._snapshot()
            self._serve()  # stopped before the first instruction
            try:
                result = self._session.run()
            except BaseException as exc:
                if not isinstance(exc, DebuggerKilled):
                    self._send(b"X%02x" % SIGSEGV)  # the guest crashed or hung: gdb sees the inferior end
                raise
            self._send(b"W%02x" % (result.exit_status & 0xFF))
            return result
        finally:
            self._close()

    def _close(self) -> None:
        self._connected = False
        for sock in (self._sock, self._listener):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._sock = self._listener = None

    def _detach(self) -> None:
        """gdb left (detach or disconnect): no breakpoint or step remains; the guest runs to its end."""
        for va in list(self._sw):
            self._remove_sw(va)
        self._hw.clear()
        self._kvm_step = self._tf_step = False
        self._regs.rflags &= ~TF
        self._connected = False
        try:
            self._kvm.set_guest_debug(0)
        except OSError:
            pass

    # --- stops -------------------------------------------------------------------

    def on_exit(self, reason: int) -> bool:
        """The engine's debug hook (KVM_EXIT_DEBUG, an internal error, an interrupt)."""
        if not self._connected:
            return reason != ks.KVM_EXIT_INTERNAL_ERROR
        if reason == ks.KVM_EXIT_DEBUG:
            hw = bool(self._kvm.run_struct.exit.debug.dr6 & 0xF) and not self._kvm_step
            self._kvm_step = False
            self._stop(SIGTRAP, b"hwbreak:;" if hw else b"")
            return True
        if reason == ks.KVM_EXIT_INTERNAL_ERROR:
            if self._engine.regs.rip not in self._sw:
                return False  # a real emulation failure
            self._stop(SIGTRAP, b"swbreak:;")
            return True
        self._stop(SIGINT)
        return True

    def _on_event(self, port: int, size: int, value: int) -> None:
        """The monitor's exception stubs: #BP from our int3 or #DB from our TF stop here; the rest goes on."""
        execution = self._execution
        regs = self._engine.regs
        offset = regs.rip - (layout.MONITOR_BASE + STUBS_OFFSET)
        if self._connected and execution is not None and execution.deprivileged and 0 <= offset < 256 * STUB_SIZE:
            vector = offset // STUB_SIZE
            frame = self._frame(regs.rsp) if vector in (1, 3) else None
            if frame is not None:
                rip, cs, rflags, rsp, ss = frame
                if vector == 3 and rip - 1 in self._sw:
                    self._unwind(rip - 1, cs, rflags, rsp, ss)
                    self._stop(SIGTRAP, b"swbreak:;")
                    return
                if vector == 1 and self._tf_step:
                    self._tf_step = False
                    self._unwind(rip, cs, rflags & ~TF, rsp, ss)
                    self._stop(SIGTRAP)
                    return
        self._pass_event(port, size, value)

    def _frame(self, rsp: int) -> tuple[int, int, int, int, int] | None:
        control = self._engine.get_control()
        gpa = translate(self._memory, control.cr0, control.cr3, rsp)
        if gpa is None or (gpa & 0xFFF) > 0x1000 - 40:
            return None
        try:
            rip, cs, rflags, old_rsp, ss = struct.unpack("<5Q", self._memory.read(gpa, 40))
        except GuestMemoryError:
            return None
        return rip, cs, rflags, old_rsp, ss

    def _unwind(self, rip: int, cs: int, rflags: int, rsp: int, ss: int) -> None:
        """Undo the exception's delivery: the guest as it was at ``rip``, in its own CS and SS."""
        regs = self._engine.regs
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
        self._engine.mark_regs_dirty()
        sregs = self._kvm.get_sregs()
        if sregs.cs.selector != cs & 0xFFFF or sregs.ss.selector != ss & 0xFFFF:
            # Both are DPL-3 64-bit segments of the monitor's GDT: same attributes, another selector.
            sregs.cs.selector, sregs.ss.selector = cs & 0xFFFF, ss & 0xFFFF
            self._kvm.set_sregs(sregs)

    def _stop(self, signal: int, why: bytes = b"") -> None:
        self._running = False
        self._snapshot()
        self._last_stop = b"T%02xthread:01;" % signal + why
        self._send(self._last_stop)
        self._serve()

    def _snapshot(self) -> None:
        source = self._engine.regs if self._ran else self._kvm.get_regs()
        ctypes.memmove(ctypes.addressof(self._regs), ctypes.addressof(source), ctypes.sizeof(ks.KvmRegs))

    def _serve(self) -> None:
        """gdb's packets until it resumes the guest (or leaves)."""
        assert self._reader is not None
        while self._connected:
            try:
                packet = self._reader.packets.get(timeout=0.5)  # a timeout: Ctrl-C and the watchdog get in
            except queue.Empty:
                continue
            if packet is None:
                self._detach()
                break
            try:
                reply = self._handle(packet)
            except (DebuggerKilled, KeyboardInterrupt):
                raise
            except Exception as exc:  # hostile input must never end the VMM: an error reply
                self._say(f"bad-{type(exc).__name__}", f"refused a malformed packet ({type(exc).__name__}: {exc})"[:200])
                reply = b"E01"
            if reply is _RESUME:
                break
            assert isinstance(reply, bytes)
            self._send(reply)
        self._resume()

    def _resume(self) -> None:
        """Registers back into the vCPU, the debug state for the next stretch of guest."""
        regs = self._engine.regs
        ctypes.memmove(ctypes.addressof(regs), ctypes.addressof(self._regs), ctypes.sizeof(ks.KvmRegs))
        self._engine.mark_regs_dirty()
        control, debugreg = 0, [0] * 8
        if self._hw and self._connected:
            control |= ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_USE_HW_BP
            for slot, addr in enumerate(self._hw):
                debugreg[slot] = addr
                debugreg[7] |= 1 << (2 * slot)  # local enable, execute, length 1
        if self._kvm_step:
            control |= ks.KVM_GUESTDBG_ENABLE | ks.KVM_GUESTDBG_SINGLESTEP
        self._kvm.set_guest_debug(control, tuple(debugreg))
        self._ran = True
        self._running = True

    # --- packets -----------------------------------------------------------------

    def _handle(self, packet: bytes) -> bytes | object:
        head = packet[:1]
        body = packet[1:]
        if head == b"?":
            return self._last_stop
        if head == b"g":
            return self._read_registers().hex().encode()
        if head == b"G":
            return self._write_registers(bytes.fromhex(body.decode()))
        if head == b"p":
            index = int(body, 16)
            return self._register_bytes(index).hex().encode() if index < len(REGISTERS) else b"E45"
        if head == b"P":
            number, _, value = body.partition(b"=")
            return self._write_register(int(number, 16), bytes.fromhex(value.decode()))
        if head == b"m":
            addr, length = (int(x, 16) for x in body.split(b","))
            return self._read_memory(addr, length).hex().encode()
        if head == b"M":
            where, _, data = body.partition(b":")
            addr, length = (int(x, 16) for x in where.split(b","))
            raw = bytes.fromhex(data.decode())
            if len(raw) != length:
                return b"E22"
            return self._write_memory(addr, raw)
        if head == b"X":
            where, _, data = body.partition(b":")
            addr, length = (int(x, 16) for x in where.split(b","))
            if len(data) != length:
                return b"E22"
            return self._write_memory(addr, data) if length else b"OK"
        if head in (b"c", b"s"):
            if body:
                self._regs.rip = int(body, 16)
            return self._step() if head == b"s" else self._continue()
        if head in (b"Z", b"z"):
            kind, addr_text, _ = body.split(b",", 2)
            return self._breakpoint(head == b"Z", int(kind), int(addr_text, 16))
        if head == b"H" or head == b"T":
            return b"OK"
        if head == b"D":
            self._send(b"OK")
            self._detach()
            return _RESUME
        if head == b"k" or packet.startswith(b"vKill"):
            self._detach()
            raise DebuggerKilled("gdb killed the guest", "run it again (a gdb `detach` lets it run on instead)")
        if head == b"q" or head == b"Q":
            return self._query(packet)
        return b""  # unsupported: gdb falls back or says so

    def _query(self, packet: bytes) -> bytes:
        if packet.startswith(b"qSupported"):
            return b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+" % (PACKET_MAX - 64)
        if packet.startswith(b"qXfer:features:read:"):
            annex, _, span = packet[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            offset, length = (int(x, 16) for x in span.split(b","))
            chunk = TARGET_XML[offset:offset + min(length, PACKET_MAX - 64)]
            return (b"l" if offset + len(chunk) >= len(TARGET_XML) else b"m") + chunk
        if packet == b"qC":
            return b"QC1"
        if packet == b"qAttached":
            return b"1"
        if packet == b"qfThreadInfo":
            return b"m1"
        if packet == b"qsThreadInfo":
            return b"l"
        if packet.startswith(b"qSymbol"):
            return b"OK"
        if packet.startswith(b"qRcmd,"):
            return self._monitor(bytes.fromhex(packet[6:].decode()).decode("utf-8", "replace"))
        return b""

    # --- registers -------------------------------------------------------------

    def _register_bytes(self, index: int) -> bytes:
        name, size = REGISTERS[index]
        if name in _GPRS:
            value = getattr(self._regs, name)
        elif name == "eflags":
            value = self._regs.rflags
        elif name in _SEGMENTS or name in ("fs_base", "gs_base") or name in _CONTROL:
            sregs = self._kvm.get_sregs()
            if name in _SEGMENTS:
                value = getattr(sregs, name).selector
            elif name in _CONTROL:
                value = getattr(sregs, name)
            else:
                value = getattr(sregs, name[:2]).base
        elif name == "fctrl":
            value = 0x37F  # the x87 state is not the guest's concern here (it uses none): its reset value
        else:
            value = 0
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _read_registers(self) -> bytes:
        return b"".join(self._register_bytes(i) for i in range(len(REGISTERS)))

    def _write_register(self, index: int, raw: bytes) -> bytes:
        if not 0 <= index < len(REGISTERS) or len(raw) != REGISTERS[index][1]:
            return b"E22"
        name = REGISTERS[index][0]
        value = int.from_bytes(raw, "little")
        if name in _GPRS:
            setattr(self._regs, name, value)
        elif name == "eflags":
            self._regs.rflags = (value & 0x3F7FD5) | 0x2  # the architecturally writable flags, bit 1 set
        elif raw != self._register_bytes(index):
            self._say("reg-" + name, f"register {name} is read-only here (only general registers, rip and eflags)")
            return b"E01"
        return b"OK"

    def _write_registers(self, raw: bytes) -> bytes:
        offset = 0
        for index, (_, size) in enumerate(REGISTERS):
            part = raw[offset:offset + size]
            if len(part) < size:
                break
            if index <= REG_INDEX["eflags"]:
                self._write_register(index, part)
            offset += size
        return b"OK"

    # --- memory ------------------------------------------------------------------

    def _gpa(self, addr: int) -> int | None:
        if self._physical:
            return addr
        control = self._engine.get_control()
        return translate(self._memory, control.cr0, control.cr3, addr)

    def _read_memory(self, addr: int, length: int) -> bytes:
        if not 0 < length <= MEMORY_MAX:
            raise ValueError(f"read of {length} bytes")
        out = bytearray()
        while len(out) < length:
            va = addr + len(out)
            gpa = self._gpa(va)
            if gpa is None:
                break
            chunk = min(length - len(out), 0x1000 - (va & 0xFFF))
            try:
                data = bytearray(self._memory.read(gpa, chunk))
            except GuestMemoryError:
                break
            for bp_va, (bp_gpa, original) in self._sw.items():  # gdb sees the code, not our int3
                if gpa <= bp_gpa < gpa + chunk:
                    data[bp_gpa - gpa] = original
            out += data
        if not out:
            raise ValueError(f"{addr:#x} is not mapped to guest memory")
        return bytes(out)

    def _writable(self, gpa: int, length: int) -> bool:
        # Only memory the guest could write itself: never a page table (nothing would validate the
        # value) or the read-only ROM, monitor and pool.
        return self._memory.writable_by_guest(gpa, length) and not self._session.mmu.is_table(gpa & ~0xFFF)

    def _write_memory(self, addr: int, data: bytes) -> bytes:
        if len(data) > MEMORY_MAX:
            return b"E22"
        done = 0
        while done < len(data):
            va = addr + done
            gpa = self._gpa(va)
            chunk = min(len(data) - done, 0x1000 - (va & 0xFFF))
            if gpa is None or not self._writable(gpa, chunk):
                self._say("write", "refused a memory write to an unmapped page, a page table or read-only memory")
                return b"E14"
            self._memory.write(gpa, data[done:done + chunk])
            done += chunk
        return b"OK"

    # --- breakpoints and execution ------------------------------------------------

    def _breakpoint(self, insert: bool, kind: int, addr: int) -> bytes:
        if kind == 0:
            if insert:
                return self._insert_sw(addr)
            self._remove_sw(addr)
            return b"OK"
        if kind == 1:
            if not insert:
                if addr in self._hw:
                    self._hw.remove(addr)
                return b"OK"
            if self._session.privilege == "deprivileged":
                self._say("hw", "hardware breakpoints do not fire at ring 3 (where this deprivileged kernel runs) "
                                "on this host's KVM; use a software breakpoint (break)")
                return b"E01"
            if len(self._hw) >= HW_SLOTS:
                return b"E28"
            if addr not in self._hw:
                self._hw.append(addr)
            return b"OK"
        return b""  # watchpoints: gdb falls back to software watchpoints

    def _insert_sw(self, va: int) -> bytes:
        if va in self._sw:
            return b"OK"
        gpa = self._gpa(va)
        if gpa is None or not self._writable(gpa, 1):
            self._say("sw", f"cannot put a breakpoint at {va:#x}: not mapped to guest-writable memory (the ROM?)")
            return b"E14"
        original = self._memory.read(gpa, 1)[0]
        self._memory.write(gpa, b"\xcc")
        self._sw[va] = (gpa, original)
        return b"OK"

    def _remove_sw(self, va: int) -> None:
        entry = self._sw.pop(va, None)
        if entry is None:
            return
        gpa, original = entry
        try:
            if self._memory.read(gpa, 1) == b"\xcc":
                self._memory.write(gpa, bytes([original]))
        except GuestMemoryError:
            pass

    def _cpl(self) -> int:
        return int(self._kvm.get_sregs().cs.dpl)

    def _step(self) -> bytes | object:
        if self._cpl() == 0:
            self._kvm_step = True  # emulated ring 0: KVM steps it (KVM_EXIT_DEBUG)
            return _RESUME
        execution = self._execution
        if execution is not None and execution.deprivileged:
            self._regs.rflags |= TF  # native ring 3: the CPU's #DB, caught on the monitor's stub
            self._tf_step = True
            return _RESUME
        self._say("step", "single step at ring 3 is not possible on this host's KVM without the deprivileged "
                          "monitor (run the guest with --privilege deprivileged)")
        return b"E01"

    def _continue(self) -> object:
        self._kvm_step = self._tf_step = False
        return _RESUME

    # --- monitor commands ---------------------------------------------------------

    def _monitor(self, command: str) -> bytes:
        words = command.split()
        try:
            text = self._monitor_text(words)
        except (ValueError, GuestMemoryError) as exc:
            text = f"error: {exc}\n"
        self._send(b"O" + text.encode().hex().encode())
        return b"OK"

    def _monitor_text(self, words: list[str]) -> str:
        if not words or words[0] == "help":
            return ("vmikit monitor commands:\n"
                    "  phys ADDR [LEN]      hex dump of guest-physical memory (LEN <= 256)\n"
                    "  translate VA         the guest-physical address of VA under the current CR3\n"
                    "  mode virtual|physical  how gdb's own memory reads and writes take addresses\n"
                    "  state                CPL, control registers and the execution model\n")
        if words[0] == "phys" and len(words) in (2, 3):
            addr = int(words[1], 0)
            length = int(words[2], 0) if len(words) == 3 else 64
            if not 0 < length <= 256:
                raise ValueError("LEN must be 1 to 256")
            data = self._memory.read(addr, length)
            return "".join(f"{addr + i:#014x}: {data[i:i + 16].hex(' ')}\n" for i in range(0, len(data), 16))
        if words[0] == "translate" and len(words) == 2:
            control = self._engine.get_control()
            gpa = translate(self._memory, control.cr0, control.cr3, int(words[1], 0))
            return f"{int(words[1], 0):#x} -> {gpa:#x}\n" if gpa is not None else "not mapped\n"
        if words[0] == "mode" and len(words) == 2 and words[1] in ("virtual", "physical"):
            self._physical = words[1] == "physical"
            return f"memory addresses are now {words[1]}\n"
        if words[0] == "state":
            sregs = self._kvm.get_sregs()
            execution = self._execution
            model = "none (no ROM)" if execution is None else (
                "deprivileged (kernel at ring 3)" if execution.deprivileged else f"{execution.privilege} (the kernel is not deprivileged yet)")
            return (f"cpl {sregs.cs.dpl}  cr0 {sregs.cr0:#x}  cr3 {sregs.cr3:#x}  cr4 {sregs.cr4:#x}  efer {sregs.efer:#x}\n"
                    f"execution model: {model}; software breakpoints: {len(self._sw)}, hardware: {len(self._hw)}\n")
        raise ValueError(f"unknown monitor command {' '.join(words)!r} (try: monitor help)")
