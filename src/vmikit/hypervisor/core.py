"""The hypervisor: dispatch of VMI hypercalls by call ID, with per-call counters.

The hot path is ``on_hypercall``: one dict lookup on the call ID with its
annotation masked off, the handler, and the result registers. Every rejection
is a spec error in RAX; nothing a guest passes can raise out of here.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vmikit.abi.model import U64_MASK, Call, Spec
from vmikit.abi.spec import load_spec
from vmikit.engine import StopRun, Vcpu
from vmikit.hypervisor.context import CallContext, HypercallError
from vmikit.hypervisor.execution import ExecutionModel
from vmikit.hypervisor.experimental import EXPERIMENTAL_FAMILY, ExperimentalCalls
from vmikit.hypervisor import clock, cpu, eventchannel, mmu, query, segmentation
from vmikit.hypervisor.events import Events
from vmikit.hypervisor.mmu import Mmu
from vmikit.hypervisor.registry import FamilyHandlers, Handler
from vmikit.memory import GuestMemory, GuestMemoryError

ANNOTATION_MASK = 0xFF
RESERVED_MASK = 0xFF00
KEY_MASK = 0xFFFF_FF00  # family, call and reserved byte: a non-zero reserved byte never matches

# A guest can send any of 2^32 IDs: refused IDs without a route are counted per bucket, never per ID,
# so the counters stay bounded (known routes times 256 annotation bytes at most). Negative keys are
# not call IDs.
BUCKET_BAD_SIZE = -1
BUCKET_UNKNOWN = -2
BUCKET_RESERVED = -3
BUCKET_NAMES = {BUCKET_BAD_SIZE: "refused: access not 32 bits wide (INVALID_ARGUMENT)",
                BUCKET_UNKNOWN: "refused: unknown call IDs (NOT_SUPPORTED)",
                BUCKET_RESERVED: "refused: reserved bits set (RESERVED_BITS)"}

FAILURES_KEPT = 100  # handler failures (and audit findings) kept for the report
FAILURES_PRINTED = 10  # ... and printed to stderr
FAILURE_TEXT_MAX = 500  # characters of one failure's note (an exception's text can be huge)


def keep_first(kept: list[str], new: list[str], limit: int = FAILURES_KEPT) -> None:
    """Append to ``kept`` what fits under ``limit``: findings a guest can repeat at will stay bounded."""
    kept += new[:max(0, limit - len(kept))]


class CallTracer(Protocol):
    def now(self) -> int: ...

    def call(self, call_id: int, status: int, results: tuple[int, ...], start_ns: int) -> None: ...


@dataclass(frozen=True)
class Route:
    name: str  # "MMU.SetPTE", or "Experimental.<name>"
    handler: Handler
    annotations_honoured: int
    user: bool = False  # safe from guest user mode (the spec's `user`); every other call: PERMISSION
    masks: tuple[int, int, int] = (U64_MASK, U64_MASK, U64_MASK)  # per argument: the bits its type has


@dataclass(frozen=True)
class _CpuState:
    vcpu: Vcpu
    ctx: CallContext
    execution: ExecutionModel


def _family_modules() -> list[FamilyHandlers]:
    return [cpu.HANDLERS, segmentation.HANDLERS, mmu.HANDLERS, query.HANDLERS, eventchannel.HANDLERS,
            clock.HANDLERS]


class Hypervisor:
    """Dispatches hypercalls for one guest."""

    def __init__(self, spec: Spec | None = None, *, honour_annotations: bool = True,
                 experimental: ExperimentalCalls | None = None, mmu: Mmu | None = None,
                 audit: bool = False, privilege: str = "ring0") -> None:
        self.spec = spec or load_spec()
        self.honour_annotations = honour_annotations
        self.experimental = experimental or ExperimentalCalls()
        self.routes: dict[int, Route] = {}
        self.state: dict[str, object] = {}  # per-guest state of families that keep some (EventChannel)
        self._queueable: np.ndarray | None = None
        self.calls: Counter[int] = Counter()  # by full call ID (or bucket): every call, queued ones included
        self.exits: Counter[int] = Counter()  # by full call ID (or bucket): calls that cost an exit
        self.handler_failures: list[str] = []  # the first FAILURES_KEPT of them
        self.handler_failure_count = 0  # all of them
        self._errors = {name: value & U64_MASK for name, value in self.spec.errors.items()}
        self._mmu = mmu
        self.audit = audit  # walk every registered table after each update batch (a debug mode)
        self.audit_problems: list[str] = []  # the first FAILURES_KEPT
        self.audit_problem_count = 0
        self.audits = 0
        self._build_routes()
        self._ctx: CallContext | None = None
        self._vcpu: Vcpu | None = None
        self._cpus: list[_CpuState] = []
        self._cpu = 0  # the index of the vCPU whose state is current
        self._current: Callable[[], int] | None = None  # several vCPUs: which one is calling
        self.started_aps: set[int] = set()  # vCPUs SetInitialAPState started
        # The board's: release its exit lock around a sleep (Session sets it; one vCPU: a no-op).
        self.release_exit_lock: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.shootdowns = 0  # FlushTLBMulti/InvalPageMulti calls that flushed
        self.shootdown_targets = 0
        self.privilege = privilege
        self.execution: ExecutionModel | None = None  # after attach()
        self.events: Events | None = None  # after attach(), with an interface that has them (1.4)
        self.tracer: CallTracer | None = None  # vmikit.observe.trace: each call's name, status and VMM time

    # --- tables ------------------------------------------------------------

    def _build_routes(self) -> None:
        for module in _family_modules():
            for name, handler in module.handlers.items():
                try:
                    call = self.spec.by_name(f"{module.family}.{name}")
                except (KeyError, ValueError):
                    continue  # an older interface version without this call: the hypervisor does not offer it
                self.routes[call.call_id()] = Route(call.qualified_name, handler, self._honoured(call),
                                                    call.user, self._masks(call))
        for number, legacy_call in self.spec.legacy.items():
            route = self.routes.get(legacy_call.call_id())
            if route is not None:
                self.routes[number << 16] = route  # family 0x00: the flat VMI 3.0 number
        for exp in self.experimental.calls.values():
            self.routes[exp.call_id] = Route(f"Experimental.{exp.name}", exp.handler, 0)

    def _masks(self, call: Call) -> tuple[int, int, int]:
        # The spec: a 32-bit argument ignores the upper half of its 64-bit register.
        bits = [self.spec.types[arg.type].bits if arg.type in self.spec.types else 64 for arg in call.args[:3]]
        m0, m1, m2 = [(1 << b) - 1 for b in bits] + [U64_MASK] * (3 - len(bits))
        return m0, m1, m2

    def _honoured(self, call: Call) -> int:
        return self.spec.annotation_mask(call) if self.honour_annotations else 0

    def queueable_keys(self) -> np.ndarray:
        """Call IDs (annotation masked off) that may appear in a FlushQueue batch."""
        if self._queueable is None:
            from vmikit.hypervisor.mmu import set_pte

            keys = [key for key, route in self.routes.items() if route.handler is set_pte]
            self._queueable = np.array(sorted(keys), dtype=np.uint32)
        return self._queueable

    def route_for(self, call_id: int) -> Route | None:
        return self.routes.get(call_id & KEY_MASK)

    def has_family(self, family: int) -> bool:
        if family == EXPERIMENTAL_FAMILY:
            return bool(self.experimental.calls)
        return any(key >> 24 == family for key in self.routes) and family in self.spec.families

    # --- the port ------------------------------------------------------------

    def attach(self, memory: GuestMemory, vcpu: Vcpu,
               flush_translations: Callable[[list[tuple[int, int]]], str] | None = None, *,
               vcpus: list[Vcpu] | None = None, current: Callable[[], int] | None = None) -> None:
        """``vcpus`` (vCPU 0 first) and ``current`` (the index of the vCPU whose exit is being
        handled): a machine of several vCPUs, each with its own context and execution model,
        under an SMP ROM (per-CPU areas through GS); the handlers see the calling CPU's."""
        flush = flush_translations or (lambda stale: "none")
        everyone = vcpus or [vcpu]
        percpu = len(everyone) > 1
        self._current = current if percpu else None
        self._cpus = [_CpuState(v, CallContext(self.spec, memory, v, self),
                                ExecutionModel(self.privilege, self.spec, memory, v, flush,
                                               lambda page: self.mmu.is_table(page), cpu=i, percpu=percpu))
                      for i, v in enumerate(everyone)]
        self._cpu = 0
        self._vcpu, self._ctx, self.execution = self._cpus[0].vcpu, self._cpus[0].ctx, self._cpus[0].execution
        if self._mmu is None:
            self._mmu = Mmu(memory)
        if self.spec.shared is not None and "TIME_ALARMS" in self.spec.constants:
            # Events and upcalls go to vCPU 0 (the other vCPUs' calls that would deliver one wait).
            self.events = Events(self.spec, memory, self._vcpu, self.execution)

    def _select(self) -> None:
        """Several vCPUs: make the calling vCPU's context, engine vCPU and execution model the
        current ones (the board hands over one exit at a time, under its lock)."""
        assert self._current is not None
        index = self._current()
        if index != self._cpu:
            state = self._cpus[index]
            self._cpu = index
            self._vcpu, self._ctx, self.execution = state.vcpu, state.ctx, state.execution

    @contextlib.contextmanager
    def others_may_run(self) -> Iterator[None]:
        """Around a handler's sleep: the other vCPUs' exits are handled meanwhile (the board's
        lock is released), and the calling vCPU's state is current again afterwards."""
        with self.release_exit_lock():
            yield
        if self._current is not None:
            self._cpu = -1  # whatever ran meanwhile: select afresh
            self._select()

    def on_event(self, port: int, size: int, value: int) -> None:
        """The event port (a deprivileged kernel's exceptions and syscalls): the calling vCPU's model."""
        if self._current is not None:
            self._select()
        assert self.execution is not None, "attach() first"
        self.execution.on_event(port, size, value)

    def executions(self) -> list[ExecutionModel]:
        return [state.execution for state in self._cpus]

    @property
    def percpu(self) -> bool:
        """Several vCPUs, so an SMP ROM: per-CPU areas through GS (the guest may not move GS)."""
        return len(self._cpus) > 1

    @property
    def cpu_index(self) -> int:
        """The calling vCPU (0 with one)."""
        return self._cpu

    @property
    def cpu_count(self) -> int:
        return max(1, len(self._cpus))

    def start_ap(self, cpu: int, rip: int, rsp: int, arg: int, cr3: int) -> None:
        """CPU.SetInitialAPState, checked: vCPU ``cpu`` starts in the caller's state."""
        if not 0 < cpu < len(self._cpus) or cpu == self._cpu or cpu in self.started_aps:
            raise HypercallError("INVALID_ARGUMENT")
        assert self._vcpu is not None and self.execution is not None
        self.started_aps.add(cpu)
        ap = self._cpus[cpu]
        if self.execution.deprivileged:  # the AP's kernel starts deprivileged too, never at ring 0
            tr, msrs = ap.execution.adopt(self.execution)
            ap.vcpu.start_at(self._vcpu, rip, rsp, arg, cr3, tr=tr, msrs=msrs)
        else:
            ap.vcpu.start_at(self._vcpu, rip, rsp, arg, cr3)

    def shootdown(self, cpus: int) -> int:
        """MMU.FlushTLBMulti/InvalPageMulti: the number of existing CPUs in the mask, each of whose
        TLB is flushed before the call returns (or, halted, before it next runs). On KVM that is
        one VM-wide drop of cached translations: KVM then asks every vCPU for a TLB flush, which
        a running one takes at once (KVM kicks it) and a sleeping one at its next entry. A
        deprivileged kernel whose tables the hypervisor updates (trap, direct, shadow) has none
        stale to drop: every call that changed an entry dropped them before it returned."""
        targets = (cpus & ((1 << len(self._cpus)) - 1)).bit_count()
        if targets:
            assert self.execution is not None
            if not (self.execution.deprivileged and isinstance(self.mmu, mmu.DirectMmu)):
                self.execution.flush_all()
            self.shootdowns += 1
            self.shootdown_targets += targets
        return targets

    def execution_model(self) -> ExecutionModel:
        assert self.execution is not None, "attach() first"
        return self.execution

    def console_input(self) -> None:
        """Any thread: host bytes arrived at COM1 (the console event source)."""
        if self.events is not None:
            self.events.console_input()

    def close(self) -> None:
        """Stop the helper threads (the alarm clock)."""
        if self.events is not None:
            self.events.close()

    @property
    def deprivileged(self) -> ExecutionModel | None:
        """The execution model while the kernel is deprivileged (its descriptor tables, syscall
        MSRs and interrupt flag are then virtual state the families read and write), else None."""
        execution = self.execution
        return execution if execution is not None and execution.deprivileged else None

    @property
    def mmu(self) -> Mmu:
        assert self._mmu is not None, "attach() first"
        return self._mmu

    def run_audit(self) -> None:
        self.audits += 1
        problems = self.mmu.audit()
        self.audit_problem_count += len(problems)
        keep_first(self.audit_problems, problems)

    def on_hypercall(self, port: int, size: int, value: int) -> None:
        if self._current is not None:
            self._select()
        ctx = self._ctx
        assert ctx is not None and self._vcpu is not None, "attach() first"
        regs = self._vcpu.regs
        tracer = self.tracer
        start = tracer.now() if tracer is not None else 0
        results: tuple[int, ...] = ()
        if size != 4:
            status = self._errors["INVALID_ARGUMENT"]
            self.calls[BUCKET_BAD_SIZE] += 1
            self.exits[BUCKET_BAD_SIZE] += 1
        else:
            route = self.routes.get(value & KEY_MASK)
            key = value if route is not None else BUCKET_RESERVED if value & RESERVED_MASK else BUCKET_UNKNOWN
            self.calls[key] += 1
            self.exits[key] += 1
            execution = self.execution
            if route is None:
                status = self._errors["RESERVED_BITS" if value & RESERVED_MASK else "NOT_SUPPORTED"]
            elif not route.user and execution is not None and execution.user_mode():
                status = self._errors["PERMISSION"]  # guest user mode: only the user-safe calls
                execution.stats.user_refused += 1
            else:
                ctx.call_id = value
                m0, m1, m2 = route.masks
                status, results = self.invoke(route, ctx, regs.rdi & m0, regs.rsi & m1, regs.rdx & m2)
            # Under a deprivileged ROM (no invlpg/CR3 tails) the hypervisor drops stale translations
            # itself, also for a kernel that never called Deprivilege (an older guest at ring 0).
            if execution is not None and execution.privilege == "deprivileged":
                stale = self.mmu.take_stale()
                if stale:
                    execution.flush(stale)  # no stale translation survives the call that made it
        regs.rax = status
        # Written out, not through a generator: on this host every bytecode of the exit path is
        # paid for cold (the tuple-and-genexpr form cost about 1 µs warm, this about 0.35).
        if not results:
            regs.r8 = regs.r9 = regs.r10 = regs.r11 = 0
        elif len(results) == 1:
            regs.r8 = results[0] & U64_MASK
            regs.r9 = regs.r10 = regs.r11 = 0
        else:
            padded = results + (0, 0, 0)
            regs.r8, regs.r9 = padded[0] & U64_MASK, padded[1] & U64_MASK
            regs.r10, regs.r11 = padded[2] & U64_MASK, padded[3] & U64_MASK
        events = self.events
        if events is not None and self._cpu == 0 and events.due():
            events.deliver()  # an upcall saves rip/rflags and runs before the call "returns"
        self._vcpu.mark_regs_dirty()
        if tracer is not None:
            tracer.call(value if size == 4 else BUCKET_BAD_SIZE, status, results, start)

    def invoke(self, route: Route, ctx: CallContext, a0: int, a1: int, a2: int) -> tuple[int, tuple[int, ...]]:
        """(status, results) of one call; also used for batch entries."""
        try:
            return 0, route.handler(ctx, a0, a1, a2)
        except HypercallError as err:
            return self._errors[err.error], err.results
        except StopRun:
            raise
        except GuestMemoryError:
            return self._errors["BAD_ADDRESS"], ()
        except Exception as exc:  # a bug in a handler (often a user's experimental one) must not kill the VMM
            self._handler_failed(f"{route.name} raised {type(exc).__name__}: {exc}"[:FAILURE_TEXT_MAX])
            return self._errors["INVALID_ARGUMENT"], ()

    def _handler_failed(self, note: str) -> None:
        # A guest can make a broken handler fail on every call: keep and print a bounded few.
        self.handler_failure_count += 1
        keep_first(self.handler_failures, [note])
        if self.handler_failure_count <= FAILURES_PRINTED:
            print(f"vmikit: warning: hypercall handler {note}; the guest got INVALID_ARGUMENT", file=sys.stderr)
        elif self.handler_failure_count == FAILURES_PRINTED + 1:
            print("vmikit: warning: further hypercall handler failures are counted (--stats, --json), not printed",
                  file=sys.stderr)

    # --- reporting -------------------------------------------------------------

    def call_name(self, call_id: int) -> str:
        if call_id in BUCKET_NAMES:
            return BUCKET_NAMES[call_id]
        route = self.route_for(call_id)
        if route is None:
            legacy = self.spec.legacy_name(call_id >> 16 & 0xFF) if call_id >> 24 == 0 and not call_id & 0xFF00 else None
            return f"Legacy.{legacy}" if legacy else f"{call_id:#010x}"
        name = route.name
        if call_id >> 24 == 0:
            name = f"Legacy.{self.spec.legacy_name(call_id >> 16 & 0xFF)}->{name}"
        names, unknown = self.spec.annotation_names(call_id & ANNOTATION_MASK)
        suffix = "".join(f"|{n}" for n in names) + (f"|{unknown:#x}" if unknown else "")
        return name + suffix

    def stats(self) -> dict[str, dict[str, int | None]]:
        """Counts by call name; a bucket of refused IDs has the id None."""
        return {
            self.call_name(cid): {"id": cid if cid >= 0 else None, "calls": self.calls[cid],
                                  "exits": self.exits.get(cid, 0)}
            for cid in sorted(self.calls)
        }
