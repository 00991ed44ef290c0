"""The conformance guest through the guest VMI layer, under every ROM profile and on QEMU.

The PASS lines must be the same everywhere (one guest binary, same behaviour); what differs
between a full ROM, a minimal ROM and a bare machine shows only on INFO: lines and in the
hypervisor's per-call counters. Each ROM profile runs with the kernel deprivileged (ring 3, the
default) and at ring 0 (``privilege="ring0"``): the PASS and INFO lines are the same for both.
Also: the experiment guest reaching a call registered from
Python, and the check that a guest was built with the header the spec generates.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from vmikit.abi import load_spec
from vmikit.abi.cheader import generate
from vmikit.guest import build as gb
from vmikit.hypervisor import ExperimentalCalls
from vmikit.machine import layout
from vmikit.session import Session, SessionResult

SPEC = load_spec()
ROMS = ("full", "minimal", "none")
PRIVILEGES = ("deprivileged", "ring0")
# (rom, privilege) of every run: a bare machine has no hypervisor to deprivilege the kernel.
CONFIGS = [(rom, privilege) for rom in ("full", "minimal") for privilege in PRIVILEGES] + [("none", "ring0")]
NCALLS = len(list(SPEC.calls()))
OPTIONAL = {c.qualified_name for c in SPEC.calls() if c.optional}
VERSION_LINE = re.compile(r"^INFO: built with VMI (\d+)\.(\d+) \(0x([0-9a-f]{8})\)$", re.M)


def passes(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("PASS: ")]


def infos(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("INFO: ")]


def run(image: Path, **kw: object) -> SessionResult:
    with Session(image, **kw) as session:  # type: ignore[arg-type]
        return session.run()


def header_problems(image: Path, console: str) -> list[str]:
    """Why the guest's vmi_spec.h disagrees with the spec ([] when it agrees).

    Two independent witnesses: the build record (which vmi_spec.h gcc really included, and its
    hash at build time) and the VMI version the guest prints from the macros it was compiled with.
    """
    problems = []
    info = gb.build_info(image)
    expected = generate(SPEC).encode()
    if info["vmi_spec_sha256"] != hashlib.sha256(expected).hexdigest():
        problems.append(f"{info['vmi_spec_h']} is not the header the spec generates")
    m = VERSION_LINE.search(console)
    if m is None:
        problems.append("the guest did not print the VMI version it was built with")
    elif (int(m[1]), int(m[2]), int(m[3], 16)) != (SPEC.version.major, SPEC.version.minor, SPEC.version.packed):
        problems.append(f"the guest was built with VMI {m[1]}.{m[2]}, the spec is {SPEC.version}")
    return problems


@pytest.fixture(scope="module")
def image() -> Path:
    return gb.build_guest("conformance")


@pytest.fixture(scope="module")
def all_runs(kvm: str, image: Path) -> dict[tuple[str, str], SessionResult]:
    return {(rom, privilege): run(image, rom=rom, privilege=privilege) for rom, privilege in CONFIGS}


@pytest.fixture(scope="module")
def runs(all_runs: dict[tuple[str, str], SessionResult]) -> dict[str, SessionResult]:
    """By ROM profile, as a user gets them without --privilege (deprivileged under a ROM)."""
    return {rom: all_runs[(rom, "ring0" if rom == "none" else "deprivileged")] for rom in ROMS}


@pytest.mark.parametrize("rom,privilege", CONFIGS, ids=[f"{r}-{p}" for r, p in CONFIGS])
def test_conformance_passes(all_runs: dict[tuple[str, str], SessionResult], rom: str, privilege: str) -> None:
    result = all_runs[(rom, privilege)]
    lines = result.console.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], result.console
    assert len(passes(result.console)) >= 40, result.console
    assert f"DONE pass={len(passes(result.console))} fail=0" in lines
    assert result.exit_status == layout.EXIT_OK
    # The kernel really ran where asked: the hypervisor's execution model says so.
    assert result.privilege == privilege
    if rom != "none":  # (a bare machine has no hypervisor, hence no execution model)
        assert result.execution is not None and result.execution["deprivileged"] == (privilege == "deprivileged")


def test_pass_lines_identical_across_roms_and_qemu(all_runs: dict[tuple[str, str], SessionResult], image: Path,
                                                   qemu: str) -> None:
    reference = passes(all_runs[("none", "ring0")].console)
    for config in CONFIGS:
        assert passes(all_runs[config].console) == reference, config
    cmd = [qemu, "-kernel", str(image), "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio",
           "-display", "none", "-no-reboot", "-m", "128", "-accel", "kvm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert passes(proc.stdout) == reference, proc.stdout + proc.stderr
    assert "INFO: no rom" in infos(proc.stdout)
    assert proc.returncode == (layout.EXIT_OK << 1) | 1, proc.stdout + proc.stderr


@pytest.mark.parametrize("privilege", PRIVILEGES)
def test_info_lines_show_the_rom(all_runs: dict[tuple[str, str], SessionResult], privilege: str) -> None:
    full, minimal = (infos(all_runs[(rom, privilege)].console) for rom in ("full", "minimal"))
    none = infos(all_runs[("none", "ring0")].console)
    assert "INFO: no rom" in none and not any(line.startswith("INFO: rom present") for line in none)
    version = f"{SPEC.version.major}.{SPEC.version.minor}"
    for lines in (full, minimal):
        assert any(line.startswith(f"INFO: rom present at 0xc0000, version {version},") for line in lines), lines
        assert "INFO: a queued SetPTE was deferred until MMU.FlushQueue" in lines
        assert "INFO: raw: reserved bits in a call ID are refused with RESERVED_BITS" in lines
    assert "INFO: native fallback for: none" in full
    assert f"INFO: {NCALLS} of {NCALLS} calls through the rom; queued SetPTE entry specialised" in full
    optional_ids = sorted(SPEC.by_name(name).call_id() for name in OPTIONAL)
    assert "INFO: native fallback for: " + " ".join(f"0x{i:08x}" for i in optional_ids) in minimal
    assert "INFO: a queued SetPTE was applied at once" in none


@pytest.mark.parametrize("rom", ["full", "minimal"])
def test_info_lines_identical_across_privileges(all_runs: dict[tuple[str, str], SessionResult], rom: str) -> None:
    """Where the kernel runs changes nothing the guest reports: same INFO lines, same PASS lines."""
    deprivileged, ring0 = (all_runs[(rom, p)].console for p in PRIVILEGES)
    assert infos(deprivileged) == infos(ring0)
    assert passes(deprivileged) == passes(ring0)


@pytest.mark.parametrize("rom", ["full", "minimal"])
def test_deprivileged_witnesses_fault_through_the_hypervisor(all_runs: dict[tuple[str, str], SessionResult],
                                                             rom: str) -> None:
    """Deprivileged, the guest's #UD (WriteIDTEntry's handler) and its #PF on purpose (the CR2 witness)
    are reflected by the hypervisor to the guest's own gates; at ring 0 the CPU delivers them itself."""
    execution = all_runs[(rom, "deprivileged")].execution
    assert execution is not None and execution["by_vector"] == {"6": 1, "14": 1}, execution
    ring0 = all_runs[(rom, "ring0")].execution
    assert ring0 is not None and ring0["exceptions"] == 0, ring0


