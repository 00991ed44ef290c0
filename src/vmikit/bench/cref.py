"""The C reference: the same bench guest and ROM on a minimal KVM exit loop in C (src/refvmm.c).

``refvmm`` is built with gcc on first use (cached by a hash of its source and the
compiler) and run on a memory image laid out by vmikit's own multiboot loader
with the full ROM at 0xC0000, so the guest executes exactly the same code as
under the Python VMM: ``workload=null`` makes Query.GetVersion hypercalls that
refvmm answers with RAX = 0. The same run then boots the same image, ROM and
command line on the Python VMM (native paging, full ROM), and the null
hypercall's guest-measured ns per call of the two is the ratio.

The two run interleaved, in rounds (C, Python, C, Python, ...): a load spike on this shared
host then lands in one round, not on one side of the whole comparison. The ratio reported is
the median of the per-round ratios (each round: the Python median over its repetitions divided
by the C median over its repetitions); every repetition of every round is kept.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from vmikit.bench.workloads import PROFILE_BY_NAME, Profile, Sizes, cmdline
from vmikit.errors import HostError, VmikitError
from vmikit.machine import layout
from vmikit.machine.loader import load_multiboot

SOURCE = Path(__file__).resolve().parent / "src" / "refvmm.c"
CFLAGS = ("-O2", "-Wall", "-Wextra")
RESULT = re.compile(r"REFVMM status=(-?\d+) exits=(\d+) hypercalls=(\d+) wall_ns=(\d+) tsc_khz=(-?\d+) user_ns=(\d+)")
WORKLOADS = ("null", "spin")


class _FlatMemory:
    """Just enough of GuestMemory for the loader: one flat RAM image from address 0."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray()

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        return 0 <= gpa and gpa + length <= self.size

    def write(self, gpa: int, data: bytes) -> None:
        end = gpa + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[gpa:end] = data

    def zero(self, gpa: int, length: int) -> None:
        self.write(gpa, bytes(length))


def cache_dir() -> Path:
    from vmikit.guest.build import default_cache_dir

    return default_cache_dir().parent / "bench"


def build_refvmm() -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostError("gcc not found (the C reference VMM is built at run time)", "apt-get install gcc")
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + "\0".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"refvmm-{digest}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    proc = subprocess.run([gcc, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HostError(f"building the C reference VMM failed: {proc.stderr.strip().splitlines()[0]}",
                        "install the Linux headers (apt-get install linux-libc-dev)")
    tmp.replace(target)
    return target


def memory_image(image: Path, rom: bytes, memory_mib: int, line: str) -> tuple[bytes, int, int]:
    """(guest memory from 0, entry, multiboot info address), as vmikit's Machine lays it out."""
    memory = _FlatMemory(memory_mib * layout.MiB)
    memory.write(layout.ROM_BASE, rom)
    kernel = load_multiboot(image, memory, memory_mib * layout.MiB, line)  # type: ignore[arg-type]
    return bytes(memory.data), kernel.entry, kernel.info_addr


def run_refvmm(image: Path, rom: bytes, line: str, memory_mib: int) -> dict[str, object]:
    from vmikit.bench.runner import parse_console

    binary = build_refvmm()
    data, entry, info = memory_image(image, rom, memory_mib, line)
    with tempfile.NamedTemporaryFile(prefix="vmikit-bench-", suffix=".img") as f:
        f.write(data)
        f.flush()
        proc = subprocess.run([str(binary), f.name, hex(entry), hex(info), str(memory_mib)], capture_output=True,
                              text=True, timeout=300)
    match = RESULT.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise VmikitError(f"the C reference VMM failed (status {proc.returncode}): {proc.stderr.strip()[-300:]}",
                          "run `vmikit doctor`")
    status, exits, hypercalls, wall_ns, tsc_khz, user_ns = (int(g) for g in match.groups())
    return {"lines": parse_console(proc.stdout), "exits": exits, "hypercalls": hypercalls, "wall_ns": wall_ns,
            "tsc_khz": tsc_khz, "vmm_ns_per_exit": user_ns / exits if exits else None}


def _ns(lines: list[tuple[str, int, int]], workload: str, tsc_khz: int) -> list[float]:
    return [cycles * 1e6 / tsc_khz / ops for name, ops, cycles in lines if name == workload]


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


ROUNDS_FULL = 5
ROUNDS_QUICK = 3


