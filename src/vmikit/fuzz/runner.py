"""Run the fuzzing guest and judge the hypervisor.

The host watches every hypercall itself (a thin wrapper around the dispatcher on
the hypercall port): it counts statuses, notices the first handler exception
and the first undocumented status, and runs the page-table auditor after every
call that could change guest memory (families Legacy, Segmentation, MMU and
Experimental, and unknown families), including rejected ones, so a handler that
writes before it refuses is caught too. ``audit_every=K`` audits only every
K-th such call (the last one always): the auditor walks every registered table.

A run passes when the guest finished its calls, no handler raised, the
watchdog did not fire, the auditor found nothing, every status was a spec
error, the guest saw no surprise, and valid calls still worked at the end.

While it runs, a thread samples the guest's own counters (``struct fuzz_stats``
in guest memory, at the address its first line prints) for progress: no exit
is added. Ctrl-C ends the run with ``FuzzInterrupted``, a KeyboardInterrupt
that carries the report of what was measured so far (``partial``).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmikit.abi.model import U64_MASK
from vmikit.background import Background
from vmikit.errors import GuestCrash, GuestHang
from vmikit.fuzz.guestlog import RECORD, GuestLog, GuestStats, describe_record, stats_size
from vmikit.hypervisor import ExperimentalCalls, Hypervisor
from vmikit.machine import layout
from vmikit.session import Session

MUTATING_FAMILIES = frozenset({0x00, 0x02, 0x03, 0xFF})
KNOWN_FAMILIES = frozenset({0x00, 0x01, 0x02, 0x03, 0x04, 0x05})
FUZZ_PAGING = ("direct", "shadow")


@dataclass(frozen=True)
class FuzzConfig:
    calls: int = 20000
    seed: int = 1
    paging: str = "direct"
    annotations: str = "honour"
    privilege: str = "deprivileged"  # where the guest kernel runs: ring 3 under the hypervisor, or ring 0
    stores: bool = True  # plain guest stores into the ROM, the pool, the shadow area, unmapped MMIO
    audit_every: int = 1
    memory_mib: int = 128
    timeout: float | None = None  # default: generous, scaled with calls
    experimental: ExperimentalCalls | None = None
    image: Path | None = None  # default: the bundled fuzz guest
    stall: float = 30.0  # seconds without a hypercall that count as a hang
    straddle: bool = True  # batches wholly in RAM across the page-table pool's boundaries (docs/fuzz.md)

    def cmdline(self) -> str:
        extra = "" if self.straddle else " straddle=0"
        return f"calls={self.calls} seed={self.seed} stores={int(self.stores)} paging={self.paging}{extra}"

    def replay(self) -> str:
        extra = "" if self.stores else " --no-stores"
        extra += "" if self.straddle else " --no-straddle"
        extra += "" if self.annotations == "honour" else f" --annotations {self.annotations}"
        extra += "" if self.privilege == "deprivileged" else f" --privilege {self.privilege}"
        return f"vmikit fuzz --calls {self.calls} --seed {self.seed} --paging {self.paging}{extra}"


@dataclass
class Offence:
    """The first hypercall after which something went wrong, as the host saw it."""

    reason: str
    call: str
    call_id: int
    args: tuple[int, int, int]
    status: int
    detail: list[str] = field(default_factory=list)

    def line(self) -> str:
        a0, a1, a2 = self.args
        return (f"{self.reason}: {self.call} id={self.call_id:#010x} a0={a0:#x} a1={a1:#x} a2={a2:#x} "
                f"status={_signed(self.status)}")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


class HypercallWatch:
    """Wraps the dispatcher on the hypercall port; all checks are O(1) except the audit.

    Audits are incremental (``Mmu.auditor()``: each reports what a full audit would, but
    re-derives only the tables whose bytes or registration changed since the previous one).
    Every ``full_every``-th audit and the last one are also run as full audits from scratch,
    and a disagreement between the two is reported as an auditor bug.
    """

    def __init__(self, hypervisor: Hypervisor, vcpu: object, audit_every: int, full_every: int = 1000) -> None:
        self.hv: Hypervisor = hypervisor
        self.vcpu = vcpu
        self.audit_every = max(1, audit_every)
        self.full_every = max(1, full_every)
        self.documented = {value & U64_MASK for value in self.hv.spec.errors.values()}
        self.statuses: Counter[int] = Counter()
        self.undocumented = 0
        self.audits = 0
        self.full_audits = 0
        self.audit_seconds = 0.0  # time spent auditing, incremental and full
        self.audit_problems: list[str] = []
        self.offences: list[Offence] = []
        self.calls = 0
        self.findings = 0  # every offence, also past the 20 kept
        self._mutating = 0
        self._pending_audit = False
        self._auditor = self.hv.mmu.auditor()
        self.disagreements = 0  # audits where the incremental and the full auditor differed

    @classmethod
    def attach(cls, session: Session, audit_every: int, full_every: int = 1000) -> HypercallWatch:
        assert session.hypervisor is not None
        watch = cls(session.hypervisor, session.machine.vcpu, audit_every, full_every)
        session.machine.on_out(layout.PORT_HYPERCALL, watch.on_hypercall)
        return watch

    def on_hypercall(self, port: int, size: int, value: int) -> None:
        regs = self.vcpu.regs  # type: ignore[attr-defined]
        args = (regs.rdi, regs.rsi, regs.rdx)
        failures = len(self.hv.handler_failures)
        self.hv.on_hypercall(port, size, value)
        status = regs.rax
        self.calls += 1
        self.statuses[status] += 1
        if len(self.hv.handler_failures) != failures:
            self._offend("VMM exception in a handler", value, args, status, self.hv.handler_failures[failures:])
        if status not in self.documented:
            self.undocumented += 1
            self._offend("status is not a spec error code", value, args, status)
        family = value >> 24
        if family in MUTATING_FAMILIES or family not in KNOWN_FAMILIES:
            self._mutating += 1
            self._pending_audit = True
            if self._mutating % self.audit_every == 0:
                self.audit(value, args, status)

    def audit(self, call_id: int | None = None, args: tuple[int, int, int] = (0, 0, 0), status: int = 0,
              full: bool = False) -> None:
        start = time.perf_counter()
        self._pending_audit = False
        self.audits += 1
        problems = self._run(self._auditor)
        if full or self.audits % self.full_every == 0:
            self.full_audits += 1
            complete = self._run(self.hv.mmu.auditor())  # a fresh auditor: everything from scratch
            if complete != problems:
                self.disagreements += 1
                self._offend("the incremental auditor disagrees with a full audit", call_id or 0, args, status,
                             [f"incremental: {problems[:3]}", f"full: {complete[:3]}"])
                problems = complete
        self.audit_seconds += time.perf_counter() - start
        if not problems:
            return
        fresh = [p for p in problems if p not in self.audit_problems]
        self.audit_problems += fresh[:100 - len(self.audit_problems)]
        if fresh:
            self._offend("page-table invariant broken (auditor)", call_id or 0, args, status, fresh[:5])

    def _run(self, auditor: object) -> list[str]:
        try:
            return auditor.audit()  # type: ignore[attr-defined]
        except Exception as exc:  # the auditor itself tripping over the guest's tables is a finding too
            if auditor is self._auditor:
                self._auditor = self.hv.mmu.auditor()  # its caches may be half updated: start afresh
            return [f"auditor raised {type(exc).__name__}: {exc}"]

    @property
    def tables_rederived(self) -> int:
        tables = getattr(self._auditor, "tables", None)
        return getattr(tables, "rederived", 0)

    def finish(self) -> None:
        """The last audit, also run in full (it is the one the run's verdict rests on)."""
        self.audit(full=True)

    def _offend(self, reason: str, call_id: int, args: tuple[int, int, int], status: int,
                detail: list[str] | None = None) -> None:
        self.findings += 1
        if len(self.offences) < 20:
            self.offences.append(Offence(reason, self.hv.call_name(call_id), call_id, args, status, detail or []))


@dataclass
class FuzzReport:
    config: FuzzConfig
    guest: GuestLog
    wall_seconds: float
    exits: dict[str, object]
    host_statuses: dict[str, int]
    audits: int
    audit_problems: list[str]
    handler_failures: list[str]
    offences: list[Offence]
    crash: str | None = None  # GuestCrash / GuestHang, one line
    exit_status: int | None = None
    record: str | None = None  # the guest's last action, read from its memory
    rom_writes_refused: int = 0
    mmio_unmapped: int = 0
    refused_pool_writes: dict[str, int] = field(default_factory=dict)
    console_tail: str = ""
    audit_seconds: float = 0.0  # the auditor's time during the run (within wall_seconds)
    full_audits: int = 0
    tables_rederived: int = 0  # tables the incremental auditor derived afresh, over all audits
    auditor_disagreements: int = 0
    execution: dict[str, object] | None = None  # the execution model's summary (privilege, flushes)
    partial: bool = False  # interrupted: what was measured until then (no final audit, no guest summary)

    @property
    def classes(self) -> dict[str, int]:
        """Calls the guest made per attack class (they sum to its calls)."""
        return self.guest.classes

    @property
    def calls_per_second(self) -> float:
        return self.guest.calls / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def audit_share(self) -> float:
        """The fraction of the run's wall time the auditor took."""
        return self.audit_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def rejections(self, spec_errors: dict[str, int]) -> dict[str, int]:
        """The guest's counts of fuzzed calls by status, under the spec's error names."""
        names = {value: name for name, value in spec_errors.items()}
        return {names.get(status, f"UNDOCUMENTED({status})"): n
                for status, n in sorted(self.guest.by_status.items(), reverse=True) if status != 0}

    @property
    def failures(self) -> list[str]:
        out = []
        if self.crash:
            out.append(self.crash)
        if self.handler_failures:
            out.append(f"{len(self.handler_failures)} VMM exception(s) in hypercall handlers: {self.handler_failures[0]}")
        if self.auditor_disagreements:
            out.append(f"the incremental auditor disagreed with a full audit {self.auditor_disagreements} time(s)")
        if self.audit_problems:
            out.append(f"page-table auditor found {len(self.audit_problems)} problem(s): {self.audit_problems[0]}")
        undocumented = [s for s in self.host_statuses if s.startswith("UNDOCUMENTED")]
        if undocumented or self.guest.odd_statuses:
            out.append(f"undocumented status(es): {undocumented or self.guest.odd_statuses}")
        if self.partial and self.guest.unexpected:  # the surprises so far (the guest's live count)
            out.append(f"{self.guest.unexpected} surprise(s) in the guest so far, first: {self.guest.why}")
        if not self.crash and not self.partial:
            if not self.guest.finished:
                out.append("the guest did not finish its calls")
            elif self.guest.calls < self.config.calls:
                out.append(f"the guest made {self.guest.calls} of {self.config.calls} calls")
            if self.guest.broken or self.guest.final != "ok":
                out.append("a valid call stopped working")
            if self.guest.unexpected:
                out.append(f"{self.guest.unexpected} surprise(s) in the guest, first: {self.guest.why}")
            if self.exit_status not in (0, None) and not self.guest.broken:
                out.append(f"the guest exited with status {self.exit_status}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures and not self.partial

    def to_json(self, spec_errors: dict[str, int]) -> dict[str, object]:
        return {
            "ok": self.ok,
            "partial": self.partial,
            "failures": self.failures,
            "replay": self.config.replay(),
            "seed": self.config.seed,
            "paging": self.config.paging,
            "annotations": self.config.annotations,
            "privilege": self.config.privilege,
            "audit_every": self.config.audit_every,
            "calls": self.guest.calls,
            "canary_calls": self.guest.canaries,
            "plain_stores": self.guest.stores,
            "experimental_calls_found": self.guest.experimental,
            "classes": self.classes,
            "accepted": self.guest.by_status.get(0, 0),
            "rejections": self.rejections(spec_errors),
            "host_statuses": self.host_statuses,
            "exits": self.exits,
            "wall_seconds": round(self.wall_seconds, 3),
            "calls_per_second": round(self.calls_per_second, 1),
            "audits": self.audits,
            "full_audits": self.full_audits,
            "tables_rederived": self.tables_rederived,
            "audit_seconds": round(self.audit_seconds, 3),
            "audit_share": round(self.audit_share, 4),
            "auditor_disagreements": self.auditor_disagreements,
            "execution": self.execution,
            "audit_problems": self.audit_problems,
            "handler_failures": self.handler_failures[:20],
            "offences": [o.line() for o in self.offences],
            "guest_last": self.guest.last,
            "guest_surprise": self.guest.why,
            "guest_record": self.record,
            "crash": self.crash,
            "rom_writes_refused": self.rom_writes_refused,
            "mmio_unmapped": self.mmio_unmapped,
            "refused_pool_writes": self.refused_pool_writes,
        }


def default_timeout(calls: int) -> float:
    # A ceiling only (a stalled guest is caught by the stall watchdog first), within the board's day.
    return min(60.0 + calls * 10e-3, 86400.0)


class StallWatchdog(Background):
    """Kicks the vCPU when no hypercall arrived for ``stall`` seconds: a hang, however long the run.

    The board's watchdog bounds the whole run; a fuzz run's length varies with the host, so
    progress (hypercalls) is the better signal. The kick ends the run as GuestHang.
    """

    def __init__(self, watch: HypercallWatch, vcpu: object, stall: float) -> None:
        super().__init__("vmikit-fuzz-stall")
        self._watch, self._vcpu, self._stall = watch, vcpu, stall
        self.fired = False

    def _loop(self) -> None:
        seen, since = -1, time.monotonic()
        while not self._done.wait(0.5):
            if self._watch.calls != seen:
                seen, since = self._watch.calls, time.monotonic()
            elif time.monotonic() - since > self._stall:
                self.fired = True
                self._vcpu.kick()  # type: ignore[attr-defined]
                return


@dataclass(frozen=True)
class FuzzProgress:
    """A sample of a running fuzz run, from the guest's counters and the host's watch."""

    calls: int  # fuzzed calls the guest made so far
    target: int  # the calls it was asked for
    seconds: float
    findings: int  # offences the host saw plus surprises the guest saw

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"fuzz: {self.calls}/{self.target} calls, {self.rate:.0f} calls/s, {self.findings} "
                f"finding{'' if self.findings == 1 else 's'}")


_START_STATS = re.compile(rb"^FUZZ-START .*stats=0x([0-9a-f]+) classes=([\w,-]+)$", re.MULTILINE)


class GuestCounters:
    """Reads the guest's ``struct fuzz_stats`` (its address and class names from the FUZZ-START line)."""

    def __init__(self, session: Session) -> None:
        self._machine = session.machine
        self._gpa: int | None = None
        self._names: tuple[str, ...] = ()

    def read(self) -> GuestStats | None:
        if self._gpa is None:
            m = _START_STATS.search(bytes(self._machine.console.captured[:4096]))
            if m is None:
                return None  # the guest has not printed its first line yet
            self._gpa, self._names = int(m[1], 16), tuple(m[2].decode().split(","))
        try:
            raw = self._machine.memory.read(self._gpa, stats_size(len(self._names)))
        except Exception:  # noqa: BLE001 - a bad address printed by a hostile guest: no progress, not a crash
            return None
        return GuestStats.parse(raw, self._names)


class ProgressPoller(Background):
    """Calls ``report`` every ``every`` seconds with a FuzzProgress, from a thread of its own."""

    def __init__(self, counters: GuestCounters, watch: HypercallWatch, target: int, every: float,
                 report: Callable[[FuzzProgress], None]) -> None:
        super().__init__("vmikit-fuzz-progress")
        self._counters, self._watch, self._target, self._every, self._report = counters, watch, target, every, report
        self._start = time.perf_counter()

    def sample(self) -> FuzzProgress | None:
        stats = self._counters.read()
        if stats is None:
            return None
        return FuzzProgress(stats.calls, self._target, time.perf_counter() - self._start,
                            self._watch.findings + stats.unexpected)

    def _loop(self) -> None:
        while not self._done.wait(self._every):
            sample = self.sample()
            if sample is not None:
                self._report(sample)


class FuzzInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``report`` is what was measured until then (``report.partial``)."""

    def __init__(self, report: FuzzReport) -> None:
        super().__init__()
        self.report = report


def run_fuzz(config: FuzzConfig, progress: Callable[[FuzzProgress], None] | None = None,
             progress_every: float = 5.0) -> FuzzReport:
    """Run and judge; ``progress`` gets a sample every ``progress_every`` seconds (from another thread).

    Raises FuzzInterrupted (a KeyboardInterrupt) with the partial report on Ctrl-C.
    """
    from vmikit.guest.build import build_guest

    image = config.image or build_guest("fuzz")
    timeout = config.timeout or default_timeout(config.calls)
    with Session(image, rom="full", annotations=config.annotations, paging=config.paging,
                 memory_mib=config.memory_mib, timeout=timeout, experimental=config.experimental,
                 cmdline=config.cmdline(), privilege=config.privilege) as session:
        watch = HypercallWatch.attach(session, config.audit_every)
        counters = GuestCounters(session)
        crash: str | None = None
        exit_status: int | None = None
        interrupted = False
        exits: dict[str, object] = {}
        start = time.perf_counter()
        try:
            with StallWatchdog(watch, session.machine.vcpu, config.stall) as stall, \
                    ProgressPoller(counters, watch, config.calls, progress_every, progress or (lambda _: None)):
                result = session.machine.run()
            exit_status = result.exit_status
            exits = dict(result.summary()["exits"])  # type: ignore[call-overload]
        except KeyboardInterrupt:
            interrupted = True  # the report below says what was measured so far
            counts = session.machine.vcpu.exit_counts()
            exits = {"total": sum(counts.values()), "by_reason": counts}
        except GuestHang as err:
            crash = f"hang: no hypercall for {config.stall:g} s" if stall.fired else f"hang: {err.cause}"
            exits = {}
        except GuestCrash as err:
            crash = f"guest crash: {err.cause}"
            exits = {}
        except Exception as exc:  # noqa: BLE001 - anything else out of the run loop is a VMM failure
            crash = f"VMM exception: {type(exc).__name__}: {exc}"
            exits = {}
            del exc
        wall = time.perf_counter() - start
        audit_seconds = watch.audit_seconds
        if not interrupted:  # an interrupt may have landed inside a handler: the tables may be mid-update
            watch.finish()
        machine = session.machine
        console = machine.console.text()
        guest = GuestLog.parse(console)
        if interrupted and (live := counters.read()) is not None:  # no summary lines: the live counters
            guest.calls, guest.unexpected, guest.canaries, guest.stores = (live.calls, live.unexpected,
                                                                           live.canaries, live.stores)
            guest.classes = live.classes
        record = None
        if guest.record_gpa is not None:
            try:
                record = describe_record(machine.memory.read(guest.record_gpa, RECORD.size))
            except Exception:  # noqa: BLE001 - a report must not fail on a bad address printed by the guest
                record = None
        names = {value & U64_MASK: name for name, value in session.hypervisor.spec.errors.items()}  # type: ignore[union-attr]
        host_statuses = {names.get(s, f"UNDOCUMENTED({_signed(s)})"): n for s, n in sorted(watch.statuses.items())}
        stats = session.mmu.stats()
        report = FuzzReport(
            config=config, guest=guest, wall_seconds=wall, exits=exits, host_statuses=host_statuses,
            audits=watch.audits, audit_problems=watch.audit_problems, audit_seconds=audit_seconds,
            full_audits=watch.full_audits, tables_rederived=watch.tables_rederived,
            auditor_disagreements=watch.disagreements,
            execution=session.hypervisor.execution.summary() if session.hypervisor.execution else None,  # type: ignore[union-attr]
            handler_failures=list(session.hypervisor.handler_failures),  # type: ignore[union-attr]
            offences=watch.offences, crash=crash, exit_status=exit_status, record=record,
            rom_writes_refused=machine.rom_writes, mmio_unmapped=machine.mmio_unmapped,
            refused_pool_writes=dict(stats.get("refused_writes", {})),  # type: ignore[call-overload]
            console_tail="\n".join(console.splitlines()[-30:]), partial=interrupted,
        )
    if interrupted:
        raise FuzzInterrupted(report)
    return report
