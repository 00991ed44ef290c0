"""The VMM's memory beyond guest RAM, measured in a fresh child process.

The child imports vmikit, notes its RSS (the interpreter and modules), runs one
bench session (shadow paging, queued calls, the kernel deprivileged: the profile that
keeps the most hypervisor state) and, before closing it, reads ``/proc/self/smaps`` and
``/proc/self/status``: the resident size of the guest's RAM mappings (the
anonymous mappings backing guest-physical memory) and the process's peak RSS
(VmHWM). *Beyond guest RAM* = VmHWM - guest RAM resident. Guest RAM only grows
during a run, so its final residency is its peak. The hypervisor's private
shadow-table region is counted as VMM memory, not guest RAM.

    python -m vmikit.bench.memprobe '{"workloads": [...], "sizes": {...}, "memory_mib": 128}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmikit.errors import VmikitError

PROFILE = "shadow-honour"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _resident_kib(ranges: list[tuple[int, int]]) -> int:
    total = 0
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = any(lo < end and start < hi for start, end in ranges)
            elif current and head == "Rss:":
                total += int(line.split()[1])
    return total


def child(args: dict[str, object]) -> dict[str, object]:
    from vmikit.bench.workloads import PROFILE_BY_NAME, Sizes, cmdline
    from vmikit.guest.build import build_guest
    from vmikit.session import Session

    image = build_guest("bench")
    baseline = _status_kib("VmRSS")
    profile = PROFILE_BY_NAME[PROFILE]
    sizes = Sizes(**args["sizes"])  # type: ignore[arg-type]
    line = cmdline(args["workloads"], sizes)  # type: ignore[arg-type]
    memory_mib = int(args["memory_mib"])  # type: ignore[call-overload]
    with Session(image, rom=profile.rom, paging=profile.paging, annotations=profile.annotations,
                 memory_mib=memory_mib, timeout=300, cmdline=line, privilege=profile.privilege) as session:
        result = session.run()
        regions = session.machine.memory.regions
        guest = [(r.host_addr, r.host_addr + r.size) for r in regions if r.kind != "private"]
        private = [(r.host_addr, r.host_addr + r.size) for r in regions if r.kind == "private"]
        guest_kib = _resident_kib(guest)
        private_kib = _resident_kib(private)
        hwm = _status_kib("VmHWM")
        rss = _status_kib("VmRSS")
    return {"profile": PROFILE, "privilege": result.privilege, "cmdline": line, "exit_status": result.exit_status, "guest_ram_mib": memory_mib,
            "baseline_rss_kib": baseline, "peak_rss_kib": hwm, "final_rss_kib": rss,
            "guest_ram_resident_kib": guest_kib, "shadow_tables_resident_kib": private_kib,
            "beyond_guest_kib": hwm - guest_kib, "beyond_guest_mib": round((hwm - guest_kib) / 1024, 2),
            "vmm_growth_kib": hwm - guest_kib - baseline}


def probe(workloads: tuple[str, ...] | list[str], sizes: object, *, memory_mib: int = 128) -> dict[str, object]:
    import dataclasses

    args = {"workloads": list(workloads), "sizes": dataclasses.asdict(sizes), "memory_mib": memory_mib}  # type: ignore[call-overload]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding vmikit/
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "vmikit.bench.memprobe", json.dumps(args)], capture_output=True,
                          text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise VmikitError(f"the memory probe failed: {proc.stderr.strip()[-300:]}", "run `vmikit bench` without it")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
