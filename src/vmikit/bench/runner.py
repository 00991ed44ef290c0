"""Run the bench guest under every profile and turn its markers and console into cells.

One session per profile runs every selected workload in turn (the guest builds its
address space once). Around each timed section the guest writes a marker to
``PORT_BENCH``; the handler registered here snapshots the exit counters, the
hypervisor's per-call counters and the host clock, so exits, calls and wall time
are those of the timed section only (minus the closing marker's own exit). The
guest prints the TSC cycles of the section; they become ns with the TSC
frequency KVM reports (``KVM_GET_TSC_KHZ``).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from vmikit.bench.workloads import (
    GUEST, MARK_END, PORT_BENCH, PROFILE_BY_NAME, PROFILE_NAMES, WORKLOAD_NAMES, FULL, Profile, Sizes, cmdline,
)
from vmikit.errors import VmikitError
from vmikit.machine import layout

# The guest's workload numbering (the tag's high half): bench.c's names[], in order.
GUEST_ORDER = (*WORKLOAD_NAMES, "spin")
LINE = re.compile(r"^BENCH (\S+) ops=(\d+) cycles=(\d+)\s*$", re.M)
ERROR = re.compile(r"^BENCH (error|failed) .*$", re.M)

Progress = Callable[[str, str], None]  # (profile, workload) after each repetition


@dataclass
class BenchConfig:
    workloads: tuple[str, ...] = WORKLOAD_NAMES
    profiles: tuple[str, ...] = PROFILE_NAMES
    sizes: Sizes = FULL
    memory_mib: int = 128
    timeout: float = 300.0
    c_reference: bool = True
    memory_probe: bool = True
    quick: bool = False
    c_rounds: int | None = None  # interleaved C / Python rounds (None: 3 under --quick, else 5)
    events: bool = True  # alarm latency and event round trip, VMI deprivileged beside native (eventbench.py)
    shootdown: bool = True  # TLB shootdown of 1, 2, 4 CPUs, VMI beside native IPIs (shootdown.py)
    extra: dict[str, object] = field(default_factory=dict)


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class VmmClock:
    """Host time the VMM spends in its handlers: per hypercall ID (the PORT_HYPERCALL handler,
    wrapped) and for reflected exceptions and syscalls (the PORT_EVENT handler). Two
    perf_counter() calls per exit, well under a µs, against exits of tens of µs."""

    def __init__(self, session: object) -> None:
        self.by_call: dict[int, float] = {}
        self.event_s = 0.0
        hv = session.hypervisor  # type: ignore[attr-defined]
        if hv is None:
            return
        machine = session.machine  # type: ignore[attr-defined]
        hypercall, event = hv.on_hypercall, hv.execution.on_event if hv.execution is not None else None

        def timed_hypercall(port: int, size: int, value: int) -> None:
            start = time.perf_counter()
            try:
                hypercall(port, size, value)
            finally:
                self.by_call[value] = self.by_call.get(value, 0.0) + time.perf_counter() - start

        machine.on_out(layout.PORT_HYPERCALL, timed_hypercall)
        if event is not None:
            def timed_event(port: int, size: int, value: int) -> None:
                start = time.perf_counter()
                try:
                    event(port, size, value)
                finally:
                    self.event_s += time.perf_counter() - start

            machine.on_out(layout.PORT_EVENT, timed_event)


@dataclass
class Snapshot:
    clock: float
    reasons: dict[str, int]
    calls: dict[int, int]
    exits: dict[int, int]
    host_s: dict[int, float]  # VMM handler time per call ID
    event_s: float  # VMM time reflecting exceptions and syscalls
    flushes: int
    flush_s: float
    flush_kinds: dict[str, int]  # how the engine flushed: "frames" (targeted) or "all"


def _delta(end: dict, begin: dict) -> dict:
    return {k: v - begin.get(k, 0) for k, v in end.items() if v - begin.get(k, 0)}


class Recorder:
    """The PORT_BENCH handler: per timed section, exits, calls, host wall time, the VMM's own
    time and the flush mechanism's."""

    def __init__(self, session: object, on_rep: Callable[[str], None] | None = None) -> None:
        self.session = session
        self.on_rep = on_rep
        self.clock = VmmClock(session)
        self.sections: list[dict[str, object]] = []
        self._open: tuple[int, Snapshot] | None = None

    def _snapshot(self) -> Snapshot:
        hv = self.session.hypervisor  # type: ignore[attr-defined]
        reasons = self.session.machine.vcpu.exit_counts()  # type: ignore[attr-defined]
        # The flush mechanism (ExecutionModel.flush: KVM drops its shadow of the guest's tables
        # after the VMM changed a present entry): how many, and the host time they took.
        execution = hv.execution if hv is not None else None
        return Snapshot(time.perf_counter(), reasons, dict(hv.calls) if hv is not None else {},
                        dict(hv.exits) if hv is not None else {}, dict(self.clock.by_call), self.clock.event_s,
                        execution.stats.flushes if execution is not None else 0,
                        execution.stats.flush_seconds if execution is not None else 0.0,
                        dict(getattr(execution.stats, "by_kind", {})) if execution is not None else {})

    def __call__(self, port: int, size: int, value: int) -> None:
        snap = self._snapshot()
        tag = value & ~MARK_END
        if not value & MARK_END:
            self._open = (tag, snap)
            return
        if self._open is None or self._open[0] != tag:
            self._open = None
            return
        _, begin = self._open
        self._open = None
        reasons = _delta(snap.reasons, begin.reasons)
        reasons["io"] = reasons.get("io", 0) - 1  # the closing marker's own exit
        if not reasons["io"]:
            del reasons["io"]
        index = tag >> 16
        name = GUEST_ORDER[index] if index < len(GUEST_ORDER) else str(index)
        self.sections.append({"workload": name, "rep": tag & 0xFFFF, "wall_s": snap.clock - begin.clock,
                              "exits": sum(reasons.values()), "by_reason": reasons,
                              "calls": _delta(snap.calls, begin.calls), "call_exits": _delta(snap.exits, begin.exits),
                              "host_s": _delta(snap.host_s, begin.host_s), "event_s": snap.event_s - begin.event_s,
                              "flushes": snap.flushes - begin.flushes, "flush_s": snap.flush_s - begin.flush_s,
                              "flush_kinds": _delta(snap.flush_kinds, begin.flush_kinds)})
        if self.on_rep is not None:
            self.on_rep(name)


