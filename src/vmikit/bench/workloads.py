"""The bench guest's workloads and the profiles they run under.

Mirrors ``guest/src/guests/bench.c``: workload names, the marker port and the
command-line keys. Each workload says which size parameter counts its operations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vmikit.machine import layout

PORT_BENCH = layout.PORT_BENCH  # the guest's markers: outl(tag) before and outl(tag | MARK_END) after a timed section
MARK_END = 0x8000_0000
GUEST = "bench"


@dataclass(frozen=True)
class Workload:
    name: str
    param: str  # the command-line key sizing it: calls, n or m
    unit: str  # what one operation is
    doc: str


WORKLOADS: tuple[Workload, ...] = (
    Workload("null", "calls", "call", "Query.GetVersion through the ROM (natively: nothing, the call is absent)"),
    Workload("rdtsc-vmi", "calls", "call", "vmi_rdtsc(): CPU.RDTSC through the ROM (the full ROM runs it in the guest)"),
    Workload("rdtsc-native", "calls", "call", "the rdtsc instruction"),
    Workload("cpuid-vmi", "calls", "call", "vmi_cpuid(0): CPU.CPUID through the ROM, a hypercall"),
    Workload("cpuid-native", "calls", "call", "the cpuid instruction (an exit KVM handles in the kernel)"),
    Workload("setpte", "n", "page", "map N pages with unqueued SetPTE, one call per page"),
    Workload("map", "n", "page", "map N pages with queued SetPTE, then FlushQueue"),
    Workload("unmap", "n", "page", "unmap N pages (queued), FlushQueue, FlushTLB"),
    Workload("mprotect", "n", "page", "make N pages read-only (queued), FlushQueue, FlushTLB"),
    Workload("fork", "n", "page", "copy-on-write clone of an N-page address space: new tables, both sides read-only"),
    Workload("switch", "m", "switch", "M address-space switches (SetCR3; natively mov cr3)"),
    Workload("demand", "n", "page", "touch N unmapped pages; the guest's #PF handler maps each (SetPTE queued + flush)"),
)
WORKLOAD_NAMES = tuple(w.name for w in WORKLOADS)
BY_NAME = {w.name: w for w in WORKLOADS}
MMU_WORKLOADS = ("setpte", "map", "unmap", "mprotect", "fork", "switch", "demand")


@dataclass(frozen=True)
class Profile:
    name: str
    rom: str
    paging: str
    annotations: str
    doc: str
    privilege: str = "ring0"  # where the guest kernel runs (Session(privilege=...)): a ROM's default is deprivileged

    @property
    def twin(self) -> str | None:
        """The profile that differs from this one only in privilege (None without a ROM)."""
        if self.rom == "none":
            return None
        return self.name[:-len(RING0_SUFFIX)] if self.name.endswith(RING0_SUFFIX) else self.name + RING0_SUFFIX


RING0_SUFFIX = "-ring0"


def _with_ring0_twins(profiles: tuple[Profile, ...]) -> tuple[Profile, ...]:
    """Every profile with a ROM runs deprivileged (the VMI execution model) and, right after it,
    as its `-ring0` twin: the same ROM, paging and annotations with the kernel kept at ring 0."""
    out: list[Profile] = []
    for p in profiles:
        if p.rom == "none":
            out.append(p)
            continue
        out.append(replace(p, privilege="deprivileged", doc=f"{p.doc}; kernel deprivileged at ring 3"))
        out.append(replace(p, name=p.name + RING0_SUFFIX, privilege="ring0", doc=f"{p.doc}; kernel at ring 0"))
    return tuple(out)


PROFILES: tuple[Profile, ...] = _with_ring0_twins((
    Profile("native", "none", "native", "honour", "no ROM, the guest owns its tables (a bare machine under KVM)"),
    Profile("trap", "none", "trap", "honour", "no ROM, page-table stores trap and are emulated"),
    Profile("direct-ignore", "full", "direct", "ignore", "ROM, validated tables, every SetPTE an exit"),
    Profile("direct-honour", "full", "direct", "honour", "ROM, validated tables, queued SetPTE batched"),
    Profile("shadow-ignore", "full", "shadow", "ignore", "ROM, shadow tables, every SetPTE an exit"),
    Profile("shadow-honour", "full", "shadow", "honour", "ROM, shadow tables, queued SetPTE batched"),
))
PROFILE_NAMES = tuple(p.name for p in PROFILES)
PROFILE_BY_NAME = {p.name: p for p in PROFILES}
# --quick: every deprivileged profile, the two without a ROM, and one ring-0 comparison.
QUICK_PROFILES = tuple(p.name for p in PROFILES if p.privilege == "deprivileged" or p.rom == "none") + \
    ("direct-honour" + RING0_SUFFIX,)
QUICK_PROFILES = tuple(n for n in PROFILE_NAMES if n in QUICK_PROFILES)


@dataclass(frozen=True)
class Sizes:
    calls: int = 1000
    n: int = 2048
    m: int = 1000
    reps: int = 5

    def of(self, workload: str) -> int:
        return int(getattr(self, BY_NAME[workload].param))


FULL = Sizes(calls=1000, n=2048, m=1000, reps=5)
QUICK = Sizes(calls=200, n=512, m=200, reps=3)
TINY = Sizes(calls=20, n=64, m=20, reps=2)


def cmdline(workloads: list[str] | tuple[str, ...], sizes: Sizes) -> str:
    return (f"workload={','.join(workloads)} reps={sizes.reps} calls={sizes.calls} n={sizes.n} m={sizes.m}")