@pytest.mark.parametrize("privilege", PRIVILEGES)
def test_minimal_rom_runs_optional_calls_natively(all_runs: dict[tuple[str, str], SessionResult], privilege: str) -> None:
    minimal = all_runs[("minimal", privilege)].summary()["exits"]["by_call"]  # type: ignore[index]
    full = all_runs[("full", privilege)].summary()["exits"]["by_call"]  # type: ignore[index]
    assert not OPTIONAL & set(minimal), minimal  # not one optional call reached the hypervisor
    assert full["CPU.CPUID"]["exits"] == 2  # the full ROM makes the hypercall for CPUID ...
    assert "CPU.RDTSC" not in full  # ... but runs RDTSC and the IF calls natively inside the ROM
    for by_call in (full, minimal):
        assert by_call["MMU.SetPTE|queue"]["exits"] == 0 and by_call["MMU.SetPTE|queue"]["calls"] > SPEC.batch.max_entries
        assert by_call["Query.QueryCall"]["calls"] == NCALLS + 1  # every call + one malformed
    assert all_runs[("none", "ring0")].summary()["exits"]["by_call"] == {}  # type: ignore[index]


def test_annotations_ignored_same_pass_lines(kvm: str, image: Path, runs: dict[str, SessionResult]) -> None:
    result = run(image, rom="full", annotations="ignore")
    assert result.exit_status == layout.EXIT_OK, result.console
    assert passes(result.console) == passes(runs["none"].console)
    assert "INFO: a queued SetPTE was applied at once" in infos(result.console)
    # No queue entry in that ROM: the guest's queued SetPTE resolves to the plain entry, one exit each.
    assert "MMU.SetPTE|queue" not in result.by_call
    assert result.by_call["MMU.SetPTE"]["exits"] > SPEC.batch.max_entries


