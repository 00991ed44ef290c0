"""Issue 5's targets, each beside the ratio measured in the same run (goals, not assertions)."""

from __future__ import annotations


def _median(results: dict, workload: str, profile: str) -> float | None:
    cell = results.get("cells", {}).get(workload, {}).get(profile)
    return cell["ns_per_op"]["median"] if cell else None


def _target(name: str, goal: str, measured: float | None, met: bool | None, detail: str) -> dict[str, object]:
    return {"name": name, "goal": goal, "measured": measured, "met": met, "detail": detail}


def targets(results: dict) -> list[dict[str, object]]:
    out = []
    c = results.get("c_reference") or {}
    ratio = c.get("ratio")
    out.append(_target("null hypercall, Python VMM / C reference", "<= 1.2x", ratio,
                       None if ratio is None else ratio <= 1.2,
                       "guest-measured ns per Query.GetVersion call, same image and ROM, same run"))

    queued, unqueued = _median(results, "map", "direct-honour"), _median(results, "setpte", "direct-honour")
    frac = queued / unqueued if queued and unqueued else None
    out.append(_target("queued SetPTE amortized / unqueued SetPTE", "<= 1/50 (0.02)", frac,
                       None if frac is None else frac <= 0.02,
                       "map (queued + FlushQueue) vs setpte (one hypercall each), ns per page, direct-honour"))

    native_map, native_unmap = _median(results, "map", "native"), _median(results, "unmap", "native")
    dh_map, dh_unmap = _median(results, "map", "direct-honour"), _median(results, "unmap", "direct-honour")
    ratios = [a / b for a, b in ((dh_map, native_map), (dh_unmap, native_unmap)) if a and b]
    worst = max(ratios) if ratios else None
    out.append(_target("map/unmap under direct-honour / native", "<= 5x", worst,
                       None if worst is None else worst <= 5,
                       "the larger of the map and unmap ratios, ns per page"
                       + (f" (map {ratios[0]:.2f}x" + (f", unmap {ratios[1]:.2f}x)" if len(ratios) > 1 else ")")
                          if ratios else "")))

    trap_map = _median(results, "map", "trap")
    speedup = trap_map / dh_map if trap_map and dh_map else None
    out.append(_target("map: trap / direct-honour (speed-up)", ">= 30x", speedup,
                       None if speedup is None else speedup >= 30, "ns per page mapped"))

    mem = results.get("memory") or {}
    beyond = mem.get("beyond_guest_mib")
    out.append(_target("VMM memory beyond guest RAM", "<= 40 MiB", beyond,
                       None if beyond is None else beyond <= 40,
                       "peak RSS minus resident guest RAM, one bench session in a child process (MiB)"))
    return out
