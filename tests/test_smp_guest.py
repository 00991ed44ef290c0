"""The guest runtime's SMP bring-up (issue 16; docs/smp.md): the bundled `smp` guest starts every
CPU the MADT lists (INIT, SIPI, SIPI), runs work on each, sends IPIs and shoots down a TLB entry,
on QEMU with -smp 1, 2 and 4 (the bare machine) and on vmikit with --cpus 1, 2 and 4 (--rom none,
and at ring 0 under the ROM), with the same PASS lines on both."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_boot import pass_lines
from vmikit.bench.workloads import PROFILES, Profile
from vmikit.guest.build import build_guest
from vmikit.session import Session

# Every CPU count prints these; more than one CPU adds MULTI (one CPU says on an INFO line that
# those checks were skipped).
COMMON = [
    "PASS: every CPU the MADT lists came online",
    "PASS: each CPU ran a function and saw its own CPU number, APIC ID and per-CPU data",
    "PASS: smp_run_all ran the function once on every CPU and returned when all were done",
    "PASS: a barrier released no CPU before all had arrived, two rounds in a row",
]
MULTI = [
    "PASS: a fixed IPI reached every other CPU's handler, once each",
    "PASS: TLB shootdown: after smp_flush_tlb_others returns, CPU 1 reads the remapped page's new frame",
    "PASS: TLB shootdown of the whole TLB: every other CPU acknowledged",
]
CPUS = [1, 2, 4]


def expected(cpus: int) -> list[str]:
    return COMMON + (MULTI if cpus > 1 else [])


def run_qemu_smp(qemu: str, image: Path, cpus: int, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [qemu, "-accel", "kvm", "-smp", str(cpus), "-m", "256", "-nodefaults", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-no-reboot",
         "-kernel", str(image)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def smp_image(kvm: str) -> Path:
    return build_guest("smp")


def check_console(console: str, cpus: int) -> None:
    assert pass_lines(console) == expected(cpus), console
    assert not [line for line in console.splitlines() if line.startswith("FAIL")], console
    assert f"INFO: {cpus} CPUs listed in the MADT, {cpus} online" in console, console
    if cpus == 1:
        assert "INFO: one CPU: the IPI and TLB shootdown checks need two and were skipped" in console


@pytest.mark.parametrize("cpus", CPUS)
def test_smp_guest_on_qemu(smp_image: Path, qemu: str, cpus: int) -> None:
    bare = run_qemu_smp(qemu, smp_image, cpus)
    assert bare.returncode == (0 << 1) | 1, bare.stdout + bare.stderr  # isa-debug-exit: (code << 1) | 1
    check_console(bare.stdout, cpus)


@pytest.mark.parametrize("cpus", CPUS)
def test_smp_guest_on_the_bare_board(smp_image: Path, cpus: int) -> None:
    with Session(smp_image, rom="none", cpus=cpus, timeout=120) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    check_console(result.console, cpus)


@pytest.mark.parametrize("cpus", CPUS)
def test_smp_guest_at_ring0_under_the_rom(smp_image: Path, cpus: int) -> None:
    with Session(smp_image, rom="full", privilege="ring0", cpus=cpus, timeout=120) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    check_console(result.console, cpus)


def test_smp_guest_refuses_to_run_deprivileged(smp_image: Path) -> None:
    with Session(smp_image, rom="full", timeout=60) as session:
        result = session.run()
    assert result.exit_status == 2, result.console
    assert "SMP-SETUP failed" in result.console


# --- the mmu workload on several CPUs ------------------------------------------------------


def digest(console: str) -> str:
    lines = [line for line in console.splitlines() if line.startswith("DIGEST ")]
    assert len(lines) == 1, console
    return lines[0]


@pytest.fixture(scope="module")
def mmu_reference(kvm: str) -> str:
    """The single-CPU digest on the bare board, which every other run must print."""
    with Session(build_guest("mmu"), rom="none", timeout=120) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    assert "INFO: step 2 on" not in result.console
    return digest(result.console)


@pytest.mark.parametrize("cpus", CPUS)
def test_mmu_digest_on_qemu_is_the_single_cpu_digest(mmu_reference: str, qemu: str, cpus: int) -> None:
    bare = run_qemu_smp(qemu, build_guest("mmu"), cpus)
    assert bare.returncode == (0 << 1) | 1, bare.stdout + bare.stderr
    assert digest(bare.stdout) == mmu_reference
    assert (f"INFO: step 2 on {cpus} CPUs" in bare.stdout) == (cpus > 1), bare.stdout


@pytest.mark.parametrize("paging", ["native", "trap"])
@pytest.mark.parametrize("cpus", [2, 4])
def test_mmu_digest_on_the_bare_board_is_the_single_cpu_digest(mmu_reference: str, cpus: int, paging: str) -> None:
    # trap: every CPU's stores into the page-table pool trap and are validated, one exit at a time.
    with Session(build_guest("mmu"), rom="none", paging=paging, cpus=cpus, timeout=180) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    assert f"INFO: step 2 on {cpus} CPUs" in result.console
    assert digest(result.console) == mmu_reference


@pytest.mark.parametrize("cpus", [2, 4])
@pytest.mark.parametrize("profile", [p for p in PROFILES if p.rom != "none"], ids=lambda p: p.name)
def test_mmu_digest_under_every_rom_profile_is_the_single_cpu_digest(mmu_reference: str, profile: Profile,
                                                                    cpus: int) -> None:
    # VMI 1.5: the APs start through SetInitialAPState (at ring 3 too when the kernel is
    # deprivileged) and queue into their own ROM buffers; step 2 is shared as on the bare board.
    with Session(build_guest("mmu"), rom=profile.rom, paging=profile.paging, annotations=profile.annotations,
                 privilege=profile.privilege, cpus=cpus, timeout=180) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    assert f"INFO: step 2 on {cpus} CPUs" in result.console, result.console
    assert digest(result.console) == mmu_reference


def test_mmu_under_an_older_rom_stays_on_one_cpu(mmu_reference: str) -> None:
    # A 1.4 ROM has one queue buffer for every CPU: the workload must not share step 2 there.
    from vmikit.abi.history import resolve
    from vmikit.abi.spec import load_spec

    with Session(build_guest("mmu"), rom="full", privilege="ring0", cpus=2, timeout=120,
                 spec=load_spec(resolve("1.4"))) as session:
        result = session.run()
    assert result.exit_status == 0, result.console
    assert "INFO: step 2 on" not in result.console
    assert digest(result.console) == mmu_reference
