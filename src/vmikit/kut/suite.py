"""The kvm-unit-tests x86 suite as its own tree describes it: cases from ``x86/unittests.cfg``,
results from the SUMMARY line each test prints on COM1.

Nothing of the suite is copied here: a built tree is pointed at, its configuration parsed.
"""

from __future__ import annotations

import configparser
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from vmikit.errors import UsageError
from vmikit.machine import layout

DEFAULT_TIMEOUT_S = 300.0  # tests are slow here: ring 0 is emulated (DESIGN.md)


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    smp: int
    arch: str
    qemu_params: tuple[str, ...]
    test_args: tuple[str, ...]
    timeout: float

    @property
    def cmdline(self) -> str:
        return " ".join(self.test_args)


@dataclass(frozen=True)
class Outcome:
    """What one run of one case ended with."""

    status: str  # "summary" (reached its SUMMARY), "timeout", "crash", "no-summary"
    summary: str  # the SUMMARY line's text after "SUMMARY: ", or the reason it is missing
    passed: int
    failed: int
    skipped: int
    seconds: float
    exit_code: int | None

    def same_result(self, other: Outcome) -> bool:
        """Both reached the same SUMMARY with the same counts; or, for a test that prints none (the
        vmexit benchmarks), both ended on their own with the same exit status."""
        if self.status != other.status or self.status not in ("summary", "no-summary"):
            return False
        if self.status == "no-summary":
            return self.exit_code == other.exit_code
        return self.summary == other.summary and \
            (self.passed, self.failed, self.skipped) == (other.passed, other.failed, other.skipped)


_SUMMARY = re.compile(r"^SUMMARY: (.*)$", re.M)
_COUNT = {"passed": re.compile(r"^PASS: ", re.M), "failed": re.compile(r"^FAIL: ", re.M),
          "skipped": re.compile(r"^SKIP: ", re.M)}


def parse_output(text: str) -> tuple[str | None, int, int, int]:
    """(the SUMMARY text or None, PASS lines, FAIL lines, SKIP lines) of one test's console."""
    found = _SUMMARY.findall(text)
    counts = [len(_COUNT[k].findall(text)) for k in ("passed", "failed", "skipped")]
    return (found[-1].strip() if found else None, *counts)  # type: ignore[return-value]


def _timeout(text: str | None) -> float:
    """unittests.cfg timeouts are seconds, or a number with s/m/h."""
    if not text:
        return DEFAULT_TIMEOUT_S
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None:
        return DEFAULT_TIMEOUT_S
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def load_cases(tree: Path) -> list[Case]:
    """Every case of a built kvm-unit-tests tree's x86/unittests.cfg whose image was built."""
    cfg_path = tree / "x86" / "unittests.cfg"
    if not cfg_path.is_file():
        raise UsageError(f"{tree} has no x86/unittests.cfg",
                         "give the top of a kvm-unit-tests tree built with ./configure && make")
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(cfg_path.read_text(errors="replace"))
    except configparser.Error as exc:
        raise UsageError(f"cannot parse {cfg_path}: {exc.message}", "use an unmodified kvm-unit-tests tree") from None
    cases = []
    for name in parser.sections():
        entry = parser[name]
        image = tree / "x86" / entry.get("file", "")
        if not entry.get("file") or not image.is_file():
            continue
        try:
            smp = int(entry.get("smp", "1"))
            params = tuple(shlex.split(entry.get("qemu_params", "") or entry.get("extra_params", "")))
            args = tuple(shlex.split(entry.get("test_args", "")))
        except ValueError:
            continue  # an entry this runner cannot read is left out, not guessed at
        cases.append(Case(name=name, image=image, smp=smp, arch=entry.get("arch", "").strip(),
                          qemu_params=params, test_args=args, timeout=_timeout(entry.get("timeout"))))
    if not cases:
        raise UsageError(f"no built test images under {tree / 'x86'}", "run ./configure && make in the tree first")
    return cases


CPU_CHOICES = ("all", "up", "smp")


def covered(cases: list[Case], cpus: str = "all") -> list[Case]:
    """The cases this comparison covers: 64-bit (the tree's default build) on at most the board's
    vCPUs; ``cpus`` "up" keeps the one-CPU cases, "smp" those that ask for more."""
    kept = [c for c in cases if c.arch in ("", "x86_64") and 1 <= c.smp <= layout.MAX_CPUS]
    if cpus == "up":
        return [c for c in kept if c.smp == 1]
    return [c for c in kept if c.smp > 1] if cpus == "smp" else kept


def uniprocessor(cases: list[Case]) -> list[Case]:
    """The one-CPU 64-bit cases."""
    return covered(cases, "up")
