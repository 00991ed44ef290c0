"""The hostile guest against the hypercall surface (vmikit fuzz), and the bugs it found.

CI runs short fuzz runs with fixed seeds. The full run is documented, not run here:

    vmikit fuzz --calls 1000000 --seed 1 --audit-every 10 --json fuzz.json

Each bug fuzzing found has a regression test below (named test_bug_*), small and
without the fuzzer, so it states the rule that was broken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import vmikit

from vmikit.abi import load_spec
from vmikit.fuzz import FuzzConfig, run_fuzz
from vmikit.fuzz.guestlog import RECORD, RECORD_MAGIC, GuestLog, describe_record
from vmikit.guest import build as gb
from vmikit.hypervisor.pagetables import RW, A, D, P
from vmikit.machine import layout
from vmikit.session import Session

SPEC = load_spec()
CI_CALLS = 6000  # ~8,000 calls/s deprivileged on this machine kind (~1 s a run)


# --- the guest's output format ------------------------------------------------------------

def test_guest_log_parses_the_summary() -> None:
    console = ("FUZZ-START calls=10 seed=0x7 record=0x1234\n"
               "FUZZ-LAST n=3 kind=0 id=0x03000000 a0=0x1 a1=0x2 a2=0x0 status=0 seed=0x7\n"
               "FUZZ-UNEXPECTED status not one this call may give\nFUZZ-FINAL ok\n"
               "FUZZ calls=10 canaries=4 stores=1 unexpected=1 odd=0 broken=0 experimental=2\n"
               "FUZZ status=-0 n=6\nFUZZ status=-4 n=4\n")
    log = GuestLog.parse(console)
    assert (log.calls, log.canaries, log.unexpected, log.experimental, log.record_gpa) == (10, 4, 1, 2, 0x1234)
    assert log.by_status == {0: 6, -4: 4} and log.final == "ok" and log.finished
    assert log.last is not None and log.last.startswith("n=3") and log.why == "status not one this call may give"


def test_record_is_described() -> None:
    raw = RECORD.pack(RECORD_MAGIC, 5, 0, 0x03040000, 0x1000, 1, 0, -4)
    assert describe_record(raw) == "n=5 kind=call id=0x03040000 a0=0x1000 a1=0x1 a2=0x0 status=-4"
    assert describe_record(bytes(RECORD.size)) is None


# --- short runs (CI) -------------------------------------------------------------------------

@pytest.mark.parametrize("paging,seed,privilege", [("direct", 1, "deprivileged"), ("direct", 2, "deprivileged"),
                                                   ("shadow", 3, "deprivileged"), ("direct", 4, "ring0")])
def test_short_fuzz_run_is_clean(kvm: str, paging: str, seed: int, privilege: str) -> None:
    report = run_fuzz(FuzzConfig(calls=CI_CALLS, seed=seed, paging=paging, privilege=privilege))
    assert report.guest.calls >= CI_CALLS
    assert report.handler_failures == []
    assert report.crash is None
    assert report.ok, "\n".join(report.failures + [o.line() for o in report.offences] + [report.guest.last or ""])
    assert set(report.rejections(SPEC.errors)) <= set(SPEC.errors)
    assert report.execution is not None and report.execution["privilege"] == privilege
    # The user-mode attack ran: kernel-only calls made from user mode, refused by the hypervisor.
    assert report.execution["user_entries"] > 0 and report.execution["user_refused"] > 0
    assert report.full_audits >= 1 and report.auditor_disagreements == 0 and 0 < report.audit_share < 1


def test_fuzz_reaches_experimental_calls(kvm: str, tmp_path: Path) -> None:
    ext = tmp_path / "ext.py"
    ext.write_text("@vmi.register(0x07, 'Boom')\n"
                   "def boom(ctx, a, b, c):\n"
                   "    return (1 // (a & 1 ^ 1),)  # ZeroDivisionError for odd a: a bug the fuzzer must report\n")
    proc = vmikit("fuzz", "--calls", "1500", "--seed", "5", "--extension", str(ext), "--json",
                  str(tmp_path / "r.json"), timeout=300)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["experimental_calls_found"] == 1
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any("VMM exception" in f for f in data["failures"]), data["failures"]
    assert "replay with: vmikit fuzz --calls 1500 --seed 5" in proc.stderr
    assert "Experimental.Boom" in proc.stderr  # the offending call, named


def test_cli_writes_json_and_names_rejections(kvm: str, tmp_path: Path) -> None:
    proc = vmikit("fuzz", "--calls", "500", "--seed", "9", "--json", str(tmp_path / "r.json"), timeout=300)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["calls"] >= 500 and data["calls_per_second"] > 0
    assert set(data["rejections"]) <= set(SPEC.errors), data["rejections"]
    assert "fuzz: seed=9 paging=direct privilege=deprivileged" in proc.stdout
    assert data["privilege"] == "deprivileged"
    assert data["rom_writes_refused"] >= 0 and data["audits"] > 0


def test_cli_privilege_ring0_is_recorded_and_replayed(kvm: str, tmp_path: Path) -> None:
    proc = vmikit("fuzz", "--calls", "300", "--seed", "9", "--privilege", "ring0", "--no-straddle", "--json",
                  str(tmp_path / "r.json"), timeout=300)
    data = json.loads((tmp_path / "r.json").read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["privilege"] == "ring0" and data["replay"].endswith("--no-straddle --privilege ring0")
    assert "privilege=ring0" in proc.stdout


# --- regression tests: one per bug the fuzzer found --------------------------------------------

@pytest.fixture(scope="module")
def hello() -> Path:
    return gb.build_guest("hello")


def test_bug_allocate_page_outside_the_pool_is_refused(kvm: str, hello: Path) -> None:
    """docs/paging.md: AllocatePage of a page outside the pool -> BAD_ADDRESS (the fuzzer registered one)."""
    with Session(hello, paging="direct") as session:
        outside = layout.PT_POOL_BASE - 0x10000  # ordinary RAM below the pool
        assert session.mmu.allocate(outside, 1) == "BAD_ADDRESS"
        assert session.mmu.allocate(layout.PT_POOL_BASE, 1) is None


def test_bug_shadow_region_is_not_writable_by_the_guest(kvm: str, hello: Path) -> None:
    """Shadow paging's tables sit in guest-physical space, under the boot identity map: a guest store
    there rewrote the hardware's tables (the fuzzer's store at 0xE0000000 broke 'shadow disagrees')."""
    with Session(hello, paging="shadow") as session:
        private = [r for r in session.machine.memory.regions if r.kind == "private"]
        assert private and all(r.readonly for r in private)


def test_bug_shadow_pool_is_not_writable_by_the_guest(kvm: str, hello: Path) -> None:
    """Under shadow the pool was plain RAM: a guest store into a registered table desynchronised the
    reference counts (the fuzzer's pool store broke WRONG_LEVEL / 'reference counts disagree')."""
    with Session(hello, paging="shadow") as session:
        pool = [r for r in session.machine.memory.regions if r.gpa == layout.PT_POOL_BASE]
        assert pool and pool[0].readonly


def test_bug_shadow_release_trusts_guest_memory() -> None:
    """The exploit behind the two bugs above, on the model: a forged entry (a plain store) lets the
    guest drop a reference the shadow still uses, release that table and get its shadow page reused."""
    from test_pagetables import SHADOW, memory, table

    from vmikit.hypervisor.mmu import ShadowMmu

    m = ShadowMmu(memory(), SHADOW, 0x100000)
    for n, level in enumerate((4, 3, 2, 1)):
        assert m.allocate(table(n), level) is None
    for n in range(3):
        m.apply_pte(table(n), table(n + 1) | P | RW)
    m.memory.write_u64(table(2) + 8, table(3) | P | RW | A)  # the guest's plain store (pool is RAM)
    assert m.check_pte(table(2) + 8, 0) is None
    m.apply_pte(table(2) + 8, 0)  # "unlinks" the forged entry: refs[PT] drops to 0
    assert m.release(table(3)) == "IN_USE"  # PD entry 0 still points at it, in the shadow too


def test_bug_descriptor_table_base_must_be_canonical() -> None:
    """SetGDT/SetIDT took a non-canonical base: the guest-table walk ignores bits 63:48."""
    from test_dispatch import ERR, StandInVcpu, call

    from vmikit.hypervisor import Hypervisor
    from vmikit.memory import GuestMemory, Region

    mem = GuestMemory()
    mem.add(Region(0, 0x10000))
    mem.write_u64(0x1000, 0x2000 | P | RW)  # PML4[0] -> PDPT
    mem.write_u64(0x2000, 0 | P | RW | 0x80)  # PDPT[0]: 1 GiB identity leaf
    vcpu = StandInVcpu()
    hv = Hypervisor(SPEC)
    hv.attach(mem, vcpu)  # type: ignore[arg-type]
    pair = (hv, vcpu)
    assert call(pair, SPEC.by_name("Segmentation.SetGDT").call_id(), 0x3000, 0xFF)[0] == 0
    for base in (1 << 48 | 0x3000, 0x8000_0000_0000_3000):
        status, _ = call(pair, SPEC.by_name("Segmentation.SetGDT").call_id(), base, 0xFF)
        assert status in (ERR["BAD_ADDRESS"], ERR["INVALID_ARGUMENT"]), hex(base)
        status, _ = call(pair, SPEC.by_name("Segmentation.SetIDT").call_id(), base, 0xFF)
        assert status in (ERR["BAD_ADDRESS"], ERR["INVALID_ARGUMENT"]), hex(base)
    assert vcpu.control.gdt.base == 0x3000


def test_bug_shadow_audit_does_not_raise_on_a_forged_entry() -> None:
    """The shadow auditor raised KeyError on a non-leaf entry to an unregistered page (found under fuzz)."""
    from test_pagetables import SHADOW, memory, table

    from vmikit.hypervisor.mmu import ShadowMmu

    m = ShadowMmu(memory(), SHADOW, 0x100000)
    assert m.allocate(table(0), 4) is None
    m.memory.write_u64(table(0), 0x300000 | P | RW | A | D)  # forged: not a registered table
    problems = m.audit()
    assert problems and any("NOT_PAGE_TABLE" in p for p in problems)


def test_a_stalled_guest_is_reported_as_a_hang(kvm: str) -> None:
    """No hypercall for `stall` seconds ends the run as a hang, with the seed to replay."""
    report = run_fuzz(FuzzConfig(calls=10, seed=4, image=gb.build_guest("hang"), stall=1.5, timeout=60))
    assert report.crash == "hang: no hypercall for 1.5 s"
    assert not report.ok and report.failures[0].startswith("hang")


def _segmentation_rig() -> tuple[object, object, object]:
    """Direct paging on test_pagetables' memory, an identity map at 0x1000 and a GDT at 0x3000."""
    from test_dispatch import StandInVcpu
    from test_pagetables import memory

    from vmikit.engine import DescriptorTable
    from vmikit.hypervisor import Hypervisor
    from vmikit.hypervisor.mmu import DirectMmu

    m = DirectMmu(memory())
    m.memory.write_u64(0x1000, 0x2000 | P | RW)  # PML4[0] -> PDPT (plain RAM, the guest's boot map)
    m.memory.write_u64(0x2000, 0 | P | RW | 0x80)  # PDPT[0]: 1 GiB identity leaf
    vcpu = StandInVcpu()
    vcpu.control = type(vcpu.control)(**{**vcpu.control.__dict__, "gdt": DescriptorTable(0x3000, 0xFF)})
    hv = Hypervisor(SPEC, mmu=m)
    hv.attach(m.memory, vcpu)  # type: ignore[arg-type]
    return m, vcpu, hv


def _tss_descriptor(base: int) -> tuple[int, int]:
    low = 0x67 | (base & 0xFFFFFF) << 16 | 0x89 << 40 | ((base >> 24) & 0xFF) << 56
    return low, base >> 32


def test_bug_descriptor_writes_must_not_land_in_a_page_table() -> None:
    """UpdateKernelStack (and the other descriptor-table writes) wrote through the VMM into a
    registered page-table page: any 64-bit value into a validated table (fuzz seed 22, direct)."""
    from test_dispatch import call
    from test_pagetables import table

    m, vcpu, hv = _segmentation_rig()
    for n, level in enumerate((4, 3, 2, 1)):
        assert m.allocate(table(n), level) is None  # type: ignore[attr-defined]
    low, high = _tss_descriptor(table(3))  # a TSS whose rsp0 lies in a registered PT
    m.memory.write_u64(0x3010, low)  # type: ignore[attr-defined]
    m.memory.write_u64(0x3018, high)  # type: ignore[attr-defined]
    pair = (hv, vcpu)
    before = m.memory.read(table(3), 0x1000)  # type: ignore[attr-defined]
    call(pair, SPEC.by_name("Segmentation.SetTR").call_id(), 0x10)
    status, _ = call(pair, SPEC.by_name("Segmentation.UpdateKernelStack").call_id(), 0x4141_4141_4141_4000)
    assert status != 0 and m.memory.read(table(3), 0x1000) == before  # type: ignore[attr-defined]
    # The GDT itself in a page-table page: SetGDT may take it, WriteGDTEntry must not write there.
    loaded, _ = call(pair, SPEC.by_name("Segmentation.SetGDT").call_id(), table(3), 0xFFF)
    status, _ = call(pair, SPEC.by_name("Segmentation.WriteGDTEntry").call_id(), 5, 0x00CF92000000FFFF, 0)
    assert (loaded != 0 or status != 0) and m.memory.read(table(3), 0x1000) == before  # type: ignore[attr-defined]
    assert m.audit() == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("rom", ["full", "none"])
def test_the_fuzz_guest_refuses_a_board_that_does_not_validate(kvm: str, rom: str) -> None:
    """`vmikit run fuzz` with the default --paging native (no validation: its attacks would wreck
    the guest's own tables) triple-faulted under a ROM; now the guest says in one line what it
    needs and exits 2, as it does without a ROM."""
    proc = vmikit("run", "fuzz", "--rom", rom, "--timeout", "60")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "FUZZ-SETUP failed: needs a ROM and --paging direct or shadow" in proc.stdout
    assert "triple fault" not in proc.stderr