def parse_console(console: str) -> list[tuple[str, int, int]]:
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for m in LINE.finditer(console)]


def run_profile(image: Path, profile: Profile, workloads: tuple[str, ...] | list[str], sizes: Sizes, *,
                memory_mib: int = 128, timeout: float = 300.0, on_rep: Callable[[str], None] | None = None,
                rom: str | None = None, paging: str | None = None, time_exits: bool = False) -> dict[str, Any]:
    """One session of the bench guest; returns its raw sections and session facts. ``time_exits``:
    also the VMM's own time per exit, from each KVM_RUN return to the next call (what the C
    reference measures of itself)."""
    from vmikit.session import Session

    line = cmdline(list(workloads), sizes)
    with Session(image, rom=rom or profile.rom, annotations=profile.annotations, paging=paging or profile.paging,
                 memory_mib=memory_mib, timeout=timeout, cmdline=line, privilege=profile.privilege) as session:
        recorder = Recorder(session, on_rep)
        session.machine.on_out(PORT_BENCH, recorder)
        tsc_khz = session.machine.vcpu.tsc_khz()
        vcpu = session.machine.vcpu
        vcpu.time_outside = time_exits  # type: ignore[attr-defined]
        result = session.run()
        outside_ns = vcpu.outside_ns  # type: ignore[attr-defined]
        exits_total = sum(n for reason, n in vcpu.exit_counts().items() if reason != "intr")  # runs cut short: untimed
        hv = session.hypervisor
        names = {cid: hv.call_name(cid) for cid in set(hv.calls) | set(hv.exits)} if hv is not None else {}
    console = result.console
    errors = ERROR.findall(console)
    if result.exit_status != 0 or errors:
        problems = [m.group(0) for m in ERROR.finditer(console)]
        raise VmikitError(f"bench guest under {profile.name} exited {result.exit_status}: "
                          f"{'; '.join(problems) or console[-300:]}", "run it alone with `vmikit run bench` to see why")
    lines = parse_console(console)
    sections: list[dict[str, Any]] = recorder.sections
    if len(lines) != len(sections):
        raise VmikitError(f"bench guest under {profile.name}: {len(lines)} result lines but {len(sections)} "
                          "marked sections", "is something else writing to the bench port?")
    for sec, (name, ops, cycles) in zip(sections, lines):
        if sec["workload"] != name:
            raise VmikitError(f"bench guest: section {sec['workload']} reported as {name}", "rebuild the bench guest")
        sec["ops"], sec["cycles"] = ops, cycles
        sec["calls"] = {names.get(k, hex(k)): v for k, v in sec["calls"].items()}
        sec["call_exits"] = {names.get(k, hex(k)): v for k, v in sec["call_exits"].items()}
        sec["host_s"] = {names.get(k, hex(k)): v for k, v in sec["host_s"].items()}
    if not tsc_khz:  # no KVM_GET_TSC_KHZ: calibrate against the host clock on the longest section
        longest = max(sections, key=lambda s: s["wall_s"])
        tsc_khz = int(longest["cycles"] / longest["wall_s"] / 1000)
        tsc_source = "host clock"
    else:
        tsc_source = "KVM_GET_TSC_KHZ"
    summary = result.summary()
    return {"profile": profile.name, "privilege": result.privilege, "cmdline": line, "tsc_khz": tsc_khz,
            "tsc_source": tsc_source, "sections": sections,
            "vmm_ns_per_exit": outside_ns / exits_total if time_exits and exits_total else None,
            "session": {"wall_seconds": summary["wall_seconds"],
                        "exits_total": summary["exits"]["total"],  # type: ignore[index]
                        "paging": summary["paging"], "privilege": result.privilege,
                        "execution": result.execution}}


