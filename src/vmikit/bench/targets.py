"""The bench's targets, each beside the figure measured in the same run (goals, not assertions).

Profiles with a ROM are deprivileged (the VMI execution model) unless named ``-ring0``; each
target's detail names the ring-0 twin's figure too when the run has it.
"""

from __future__ import annotations

RING0 = "direct-honour-ring0"


def _median(results: dict, workload: str, profile: str) -> float | None:
    cell = results.get("cells", {}).get(workload, {}).get(profile)
    return cell["ns_per_op"]["median"] if cell else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _target(name: str, goal: str, measured: float | None, met: bool | None, detail: str,
            kind: str = "ratio") -> dict[str, object]:
    # kind: how to show `measured`: ratio (x), fraction (1/N), ns, MiB
    return {"name": name, "goal": goal, "measured": measured, "met": met, "detail": detail, "kind": kind}


def _ring0(value: float | None, fmt: str) -> str:
    return f"; {RING0}: {fmt.format(value)}" if value is not None else ""


def targets(results: dict) -> list[dict[str, object]]:
    out = []
    c = results.get("c_reference") or {}
    ratio = c.get("ratio")
    out.append(_target("null call, Python VMM / C VMM", "<= 1.2x", ratio,
                       None if ratio is None else ratio <= 1.2,
                       "guest-measured ns per Query.GetVersion call, same image, ring-0 ROM and kernel, same run; "
                       "median of the per-round ratios of interleaved C and Python rounds"
                       + (f" ({c['rounds']} rounds, {c['ratio_spread']['min']:.2f}-{c['ratio_spread']['max']:.2f})"
                          if c.get("ratio_spread") else "")))

    frac = _ratio(_median(results, "map", "direct-honour"), _median(results, "setpte", "direct-honour"))
    frac0 = _ratio(_median(results, "map", RING0), _median(results, "setpte", RING0))
    out.append(_target("map / setpte per page, direct-honour", "<= 1/50 (0.02)",
                       frac, None if frac is None else frac <= 0.02,
                       "map (queued SetPTE + FlushQueue) vs setpte (one hypercall each), guest ns per page"
                       + _ring0(frac0, "{:.3f}"), kind="fraction"))

    for profile, goal in (("direct-honour", 250), ("shadow-honour", 400)):
        cell = results.get("cells", {}).get("map", {}).get(profile) or {}
        spread = cell.get("vmm_ns_per_entry")
        value = spread["median"] if spread else None
        out.append(_target(f"VMM per queued entry, {profile}", f"<= {goal} ns", value,
                           None if value is None else value <= goal,
                           "host ns in the FlushQueue exits over the entries they completed (median of repetitions"
                           + (f"; min {spread['min']:.0f}, max {spread['max']:.0f})" if spread else ")"), kind="ns"))

    native_map, native_unmap = _median(results, "map", "native"), _median(results, "unmap", "native")
    dh_map, dh_unmap = _median(results, "map", "direct-honour"), _median(results, "unmap", "direct-honour")
    map_ratio = _ratio(dh_map, native_map)
    out.append(_target("map, direct-honour / native", "<= 0.1x", map_ratio,
                       None if map_ratio is None else map_ratio <= 0.1,
                       "guest ns per page mapped; native is the bare machine (kernel at ring 0)"
                       + _ring0(_ratio(_median(results, "map", RING0), native_map), "{:.2f}x")))

    unmap_ratio = _ratio(dh_unmap, native_unmap)
    # A goal about both is measured only when both are: a run filtered to one of them leaves it out.
    worst = max(map_ratio, unmap_ratio) if map_ratio is not None and unmap_ratio is not None else None
    out.append(_target("map and unmap, direct-honour / native", "<= 5x", worst,
                       None if worst is None else worst <= 5,
                       "the larger of the map and unmap ratios, ns per page"
                       + (f" (map {map_ratio:.2f}x, unmap {unmap_ratio:.2f}x)" if worst is not None else "")))

    trap_map = _median(results, "map", "trap")
    speedup = _ratio(trap_map, dh_map)
    out.append(_target("map speed-up, trap / direct-honour", ">= 30x", speedup,
                       None if speedup is None else speedup >= 30, "ns per page mapped"
                       + _ring0(_ratio(trap_map, _median(results, "map", RING0)), "{:.2f}x")))

    rdtsc = _median(results, "rdtsc-vmi", "direct-honour")
    out.append(_target("rdtsc-vmi per call, direct-honour", "<= 100 ns", rdtsc,
                       None if rdtsc is None else rdtsc <= 100,
                       "vmi_rdtsc() through the full ROM (rdtsc in the ROM, no exit), guest ns per call"
                       + _ring0(_median(results, "rdtsc-vmi", RING0), "{:.0f} ns"), kind="ns"))

    mem = results.get("memory") or {}
    beyond = mem.get("beyond_guest_mib")
    out.append(_target("VMM memory beyond guest RAM", "<= 40 MiB", beyond,
                       None if beyond is None else beyond <= 40,
                       "peak RSS minus resident guest RAM, one bench session in a child process (MiB)", kind="MiB"))
    return out