def _round(image: Path, sizes: Sizes, rom: bytes, line: str, memory_mib: int, profile: Profile) -> dict[str, Any]:
    """One C run, then one Python run of the same image, ROM and command line: their raw figures."""
    from vmikit.bench.runner import run_profile

    c = run_refvmm(image, rom, line, memory_mib)
    py = run_profile(image, profile, WORKLOADS, sizes, memory_mib=memory_mib, paging="native", time_exits=True)
    c_khz = int(c["tsc_khz"]) if int(c["tsc_khz"]) > 0 else int(py["tsc_khz"])  # type: ignore[call-overload]
    py_lines = [(s["workload"], s["ops"], s["cycles"]) for s in py["sections"]]
    c_null = _ns(c["lines"], "null", c_khz)  # type: ignore[arg-type]
    py_null = _ns(py_lines, "null", int(py["tsc_khz"]))
    return {"c": c, "py": py, "c_khz": c_khz, "c_null": c_null, "c_spin": _ns(c["lines"], "spin", c_khz),  # type: ignore[arg-type]
            "py_null": py_null, "py_spin": _ns(py_lines, "spin", int(py["tsc_khz"])),
            "py_exits": [s["exits"] / s["ops"] for s in py["sections"] if s["workload"] == "null"],
            "ratio": statistics.median(py_null) / statistics.median(c_null)}


def compare(image: Path, sizes: Sizes, *, memory_mib: int = 128, rounds: int = ROUNDS_FULL,
            profile: Profile = PROFILE_BY_NAME["direct-honour-ring0"]) -> dict[str, object]:
    """The null hypercall on refvmm and on the Python VMM, interleaved over ``rounds`` rounds (C then
    Python in each), same image, ROM and command line.

    At ring 0 on both: refvmm has no execution model (no monitor tables, no event port), so the
    Python side runs the same ring-0 ROM with the kernel kept at ring 0. ``ratio`` is the median
    of the rounds' ratios; ``c`` and ``python`` summarize every repetition of every round."""
    from vmikit.rom import RomProfile, build_rom

    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    line = cmdline(WORKLOADS, sizes)
    rom = build_rom(RomProfile("full"), honour_annotations=profile.annotations == "honour").data
    done = [_round(image, sizes, rom, line, memory_mib, profile) for _ in range(rounds)]

    def every(key: str) -> list[float]:
        return [v for r in done for v in r[key]]

    def median_of(side: str, key: str) -> float | None:
        values = [r[side][key] for r in done if r[side][key] is not None]
        return statistics.median(values) if values else None

    c_null, py_null, c_spin = every("c_null"), every("py_null"), every("c_spin")
    ratios = [r["ratio"] for r in done]
    c_ns, p_ns = statistics.median(c_null), statistics.median(py_null)
    last = done[-1]
    return {
        "cmdline": line,
        "rounds": rounds,
        "method": "interleaved rounds (C, then Python, same image, ROM and command line); ratio = median over "
                  "the rounds of (Python median / C median), each side's median over the round's repetitions",
        "c": {"null_ns_per_call": _summary(c_null), "spin_ns_per_iteration": _summary(c_spin),
              "exits_total": last["c"]["exits"], "hypercalls": last["c"]["hypercalls"],
              "wall_seconds": last["c"]["wall_ns"] / 1e9,
              "tsc_khz": last["c_khz"], "vmm_ns_per_exit": median_of("c", "vmm_ns_per_exit"),
              "null_ns_per_call_by_round": [statistics.median(r["c_null"]) for r in done]},
        "python": {"null_ns_per_call": _summary(py_null), "spin_ns_per_iteration": _summary(every("py_spin")),
                   "exits_per_call": statistics.median(every("py_exits")), "paging": "native", "rom": "full",
                   "annotations": profile.annotations, "privilege": last["py"]["privilege"],
                   "vmm_ns_per_exit": median_of("py", "vmm_ns_per_exit"),
                   "null_ns_per_call_by_round": [statistics.median(r["py_null"]) for r in done]},
        "ratio": statistics.median(ratios),
        "ratio_by_round": ratios,
        "ratio_spread": _summary(ratios),
        # Median over every repetition of each side (not round by round): shown beside the ratio.
        "ratio_of_medians": p_ns / c_ns,
        # What the VMM adds per exit, beyond the floor: (python - C) per call, each call one exit.
        "python_extra_ns_per_exit": p_ns - c_ns,
        "guest_loop_iteration_ns": statistics.median(c_spin),
    }
