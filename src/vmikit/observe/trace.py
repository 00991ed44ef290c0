"""`--trace FILE.json`: every exit, call and guest stretch as Chrome/Perfetto trace events.

One process track per session (a `vmikit bench` run has one per profile), one thread track per
vCPU on it: the time inside KVM_RUN is a ``guest`` slice, every exit a slice from KVM_RUN's return
to the next KVM_RUN named by the VMI call it carried (or the exit reason and port), with the
hypervisor's own time for a call as a ``vmm`` slice inside it. Devices (ports and MMIO ranges
that exit to the VMM) get their own thread tracks; counters give exits per second and entries
per FlushQueue batch; the bench's markers (port 0xE0) are instant events.

Off by default: the engine and the hypervisor test one attribute for None per exit. On, events
go into a ring buffer of ``max_events`` (the newest are kept: what led up to the end or a crash),
stored as plain tuples and turned into JSON only when the file is written; the file's
``otherData`` says how many were recorded and dropped.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmikit import __version__
from vmikit.kvm import structs as ks
from vmikit.machine import layout

if TYPE_CHECKING:
    from vmikit.session import Session

DEFAULT_MAX_EVENTS = 500_000  # about 60 MB of JSON at most
COUNTER_WINDOW_NS = 10_000_000  # the exits/s counter: one sample per 10 ms of run
NAME_CACHE_MAX = 4096  # call names remembered per session (a guest can send 2^32 distinct IDs)
DEVICE_TID_BASE = 1000  # device tracks' thread ids, after the vCPUs'

# Kinds of stored event (the first element of each tuple).
GUEST, EXIT, VMM, DEVICE, MARK, COUNTER = range(6)

_PORT_DEVICES: tuple[tuple[int, int, str], ...] = (
    (0x3F8, 0x3FF, "serial COM1"),
    (0x20, 0x21, "PIC master"), (0xA0, 0xA1, "PIC slave"), (0x40, 0x43, "PIT"), (0x60, 0x64, "i8042"),
    (0x70, 0x71, "CMOS/RTC"), (layout.PORT_EXIT, layout.PORT_EXIT + 3, "exit port"),
    (layout.PORT_PANIC, layout.PORT_PANIC, "panic port"), (layout.PORT_BENCH, layout.PORT_BENCH + 3, "bench markers"),
    (0x510, 0x511, "fw_cfg"), (0xCF9, 0xCF9, "reset control"), (0x608, 0x60B, "ACPI PM timer"),
)
# Ports that are the hypervisor's, not a device's: their exits are calls on the vCPU track.
_HYPERVISOR_PORTS = (layout.PORT_HYPERCALL, layout.PORT_EVENT)
_MMIO_DEVICES: tuple[tuple[int, int, str], ...] = (
    (layout.PT_POOL_BASE, layout.PT_POOL_BASE + layout.PT_POOL_SIZE, "page-table pool (trapped stores)"),
    (layout.ROM_BASE, layout.ROM_END, "ROM and monitor (refused stores)"),
    (0xFEC00000, 0xFEC01000, "IOAPIC"), (0xFEE00000, 0xFEE01000, "local APIC"),
)


def port_device(port: int) -> str | None:
    if port in _HYPERVISOR_PORTS:
        return None
    for first, last, name in _PORT_DEVICES:
        if first <= port <= last:
            return name
    return f"port {port:#x}"


def mmio_device(addr: int) -> str:
    for first, end, name in _MMIO_DEVICES:
        if first <= addr < end:
            return name
    return f"mmio {addr & ~0xFFF:#x}"


class TraceRecorder:
    """The events of every session started while it is active (see ``recording``)."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.max_events = max_events
        self.events: deque[tuple[Any, ...]] = deque(maxlen=max_events)
        self.start_ns = time.perf_counter_ns()
        self.processes: dict[int, str] = {}
        self.threads: dict[tuple[int, int], str] = {}
        self.vcpus: dict[int, VcpuTrace] = {}  # by pid: what resolves call names at write time
        self._devices: dict[tuple[int, str], int] = {}

    @property
    def recorded(self) -> int:
        return sum(v.recorded for v in self.vcpus.values())

    def attach(self, session: Session, label: str) -> None:
        """Give ``session``'s vCPU and hypervisor a tracer on a new process track named ``label``."""
        pid = len(self.processes) + 1
        machine = session.machine
        self.processes[pid] = label
        self.threads[(pid, 0)] = "vCPU 0"
        vcpu = machine.vcpu
        kvm_vcpu = getattr(vcpu, "kvm_vcpu", None)
        if kvm_vcpu is None or not hasattr(vcpu, "tracer"):
            return  # an engine without the hooks: nothing to record
        trace = VcpuTrace(self, pid, 0, kvm_vcpu.run_struct, kvm_vcpu.run_addr, session)
        self.vcpus[pid] = trace
        vcpu.tracer = trace
        if session.hypervisor is not None:
            session.hypervisor.tracer = trace

    def device_tid(self, pid: int, name: str) -> int:
        tid = self._devices.get((pid, name))
        if tid is None:
            tid = DEVICE_TID_BASE + sum(1 for p, _ in self._devices if p == pid)
            self._devices[(pid, name)] = tid
            self.threads[(pid, tid)] = name
        return tid

    # --- writing -------------------------------------------------------------

    def metadata(self, command: str, partial: bool) -> dict[str, object]:
        recorded = self.recorded
        return {"tool": "vmikit", "version": __version__, "command": command, "partial": partial,
                "bounded": f"ring buffer of the newest {self.max_events} events (older ones are dropped)",
                "max_events": self.max_events, "events_recorded": recorded,
                "events_dropped": max(0, recorded - len(self.events)), "clock": "host perf_counter, µs from start"}

    def write(self, path: Path, command: str = "", partial: bool = False) -> None:
        """The trace-event JSON file (object form), written event by event."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.write('{"displayTimeUnit": "ns", "otherData": ')
            out.write(json.dumps(self.metadata(command, partial)))
            out.write(', "traceEvents": [\n')
            first = True
            for event in self._json_events():
                if not first:
                    out.write(",\n")
                out.write(json.dumps(event, separators=(",", ":")))
                first = False
            out.write("\n]}\n")
        os.replace(tmp, path)

    def _json_events(self) -> Iterator[dict[str, object]]:
        for pid, name in self.processes.items():
            yield {"ph": "M", "ts": 0, "pid": pid, "tid": 0, "name": "process_name", "args": {"name": name}}
            yield {"ph": "M", "ts": 0, "pid": pid, "tid": 0, "name": "process_sort_index", "args": {"sort_index": pid}}
        for (pid, tid), name in self.threads.items():
            yield {"ph": "M", "ts": 0, "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
        start = self.start_ns
        for event in self.events:
            kind, ts, dur, pid, tid = event[:5]
            base: dict[str, object] = {"ts": round((ts - start) / 1000, 3), "pid": pid, "tid": tid}
            vcpu = self.vcpus[pid]
            if kind == GUEST:
                yield {"ph": "X", **base, "dur": round(dur / 1000, 3), "name": "guest", "cat": "guest"}
            elif kind == EXIT:
                name, args = vcpu.describe_exit(event[5], event[6])
                yield {"ph": "X", **base, "dur": round(dur / 1000, 3), "name": name, "cat": "exit", "args": args}
            elif kind == VMM:
                yield {"ph": "X", **base, "dur": round(dur / 1000, 3), "name": "vmm", "cat": "vmm",
                       "args": {"call": vcpu.call_name(event[5]), "call_id": f"{event[5] & 0xFFFFFFFF:#010x}"}}
            elif kind == DEVICE:
                yield {"ph": "X", **base, "dur": round(dur / 1000, 3), "name": event[5], "cat": "device",
                       "args": event[6]}
            elif kind == MARK:
                yield {"ph": "i", **base, "s": "t", "name": event[5], "cat": "marker", "args": {"value": event[6]}}
            elif kind == COUNTER:
                yield {"ph": "C", **base, "name": event[5], "cat": "counter", "args": {event[5]: event[6]}}


class VcpuTrace:
    """One vCPU's recorder: ``enter``/``leave`` around KVM_RUN (the engine), ``call`` for each
    hypercall (the hypervisor). Only the cheap facts are kept per exit; names come at write time."""

    def __init__(self, recorder: TraceRecorder, pid: int, tid: int, run: ks.KvmRun, run_addr: int,
                 session: Session) -> None:
        self._push = recorder.events.append
        self._recorder = recorder
        self.pid, self.tid = pid, tid
        self._run = run
        self._io = run.exit.io
        self._mmio = run.exit.mmio
        self._regs = run.s.regs.regs
        self._run_addr = run_addr
        self.recorded = 0
        self._entered = 0
        self._returned = 0  # 0: no exit pending
        self._reason = 0
        self._detail: tuple[Any, ...] = ()
        self._window_start = 0
        self._window_exits = 0
        hv = session.hypervisor
        self._call_name: Callable[[int], str] = hv.call_name if hv is not None else (lambda cid: f"{cid:#010x}")
        self._names: dict[int, str] = {}
        self._flush_key = -1
        self._batch_invalid = 1 << 64
        self._errors: dict[int, str] = {}
        if hv is not None:
            try:
                self._flush_key = hv.spec.by_name("MMU.FlushQueue").call_id()
            except (KeyError, ValueError):
                pass
            self._errors = {value & 0xFFFF_FFFF_FFFF_FFFF: name for name, value in hv.spec.errors.items()}
            self._batch_invalid = hv.spec.errors.get("BATCH_INVALID", 1 << 64) & 0xFFFF_FFFF_FFFF_FFFF

    # --- the hot path (only when tracing) -------------------------------------

    def now(self) -> int:
        return time.perf_counter_ns()

    def enter(self) -> None:
        now = time.perf_counter_ns()
        if self._returned:
            self._close_exit(now)
        self._entered = now

    def leave(self, reason: int) -> None:
        now = time.perf_counter_ns()
        entered = self._entered
        self._push((GUEST, entered, now - entered, self.pid, self.tid))
        self.recorded += 1
        self._returned = now
        self._reason = reason
        if reason == ks.KVM_EXIT_IO:
            io = self._io
            value = 0
            if io.direction == ks.KVM_EXIT_IO_OUT and io.size <= 4:
                value = int.from_bytes(ctypes.string_at(self._run_addr + io.data_offset, io.size), "little")
            self._detail = ("io", io.direction, io.port, io.size, value)
        elif reason == ks.KVM_EXIT_MMIO:
            mmio = self._mmio
            self._detail = ("mmio", mmio.is_write, mmio.phys_addr, mmio.len)
        else:
            self._detail = ()
        self._window_exits += 1
        if now - self._window_start >= COUNTER_WINDOW_NS:
            if self._window_start:
                rate = round(self._window_exits * 1e9 / (now - self._window_start))
                self._push((COUNTER, now, 0, self.pid, self.tid, "exits/s", rate))
                self.recorded += 1
            self._window_start, self._window_exits = now, 0

    def call(self, call_id: int, status: int, results: tuple[int, ...], start_ns: int) -> None:
        """The hypervisor finished a call in this exit: name the exit after it."""
        end = time.perf_counter_ns()
        regs = self._regs
        self._push((VMM, start_ns, end - start_ns, self.pid, self.tid, call_id))
        self.recorded += 1
        detail: tuple[Any, ...] = ("call", call_id, status, results[:4], regs.rdi, regs.rsi, regs.rdx)
        if call_id >= 0 and call_id & 0xFFFF_FF00 == self._flush_key:
            applied = results[0] if status == 0 and results else 0
            error_index = results[0] if status == self._batch_invalid and results else None
            detail += (regs.rsi, applied, error_index)
            self._push((COUNTER, end, 0, self.pid, self.tid, "FlushQueue entries", applied))
            self.recorded += 1
        self._detail = detail

    def _close_exit(self, now: int) -> None:
        returned = self._returned
        detail = self._detail
        self._push((EXIT, returned, now - returned, self.pid, self.tid, self._reason, detail))
        self.recorded += 1
        if detail and detail[0] == "io":
            port = detail[2]
            if port == layout.PORT_BENCH and detail[1] == ks.KVM_EXIT_IO_OUT:
                self._push((MARK, returned, 0, self.pid, self.tid, f"mark {detail[4]:#x}", detail[4]))
                self.recorded += 1
            device = port_device(port)
            if device is not None:
                tid = self._recorder.device_tid(self.pid, device)
                args = {"port": f"{port:#x}", "dir": "out" if detail[1] else "in", "value": detail[4]}
                self._push((DEVICE, returned, now - returned, self.pid, tid, f"{'out' if detail[1] else 'in'} {port:#x}",
                            args))
                self.recorded += 1
        elif detail and detail[0] == "mmio":
            tid = self._recorder.device_tid(self.pid, mmio_device(detail[2]))
            self._push((DEVICE, returned, now - returned, self.pid, tid, "write" if detail[1] else "read",
                        {"addr": f"{detail[2]:#x}", "len": detail[3]}))
            self.recorded += 1
        self._returned = 0

    def finish(self) -> None:
        """The run loop returned: the last exit ends now."""
        if self._returned:
            self._close_exit(time.perf_counter_ns())

    # --- naming, at write time -------------------------------------------------

    def call_name(self, call_id: int) -> str:
        name = self._names.get(call_id)
        if name is None:
            try:
                name = self._call_name(call_id)
            except Exception:  # a name is a nicety; an odd ID must not lose the trace
                name = f"{call_id & 0xFFFFFFFF:#010x}"
            if len(self._names) < NAME_CACHE_MAX:
                self._names[call_id] = name
        return name

    def describe_exit(self, reason: int, detail: tuple[Any, ...]) -> tuple[str, dict[str, object]]:
        if detail and detail[0] == "call":
            call_id, status, results, a0, a1, a2 = detail[1:7]
            args: dict[str, object] = {
                "call_id": f"{call_id:#010x}" if call_id >= 0 else None,
                "args": [f"{a0:#x}", f"{a1:#x}", f"{a2:#x}"],
                "status": self._errors.get(status, f"{status:#x}"),
                "results": [f"{r:#x}" for r in results]}
            if len(detail) > 7:
                args["batch_size"], args["entries_applied"], args["error_index"] = detail[7:10]
            return self.call_name(call_id), args
        if detail and detail[0] == "io":
            _, direction, port, size, value = detail
            where = "out" if direction == ks.KVM_EXIT_IO_OUT else "in"
            return f"io {where} {port:#x}", {"port": f"{port:#x}", "size": size, "value": value}
        if detail and detail[0] == "mmio":
            _, is_write, addr, length = detail
            return f"mmio {'write' if is_write else 'read'}", {"addr": f"{addr:#x}", "len": length}
        return ks.EXIT_REASON_NAMES.get(reason, f"exit {reason}"), {"reason": reason}


# --- the active recorder: sessions started while it is set attach to it -------------------

_active: TraceRecorder | None = None


def attach_active(session: Session, label: str) -> None:
    """Called by every Session: trace it if a recording is active (``--trace``)."""
    if _active is not None:
        _active.attach(session, label)


@contextmanager
def recording(path: Path | None, max_events: int = DEFAULT_MAX_EVENTS) -> Iterator[TraceRecorder | None]:
    """Record every session started inside the block into ``path`` (written at the end, also
    after an error or Ctrl-C, marked partial); ``path`` None: nothing is recorded, nothing costs."""
    global _active
    if path is None:
        yield None
        return
    recorder = TraceRecorder(max_events)
    previous, _active = _active, recorder
    partial = True
    try:
        yield recorder
        partial = False
    finally:
        _active = previous
        try:
            recorder.write(path, " ".join(["vmikit", *sys.argv[1:]]), partial)
        except OSError as err:
            print(f"vmikit: warning: cannot write the trace {path} ({err.strerror})", file=sys.stderr)