def flush_of(secs: list[dict[str, Any]], tsc_khz: int) -> dict[str, object]:
    """The flush mechanism's own figure for one cell: flushes per operation, mean host µs per
    flush, and the share of the section's (guest-measured) time the flushes took."""
    flushes = sum(int(s["flushes"]) for s in secs)
    seconds = sum(float(s["flush_s"]) for s in secs)
    total_ops = sum(int(s["ops"]) for s in secs)
    shares = [float(s["flush_s"]) / (int(s["cycles"]) / (tsc_khz * 1e3)) for s in secs if int(s["cycles"])]
    kinds: dict[str, int] = {}
    for s in secs:
        for kind, count in s["flush_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    return {"flushes": flushes, "by_kind": kinds, "flushes_per_op": flushes / total_ops if total_ops else 0.0,
            "us_per_flush": seconds / flushes * 1e6 if flushes else None,
            "us_per_op": seconds / total_ops * 1e6 if total_ops else 0.0,
            "share_of_time": stats(shares) if shares else None}


def cells_of(raw: dict[str, Any]) -> dict[str, dict[str, object]]:
    """Per workload of one profile session: min/median/max over its repetitions."""
    tsc_khz = raw["tsc_khz"]
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for sec in raw["sections"]:
        by_workload.setdefault(sec["workload"], []).append(sec)
    cells = {}
    for name, secs in by_workload.items():
        ns = [s["cycles"] * 1e6 / tsc_khz / s["ops"] for s in secs]
        exits = [s["exits"] / s["ops"] for s in secs]
        wall = [s["wall_s"] for s in secs]
        ops = secs[0]["ops"]
        total_ops = sum(s["ops"] for s in secs)
        by_call: dict[str, dict[str, Any]] = {}
        for s in secs:
            for call, count in s["calls"].items():
                entry = by_call.setdefault(call, {"calls": 0, "exits": 0})
                entry["calls"] += count
            for call, count in s["call_exits"].items():
                by_call.setdefault(call, {"calls": 0, "exits": 0})["exits"] += count
            for call, seconds in s["host_s"].items():
                entry = by_call.setdefault(call, {"calls": 0, "exits": 0})
                entry["host_s"] = entry.get("host_s", 0.0) + seconds
        for entry in by_call.values():
            entry["calls_per_op"] = entry["calls"] / total_ops
            entry["exits_per_op"] = entry["exits"] / total_ops
            # Host µs in the VMM's handler per exit of this call (a FlushQueue exit completes a whole batch).
            host = entry.pop("host_s", 0.0)
            entry["vmm_us_per_exit"] = host / entry["exits"] * 1e6 if entry["exits"] else None
        vmm_s = sum(sum(s["host_s"].values()) + s["event_s"] for s in secs)
        event_s = sum(s["event_s"] for s in secs)
        # The VMM's cost per queued entry: FlushQueue handler time (validating and applying the
        # batch, and any flush it triggers) over the entries queued.
        queued = by_call.get("MMU.SetPTE|queue", {}).get("calls", 0)
        fq_s = sum(s["host_s"].get("MMU.FlushQueue", 0.0) for s in secs)
        fq = by_call.get("MMU.FlushQueue", {}).get("exits", 0)
        queue = {"entries": queued, "flushqueue_exits": fq, "entries_per_flushqueue": queued / fq if fq else None,
                 "vmm_us_per_entry": fq_s / queued * 1e6 if queued and fq else None}
        # The same per repetition (host ns in the FlushQueue exits over the entries they completed),
        # so that its spread shows a loaded machine.
        per_rep = [s["host_s"]["MMU.FlushQueue"] / s["calls"]["MMU.SetPTE|queue"] * 1e9 for s in secs
                   if s["calls"].get("MMU.SetPTE|queue") and s["host_s"].get("MMU.FlushQueue")]
        reasons: dict[str, float] = {}
        for s in secs:
            for reason, count in s["by_reason"].items():
                reasons[reason] = reasons.get(reason, 0) + count / total_ops
        cells[name] = {"workload": name, "profile": raw["profile"], "privilege": raw["privilege"], "ops": ops,
                       "reps": len(secs), "ns_per_op": stats(ns), "exits_per_op": stats(exits), "wall_s": stats(wall),
                       "cycles": [s["cycles"] for s in secs], "exits_per_op_by_reason": reasons, "by_call": by_call,
                       "flush": flush_of(secs, int(tsc_khz)),
                       # The VMM's own host time per operation: its hypercall handlers plus (deprivileged)
                       # reflecting exceptions; the rest of the guest time is the exits themselves and guest code.
                       "vmm_us_per_op": vmm_s / total_ops * 1e6, "event_us_per_op": event_s / total_ops * 1e6,
                       "vmm_share_of_time": vmm_s / sum(s["cycles"] / (tsc_khz * 1e3) for s in secs),
                       "queue": queue, "vmm_ns_per_entry": stats(per_rep) if per_rep else None}
    return cells