# --- experimental calls -----------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment() -> Path:
    return gb.build_guest("experiment")


def test_experiment_reaches_a_python_call(kvm: str, experiment: Path) -> None:
    calls = ExperimentalCalls()

    @calls.register(0x07, "MulAdd")
    def mul_add(ctx: object, a: int, b: int, c: int) -> tuple[int, ...]:
        return (a * b + c, 42)

    result = run(experiment, rom="full", experimental=calls)
    assert "RESULT status=0 r0=0x2b r1=0x2a" in result.console.splitlines(), result.console
    assert result.exit_status == 0
    assert result.by_call["Experimental.MulAdd"]["calls"] == 1


@pytest.mark.parametrize("rom", ["full", "none"])
def test_experiment_without_the_call(kvm: str, experiment: Path, rom: str) -> None:
    result = run(experiment, rom=rom)
    assert "RESULT unsupported" in result.console.splitlines(), result.console
    assert result.exit_status == 0


# --- the header the guest builds with ----------------------------------------------------

def test_guest_built_with_the_spec_header(runs: dict[str, SessionResult], image: Path) -> None:
    info = gb.build_info(image)
    assert Path(str(info["vmi_spec_h"])).read_bytes() == generate(SPEC).encode()
    assert header_problems(image, runs["none"].console) == []


def test_stale_header_is_detected(kvm: str, tmp_path: Path) -> None:
    """A guest built with a hand-modified vmi_spec.h (an older minor version) is caught."""
    text = generate(SPEC)
    stale = re.sub(r"(#define VMI_VERSION_MINOR\s+)\d+", r"\g<1>0", text)
    stale = re.sub(r"(#define VMI_VERSION\s+)0x[0-9a-f]+u", lambda m: m[1] + f"0x{SPEC.version.major << 16:08x}u", stale)
    assert stale != text
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "vmi_spec.h").write_text(stale)
    image = gb.build_guest("conformance", cache_dir=tmp_path / "cache", include_dirs=[tmp_path / "stale"])
    assert gb.build_info(image)["vmi_spec_h"] == str((tmp_path / "stale" / "vmi_spec.h").resolve())
    result = run(image, rom="none")
    assert "INFO: built with VMI 1.0 (0x00010000)" in result.console.splitlines()
    problems = header_problems(image, result.console)
    assert len(problems) == 2 and "not the header the spec generates" in problems[0], problems
    assert "built with VMI 1.0" in problems[1]


def test_reference_doc_is_generated_from_the_spec() -> None:
    from vmikit.abi import load_spec
    from vmikit.abi.refdoc import generate

    committed = Path(__file__).resolve().parent.parent / "docs" / "vmi-reference.md"
    assert committed.read_text() == generate(load_spec()), "run: vmikit spec doc -o docs/vmi-reference.md"


def test_readme_extension_example_runs(kvm: str) -> None:
    from helpers import vmikit

    example = Path(__file__).resolve().parent.parent / "examples" / "muladd.py"
    proc = vmikit("run", "experiment", "--extension", str(example))
    assert proc.returncode == 0, proc.stderr
    assert "RESULT status=0 r0=0x2b r1=0x2a" in proc.stdout
