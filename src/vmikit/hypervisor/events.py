"""Asynchronous events (VMI 1.4, docs/events.md): alarms, console input and Send raise events on
ports; the hypervisor marks them in the shared page's ``evtchn_pending`` bitmap and, when the
guest's virtual interrupt flag allows, enters its registered callback (an upcall).

Threads: everything runs in the vCPU's thread (the run loop, hypercalls, every write into guest
memory). Alarms need no thread: the engine's wake timer (``vcpu.wake_at``, a POSIX timer that
signals the vCPU's thread) ends KVM_RUN at the earliest deadline and the run loop calls
``deliver``; a Halt sleeps until that deadline by itself. The UART's host-input thread only
calls ``console_input``, which wakes the vCPU (``vcpu.wake()``) and ends a Halt's sleep
(``_wake``). So the shared page is only ever written while the guest is stopped (one vCPU).

Bounds: ports and alarms are the spec's fixed counts; a firing is a bit, never a queue entry
(several firings before the guest acknowledges are one bit, the rest counted); a periodic
alarm the guest cannot keep up with fires once for the periods it missed; no period is
shorter than TIME_MIN_PERIOD_NS. A guest can therefore neither grow the VMM nor make it spin.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vmikit.abi.model import U64_MASK, Spec
from vmikit.engine import ControlState, Vcpu
from vmikit.engine.base import CrashRun
from vmikit.hypervisor.context import HypercallError
from vmikit.hypervisor.execution import ExecutionModel
from vmikit.hypervisor.walk import is_canonical, translate
from vmikit.machine import layout
from vmikit.memory import GuestMemory, GuestMemoryError, Region

MSR_TSC = 0x10
NEVER = 1 << 62  # a deadline (monotonic ns) that never comes
HALT_SLICE_S = 0.25  # a Halt with nothing armed re-checks for the end of the run this often
# SetAlarm converts the guest's expiry (guest TSC) to a host deadline through a (guest TSC, host
# monotonic) pair read this recently, rather than a KVM_GET_MSRS per call: on this host a vCPU
# ioctl after a sleep costs 60-190 µs of CPU, most of a halt-until-alarm cycle's. Both clocks run
# from the same TSC; over a second they drift apart by well under a µs.
TSC_SYNC_NS = 1_000_000_000


@dataclass
class Alarm:
    deadline_ns: int  # host monotonic
    period_ns: int  # 0: one-shot
    fired: int = 0


@dataclass
class EventStats:
    upcalls: int = 0
    alarm_fires: int = 0
    alarm_missed: int = 0  # periods a periodic alarm skipped because the guest had not kept up
    console_events: int = 0
    sends: int = 0
    dropped: int = 0  # source events with no port bound
    deferred: int = 0  # deliveries left pending (vif = 0, user mode, masked)
    halts: int = 0
    halt_seconds: float = 0.0
    by_port: dict[int, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"upcalls": self.upcalls, "alarm_fires": self.alarm_fires, "alarm_missed": self.alarm_missed,
                "console_events": self.console_events, "sends": self.sends, "dropped": self.dropped,
                "deferred": self.deferred, "halts": self.halts, "halt_seconds": round(self.halt_seconds, 6),
                "by_port": {str(p): n for p, n in sorted(self.by_port.items())}}


class Events:
    """One vCPU's event state (bindings, masks, callback, alarms) and its delivery."""

    def __init__(self, spec: Spec, memory: GuestMemory, vcpu: Vcpu, execution: ExecutionModel) -> None:
        c = spec.constants
        self.ports = c["EVTCHN_PORTS"].value
        self.alarm_count = c["TIME_ALARMS"].value
        self.min_period_ns = c["TIME_MIN_PERIOD_NS"].value
        self.source_console = c["EVTCHN_SOURCE_CONSOLE"].value
        self.source_alarm = c["EVTCHN_SOURCE_ALARM"].value
        self.unbound = c["EVTCHN_UNBOUND"].value
        self.frame_size = c["UPCALL_FRAME_SIZE"].value
        shared = spec.shared
        assert shared is not None
        page = getattr(execution, "shared_page", layout.SHARED_PAGE)  # this vCPU's shared page
        # The page's region, found once: these fields are read and written at every delivery, and
        # a lookup through GuestMemory per access was a good part of a halt-until-alarm cycle's CPU.
        # Found at first use: a board without the ROM data area (a unit test's) has no shared page,
        # and a call that needs it then fails like any guest access outside memory (BAD_ADDRESS).
        self._page = page
        self._region: Region | None = None
        self._pending_off = shared.offset("evtchn_pending")
        self._mask_off = shared.offset("evtchn_mask")
        self._upcalls_off = shared.offset("upcalls")
        self._dropped_off = shared.offset("evtchn_dropped")
        self.memory = memory
        self.vcpu = vcpu
        self.execution = execution
        self.bindings: dict[int, int] = {}  # source -> port
        self.mask = 0
        self.callback = 0
        self.aware = False  # the guest used a 1.4 call: the page's 1.4 fields are its to read
        self.alarms: list[Alarm | None] = [None] * self.alarm_count
        self.stats = EventStats()
        self.next_deadline = NEVER
        self._timer_at = NEVER  # what the engine's wake timer is armed for
        self.signal = False  # something may be deliverable: the next hypercall return looks
        self._console = False  # console input arrived (latched until a port is bound to it)
        # Ends a Halt's sleep: a lock used as a binary semaphore (released = set). A plain lock's
        # timed acquire costs this host about half the CPU of threading.Event.wait per sleep.
        self._wake = threading.Lock()
        self._wake.acquire()
        self.halting = False  # the vCPU's thread sleeps in halt()
        self._tsc_hz = 0
        self._sync_tsc = 0  # guest TSC ...
        self._sync_ns = -TSC_SYNC_NS  # ... and host monotonic ns no earlier than that reading
        # What the upcall at a Halt's return needs, found by halt() before it sleeps: (callback,
        # gpa of the frame), or None. Valid for that one return only.
        self._prepared: tuple[int, int] | None = None
        vcpu.on_wake = self.deliver

    @property
    def tsc_hz(self) -> int:
        """The guest TSC's frequency (KVM_GET_TSC_KHZ), asked once."""
        if not self._tsc_hz:
            self._tsc_hz = (self.vcpu.tsc_khz() or 0) * 1000 or 1_000_000_000
        return self._tsc_hz

    # --- other threads ------------------------------------------------------------

    def kick(self) -> None:
        """Any thread: make the vCPU look at its events soon (and end a Halt)."""
        try:
            self._wake.release()
        except RuntimeError:
            pass  # already released: the next sleep ends at once
        if not self.halting:  # a Halt looks by itself: no wasted exit after it returns
            self.vcpu.wake()

    def console_input(self) -> None:
        """The UART's host-input thread: bytes arrived for COM1."""
        self._console = True
        self.signal = True
        if self.source_console in self.bindings:
            self.kick()

    def close(self) -> None:
        if self._timer_at != NEVER:
            self._arm(NEVER)
        if self.vcpu.on_wake == self.deliver:
            self.vcpu.on_wake = None

    # --- the guest's calls ---------------------------------------------------------

    def _view(self, off: int) -> tuple[memoryview, int]:
        region = self._region
        if region is None:
            region = self._region = self.memory.region_for(self._page, 0x1000)
        return region.view, self._page - region.gpa + off

    def _get(self, off: int) -> int:
        view, at = self._view(off)
        return int.from_bytes(view[at:at + 8], "little")

    def _put(self, off: int, value: int) -> None:
        view, at = self._view(off)
        view[at:at + 8] = (value & U64_MASK).to_bytes(8, "little")

    def check_port(self, port: int) -> None:
        if not 0 <= port < self.ports:
            raise HypercallError("INVALID_ARGUMENT")

    def bind(self, source: int, port: int) -> None:
        known = source == self.source_console or 0 <= source - self.source_alarm < self.alarm_count
        if not known:
            raise HypercallError("INVALID_ARGUMENT")
        self.aware = True
        if port == self.unbound:
            self.bindings.pop(source, None)
            return
        self.check_port(port)
        self.bindings[source] = port
        self.signal = True  # console input latched before the bind is delivered now

    def set_mask(self, port: int, masked: bool) -> None:
        self.check_port(port)
        self.aware = True
        self.mask = self.mask | (1 << port) if masked else self.mask & ~(1 << port)
        self._put(self._mask_off, self.mask)
        self.signal = True

    def set_callback(self, entry: int) -> None:
        if entry and not self._code_ok(entry):
            raise HypercallError("BAD_ADDRESS")
        self.aware = True
        self.callback = entry
        self.signal = True

    def _code_ok(self, entry: int, control: ControlState | None = None) -> bool:
        """Whether ``entry`` is guest RAM, mapped in the current tables and not a page table: code
        the kernel itself could jump to. Checked again at every upcall (tables change)."""
        if not is_canonical(entry):
            return False
        control = control or self.vcpu.get_control()
        gpa = translate(self.memory, control.cr0, control.cr3, entry)
        if gpa is None or not self.memory.is_ram(gpa):
            return False
        if self.execution._is_table(gpa & ~0xFFF):
            raise HypercallError("PERMISSION")
        return True

    def send(self, port: int) -> None:
        """EventChannel.Send queued a value on ``port``: in upcall mode it is an event too."""
        self.stats.sends += 1
        if self.aware:
            self._raise(port)
            self.signal = True

    def guest_tsc(self) -> int:
        tsc = self.vcpu.get_msr(MSR_TSC)
        if tsc is None:
            raise HypercallError("NOT_SUPPORTED")
        return tsc

    def _tsc_now(self) -> tuple[int, int]:
        """(guest TSC, host monotonic ns) for now, the TSC never ahead of the real one (an alarm
        may then fire a little late, never early). Deprivileged, the kernel cannot write its TSC,
        so a pair read within TSC_SYNC_NS is extrapolated; at ring 0 (wrmsr is the kernel's) and
        when the pair is older, the guest TSC is read."""
        now_ns = time.monotonic_ns()
        if now_ns - self._sync_ns < TSC_SYNC_NS and self.execution.deprivileged:
            return self._sync_tsc + (now_ns - self._sync_ns) * self.tsc_hz // 1_000_000_000, now_ns
        tsc, now_ns = self.guest_tsc(), time.monotonic_ns()  # the clock read after: the pair errs late
        if self.execution.deprivileged:  # kept only where the kernel cannot change its TSC meanwhile
            self._sync_tsc, self._sync_ns = tsc, now_ns
        return tsc, now_ns

    def set_alarm(self, alarm: int, expiry: int, period: int) -> None:
        if not 0 <= alarm < self.alarm_count:
            raise HypercallError("INVALID_ARGUMENT")
        period_ns = period * 1_000_000_000 // self.tsc_hz if period else 0
        if period and period_ns < self.min_period_ns:
            raise HypercallError("INVALID_ARGUMENT")
        now_tsc, now_ns = self._tsc_now()
        ahead = expiry - now_tsc
        delay_ns = ahead * 1_000_000_000 // self.tsc_hz if ahead > 0 else 0
        self.aware = True
        self.alarms[alarm] = Alarm(now_ns + min(delay_ns, NEVER // 2), period_ns)
        self._reschedule()

    def cancel_alarm(self, alarm: int) -> int:
        if not 0 <= alarm < self.alarm_count:
            raise HypercallError("INVALID_ARGUMENT")
        found = self.alarms[alarm]
        self.alarms[alarm] = None
        self._reschedule()
        return found.fired if found is not None else 0

    # --- firing and delivery (the vCPU's thread) ---------------------------------------

    def _reschedule(self) -> None:
        self.next_deadline = min((a.deadline_ns for a in self.alarms if a is not None), default=NEVER)
        if not self.halting and self.next_deadline != self._timer_at:
            self._arm(self.next_deadline)

    def _arm(self, deadline: int) -> None:
        self._timer_at = deadline
        self.vcpu.wake_at(None if deadline == NEVER else deadline)

    def due(self) -> bool:
        return self.signal or time.monotonic_ns() >= self.next_deadline

    def _raise(self, port: int) -> None:
        self._put(self._pending_off, self._get(self._pending_off) | 1 << port)
        self.stats.by_port[port] = self.stats.by_port.get(port, 0) + 1

    def _source(self, source: int) -> None:
        port = self.bindings.get(source)
        if port is None:
            self.stats.dropped += 1
            self._put(self._dropped_off, self.stats.dropped)
            return
        self._raise(port)

    def collect(self) -> None:
        """Turn due alarms and arrived console input into pending bits."""
        self.signal = False
        now = time.monotonic_ns()
        if now >= self.next_deadline:
            for n, a in enumerate(self.alarms):
                if a is None or a.deadline_ns > now:
                    continue
                a.fired += 1
                self.stats.alarm_fires += 1
                self._source(self.source_alarm + n)
                if a.period_ns:
                    missed = (now - a.deadline_ns) // a.period_ns
                    self.stats.alarm_missed += missed
                    a.deadline_ns += (missed + 1) * a.period_ns
                else:
                    self.alarms[n] = None
            self._reschedule()
        if self._console and self.source_console in self.bindings:
            self._console = False
            self.stats.console_events += 1
            self._source(self.source_console)

    def deliverable(self) -> int:
        """Pending, unmasked ports (the guest may have cleared bits since)."""
        return self._get(self._pending_off) & ~self.mask & U64_MASK

    def deliver(self) -> None:
        """At a hypercall's return or a wake-up: collect, then make the upcall if the guest can take it."""
        prepared, self._prepared = self._prepared, None  # only for the return of the Halt that made it
        self.collect()
        if not self.callback or not self.deliverable():
            return
        execution = self.execution
        if not execution.vif or execution.user_mode():
            execution.set_pending(True)
            self.stats.deferred += 1
            return
        self._upcall(prepared)

    def _frame_gpa(self, control: ControlState) -> int | None:
        """Where the upcall frame goes (the kernel's stack below RSP, where the kernel itself could
        write: never a table or the ROM), if it lies in one page; otherwise None. Raises CrashRun if
        the callback or the stack is not fit for an upcall."""
        top = (self.vcpu.regs.rsp - self.frame_size) & U64_MASK
        if not self._code_ok(self.callback, control):
            raise CrashRun(f"cannot make an upcall: the callback {self.callback:#x} is no longer mapped")
        try:
            if (top & 0xFFF) + self.frame_size <= 0x1000:
                return self.execution._translate(top, self.frame_size, control)
            for offset in range(0, self.frame_size, 8):  # straddles a page: each word checked on its own
                self.execution._translate(top + offset, 8, control)
        except (HypercallError, GuestMemoryError):
            raise CrashRun(f"cannot make an upcall: the kernel stack at {top:#x} is not writable RAM") from None
        return None

    def _prepare(self) -> None:
        """Halt, before it sleeps: check the callback and find the frame's gpa for the upcall at the
        call's return, while the host's caches are warm (this host pays a vCPU ioctl and Python code
        several times over right after a sleep: about 20 µs of CPU for the ioctl before, 90 after).
        Nothing it depends on changes meanwhile: the vCPU is stopped in this call, RSP and the
        tables stay as they are. Any doubt (a frame across pages, a refused check) leaves the
        upcall to check everything itself."""
        self._prepared = None
        if not self.callback:
            return
        try:
            gpa = self._frame_gpa(self.vcpu.get_control())
        except (CrashRun, HypercallError):
            return
        if gpa is not None:
            self._prepared = (self.callback, gpa)

    def _upcall(self, prepared: tuple[int, int] | None = None) -> None:
        regs = self.vcpu.regs
        top = (regs.rsp - self.frame_size) & U64_MASK
        frame = (regs.rflags & U64_MASK).to_bytes(8, "little") + (regs.rip & U64_MASK).to_bytes(8, "little")
        if prepared is not None and prepared[0] == self.callback:
            self.memory.write(prepared[1], frame)
        else:
            control = self.vcpu.get_control()  # one ioctl for every check
            gpa = self._frame_gpa(control)
            try:
                if gpa is not None:
                    self.memory.write(gpa, frame)
                else:
                    for offset in range(0, self.frame_size, 8):
                        self.memory.write(self.execution._translate(top + offset, 8, control), frame[offset:offset + 8])
            except (HypercallError, GuestMemoryError):
                raise CrashRun(f"cannot make an upcall: the kernel stack at {top:#x} is not writable RAM") from None
        self.execution.set_vif(False)
        self.execution.set_pending(False)
        self.stats.upcalls += 1
        self._put(self._upcalls_off, self.stats.upcalls)
        regs.rsp, regs.rip = top, self.callback
        self.vcpu.mark_regs_dirty()

    # --- Halt ---------------------------------------------------------------------------

    def halt(self) -> None:
        """CPU.Halt: enable events (vif = 1, as `sti; hlt` does, or Xen's SCHEDOP_block), then
        sleep (no host CPU) until a port can be delivered or the run must end; the hypercall's
        return makes the upcall. A guest that masks, checks its condition, then halts loses no
        wake-up and pays one exit."""
        self.stats.halts += 1
        if self.aware:
            self.execution.set_vif(True)
        self._prepare()
        start = time.perf_counter()
        self.halting = True
        if self._timer_at != NEVER:
            self._arm(NEVER)  # the sleep below ends at the deadline by itself
        try:
            self._sleep()
        finally:
            self.halting = False
            self._reschedule()
        self.stats.halt_seconds += time.perf_counter() - start
        self.signal = True  # the hypercall's return delivers it

    def _sleep(self) -> None:
        # Nothing armed that could wake it (no alarm, no console binding): return at once, as
        # Halt always did, rather than sleep until the watchdog.
        while self.next_deadline != NEVER or self.source_console in self.bindings:
            self._wake.acquire(False)  # cleared: a kick from now on ends the wait below
            self.collect()
            if self.deliverable() or self.vcpu.kicked:
                break
            left = (self.next_deadline - time.monotonic_ns()) / 1e9
            if left > 0:
                self._wake.acquire(True, min(left, HALT_SLICE_S))

    def summary(self) -> dict[str, object]:
        return {**self.stats.summary(), "callback": self.callback,
                "bound": {str(s): p for s, p in sorted(self.bindings.items())},
                "wakeups": getattr(self.vcpu, "wakeups", 0)}