def flush_summary(raw: dict[str, Any]) -> dict[str, object]:
    """The flush mechanism over one whole session (its execution stats) and over its timed sections."""
    execution = raw["session"].get("execution") or {}
    secs = raw["sections"]
    timed = sum(int(s["flushes"]) for s in secs)
    timed_s = sum(float(s["flush_s"]) for s in secs)
    return {"session_flushes": execution.get("flushes", 0), "session_us_mean": execution.get("flush_us_mean"),
            "session_by_kind": execution.get("flushes_by_kind", {}),
            "timed_flushes": timed, "timed_us_mean": timed_s / timed * 1e6 if timed else None}


def machine_facts() -> dict[str, object]:
    from vmikit.engine import open_engine

    facts: dict[str, object] = {"hostname": platform.node(), "machine": platform.machine(),
                                "kernel": platform.release(), "kernel_version": platform.version(),
                                "python": platform.python_version(), "cpus": os.cpu_count(),
                                "loadavg_start": list(os.getloadavg())}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    engine = open_engine()
    try:
        facts["kvm"] = engine.describe()
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()
    return facts


def _reporter(progress: Progress | None, profile: str) -> Callable[[str], None] | None:
    """What the recorder calls after each repetition of a workload under ``profile``."""
    if progress is None:
        return None
    return lambda workload: progress(profile, workload)


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a bench: carries what was measured so far (marked ``"partial": true``), for the
    caller to write where the results were asked for before the interrupt ends the command."""

    def __init__(self, results: dict[str, object]) -> None:
        super().__init__()
        self.results = results


def _add_ratios(cells: dict[str, dict[str, dict[str, object]]]) -> None:
    """Each cell's median against native and against its ring-0 twin (None where either is absent)."""
    for per_profile in cells.values():
        native = per_profile.get("native")
        for cell in per_profile.values():
            base = native["ns_per_op"]["median"] if native else None  # type: ignore[index]
            cell["ratio_to_native"] = cell["ns_per_op"]["median"] / base if base else None  # type: ignore[index]
        for name, cell in per_profile.items():
            # Deprivileged / ring 0, same ROM, paging and annotations (None without a twin in the run).
            twin = PROFILE_BY_NAME[name].twin
            ring0 = per_profile.get(twin) if twin and cell["privilege"] == "deprivileged" else None
            cell["ratio_to_ring0"] = (cell["ns_per_op"]["median"] / ring0["ns_per_op"]["median"]  # type: ignore[index]
                                      if ring0 else None)


def run_bench(config: BenchConfig, progress: Progress | None = None,
              status: Callable[[str], None] | None = None) -> dict[str, object]:
    """The whole bench: every workload under every profile, C reference, memory probe; JSON-ready.

    Ctrl-C raises :class:`BenchInterrupted` with the profiles measured so far."""
    from vmikit.guest.build import build_guest

    started = time.perf_counter()
    say = status or (lambda text: None)
    results: dict[str, object] = {
        "vmikit_bench": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"workloads": list(config.workloads), "profiles": list(config.profiles),
                   "repetitions": config.sizes.reps, "calls": config.sizes.calls, "n": config.sizes.n,
                   "m": config.sizes.m, "memory_mib": config.memory_mib, "quick": config.quick,
                   "privileges": {name: PROFILE_BY_NAME[name].privilege for name in config.profiles}},
    }
    sessions: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, dict[str, object]]] = {}
    errors: dict[str, str] = {}
    try:
        image = build_guest(GUEST)
        results["machine"] = machine_facts()
        results["image"] = str(image)
        for name in config.profiles:
            profile = PROFILE_BY_NAME[name]
            say(f"profile {name}")
            try:
                raw = run_profile(image, profile, config.workloads, config.sizes, memory_mib=config.memory_mib,
                                  timeout=config.timeout, on_rep=_reporter(progress, name))
            except VmikitError as err:
                errors[name] = str(err)
                continue
            sessions[name] = {k: v for k, v in raw.items() if k != "sections"}
            sessions[name]["flush"] = flush_summary(raw)
            for workload, cell in cells_of(raw).items():
                cells.setdefault(workload, {})[name] = cell
        tsc = {s["tsc_khz"] for s in sessions.values()}
        results["tsc_khz"] = tsc.pop() if len(tsc) == 1 else sorted(tsc)
        _add_ratios(cells)
        results["sessions"] = sessions
        results["cells"] = cells
        results["errors"] = errors
        if config.c_reference:
            say("C reference")
            from vmikit.bench.cref import ROUNDS_FULL, ROUNDS_QUICK, compare

            try:
                rounds = config.c_rounds or (ROUNDS_QUICK if config.quick else ROUNDS_FULL)
                results["c_reference"] = compare(image, config.sizes, memory_mib=config.memory_mib, rounds=rounds)
            except VmikitError as err:
                results["c_reference"] = {"error": str(err)}
        if config.events:
            from vmikit.bench.eventbench import EVENTS_FULL, EVENTS_QUICK, GUEST as EVENTS_GUEST, measure

            say("events")
            try:
                results["events"] = measure(build_guest(EVENTS_GUEST), EVENTS_QUICK if config.quick else EVENTS_FULL,
                                            memory_mib=config.memory_mib, progress=say)
            except VmikitError as err:
                results["events"] = {"error": str(err)}
        if config.shootdown:
            from vmikit.bench.shootdown import SHOOTDOWN_FULL, SHOOTDOWN_QUICK, measure as measure_shootdown

            say("shootdown")
            try:
                results["shootdown"] = measure_shootdown(SHOOTDOWN_QUICK if config.quick else SHOOTDOWN_FULL,
                                                         progress=say)
            except VmikitError as err:
                results["shootdown"] = {"error": str(err)}
        if config.memory_probe:
            say("memory probe")
            from vmikit.bench.memprobe import probe

            try:
                results["memory"] = probe(config.workloads, config.sizes, memory_mib=config.memory_mib)
            except VmikitError as err:
                results["memory"] = {"error": str(err)}
        from vmikit.bench.targets import targets

        results["targets"] = targets(results)
    except KeyboardInterrupt as interrupt:
        if "cells" not in results:  # stopped during the profiles: the finished ones, with their ratios
            _add_ratios(cells)
            results.update(sessions=sessions, cells=cells, errors=errors)
        results["partial"] = True
        results["bench_wall_seconds"] = round(time.perf_counter() - started, 3)
        raise BenchInterrupted(results) from interrupt
    results["bench_wall_seconds"] = round(time.perf_counter() - started, 3)
    results["machine"]["loadavg_end"] = list(os.getloadavg())  # type: ignore[index]  # other work on the host
    return results
