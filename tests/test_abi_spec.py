"""The packaged spec: loads, is self-consistent, maps legacy numbers as Linux's vmi.h did."""

from __future__ import annotations

import pytest

from vmikit.abi.callid import CallId
from vmikit.abi.spec import load_spec, spec_path


@pytest.fixture(scope="module")
def spec():
    return load_spec()


def test_loads_and_is_cached(spec) -> None:
    assert spec_path().name == "vmi.toml" and spec_path().is_file()
    assert load_spec() is spec
    assert (spec.version.major, spec.version.minor) == (1, 5)
    assert spec.version.packed == 0x00010005


def test_families(spec) -> None:
    names = {fid: f.name for fid, f in spec.families.items()}
    assert names == {0x00: "Legacy", 0x01: "CPU", 0x02: "Segmentation", 0x03: "MMU", 0x04: "Query",
                     0x05: "EventChannel", 0x06: "Time", 0xFF: "Experimental"}
    assert not spec.families[0x00].calls and not spec.families[0xFF].calls
    assert spec.families[0xFF].runtime


def test_mmu_numbers_fixed_by_mail(spec) -> None:
    mmu = spec.families[0x03].calls
    assert [mmu[n].name for n in range(7)] == [
        "SetPTE", "SetLongPTE", "FlushTLB", "InvalPage", "AllocatePage", "ReleasePage", "FlushQueue",
    ]
    assert spec.by_name("MMU.SetPTE").annotations == {"queue"}
    assert spec.by_name("MMU.SetLongPTE").annotations == {"queue"}
    assert spec.annotation_mask(spec.by_name("MMU.SetPTE")) == 0x01
    assert spec.annotation_mask(spec.by_name("MMU.FlushTLB")) == 0


def test_every_call_id_decodes_back(spec) -> None:
    calls = list(spec.calls())
    assert len(calls) == len({c.call_id() for c in calls})
    for call in calls:
        assert spec.lookup(call.call_id()) is call
        for ann in range(256):  # annotation bits never change which call is named
            assert spec.lookup(call.call_id(ann)) is call
        cid = CallId.decode(call.call_id())
        assert (cid.family, cid.call, cid.reserved, cid.annotation) == (call.family, call.number, 0, 0)
        assert spec.by_name(call.qualified_name) is call


def test_lookup_unknowns(spec) -> None:
    assert spec.lookup(0x07000000) is None  # unknown family
    assert spec.lookup(0x03FF0000) is None  # unknown call
    assert spec.lookup(0x00220000) is None  # legacy-only SYSEXIT
    assert spec.lookup(0x00210000) is spec.by_name("CPU.ReturnToUser")  # IRET, legacy-only before 1.3
    assert spec.lookup(-1) is None and spec.lookup(1 << 32) is None
    assert spec.lookup(0x03000100) is spec.by_name("MMU.SetPTE")  # reserved is the dispatcher's job


@pytest.mark.parametrize(
    ("number", "name"),
    [(38, "MMU.SetPTE"), (39, "MMU.SetLongPTE"), (47, "MMU.FlushTLB"), (17, "CPU.SetCR3"), (0, "CPU.CPUID"),
     (27, "CPU.RDTSC"), (44, "MMU.AllocatePage"), (45, "MMU.ReleasePage"), (46, "MMU.InvalPage"),
     (10, "Segmentation.GetTR"), (8, "Segmentation.GetLDT"), (16, "CPU.SetCR2"), (37, "CPU.Shutdown")],
)
def test_legacy_numbers(spec, number: int, name: str) -> None:
    assert spec.legacy[number].qualified_name == name
    assert spec.legacy[number].legacy == number
    assert spec.lookup(CallId(0x00, number).encode()) is spec.legacy[number]


def test_legacy_table_complete(spec) -> None:
    # Every number Linux's vmi.h (VMI 3.0) defined is either mapped or listed as legacy-only.
    vmi30 = set(range(0, 49)) | set(range(61, 66)) | {73}
    assert set(spec.legacy) | set(spec.legacy_only) == vmi30
    assert not set(spec.legacy) & set(spec.legacy_only)
    assert spec.legacy_name(38) == "SetPxE" and spec.legacy_name(73) == "SetLazyMode"


def test_optional_calls(spec) -> None:
    assert spec.by_name("CPU.CPUID").optional and spec.by_name("CPU.RDTSC").optional
    assert not spec.by_name("CPU.SetCR3").optional


def test_by_name_case_insensitive_and_helpful(spec) -> None:
    assert spec.by_name("mmu.setpte") is spec.by_name("MMU.SetPTE")
    with pytest.raises(KeyError) as info:
        spec.by_name("MMU.SetPTX")
    message = str(info.value)
    assert "MMU.SetPTX" in message and "did you mean MMU.SetPTE" in message and "\n" not in message


def test_errors(spec) -> None:
    required = ["OK", "NOT_SUPPORTED", "RESERVED_BITS", "INVALID_ARGUMENT", "BAD_ADDRESS", "PERMISSION",
                "NOT_PAGE_TABLE", "WRONG_LEVEL", "RESERVED_PTE_BITS", "IN_USE", "BATCH_INVALID"]
    for name in required:
        assert name in spec.errors and spec.error_docs[name]
    assert spec.error("OK") == 0
    assert all(v < 0 for n, v in spec.errors.items() if n != "OK")
    assert len(set(spec.errors.values())) == len(spec.errors)
    assert spec.error_rax("NOT_SUPPORTED") == 0xFFFF_FFFF_FFFF_FFFF
    assert spec.error_name(spec.error_rax("BAD_ADDRESS")) == "BAD_ADDRESS"
    assert spec.error_name(spec.error("IN_USE")) == "IN_USE"
    with pytest.raises(KeyError):
        spec.error("NOPE")


def test_queueable_calls_fit_a_batch_entry(spec) -> None:
    for call in spec.calls():
        if "queue" in call.annotations:
            assert len(call.args) <= spec.batch.max_args
    assert spec.batch.entry_size == 32


def test_flushqueue_and_query_shapes(spec) -> None:
    fq = spec.by_name("MMU.FlushQueue")
    assert [a.type for a in fq.args] == ["gpa", "u32"]
    assert [r.name for r in fq.results] == ["index", "cause"]
    assert [c.name for c in spec.families[0x04].calls.values()] == ["GetVersion", "HasFamily", "QueryCall"]
    assert spec.constants["QUERY_SUPPORTED"].value == 0x100


# --- 1.3: the execution model ----------------------------------------------------------------

def test_execution_model_calls(spec) -> None:
    dep, ret = spec.by_name("CPU.Deprivilege"), spec.by_name("CPU.ReturnToUser")
    assert (dep.call_id(), ret.call_id()) == (0x01190000, 0x011A0000)
    assert dep.args == () and [(r.name, r.type) for r in dep.results] == [("privilege", "u32"), ("shared", "gpa")]
    assert [(a.name, a.type) for a in ret.args] == [("rip", "gva"), ("rsp", "gva"), ("rflags", "u64")]
    assert ret.results == ()
    assert not dep.optional and not ret.optional and not dep.user and not ret.user
    assert dep.since == ret.since == (1, 3)
    assert (ret.legacy, spec.legacy_name(33)) == (33, "IRET")
    assert spec.constants["PRIVILEGE_RING0"].value == 0 and spec.constants["PRIVILEGE_DEPRIVILEGED"].value == 3


def test_user_safe_calls(spec) -> None:
    user = {c.qualified_name for c in spec.calls() if c.user}
    assert user == {"Query.GetVersion", "Query.HasFamily", "Query.QueryCall", "CPU.CPUID", "CPU.RDTSC", "CPU.IODelay",
                    "Time.GetCycleFrequency", "Time.GetCycleCounter", "Time.GetWallclockTime", "CPU.GetCPUInfo"}


def test_shared_page_layout(spec) -> None:
    page = spec.shared
    assert page is not None and page.size == 4096
    layout = [(f.name, f.offset, f.type) for f in page.fields]
    assert layout == [
        ("cr2", 0, "u64"), ("vif", 8, "u32"), ("pending", 12, "u32"), ("vpl", 16, "u32"),
        ("privilege", 20, "u32"), ("kernel_cs", 24, "u32"), ("kernel_ss", 28, "u32"),
        ("user_cs", 32, "u32"), ("user_ss", 36, "u32"), ("exceptions", 40, "u64"),
        ("evtchn_pending", 48, "u64"), ("evtchn_mask", 56, "u64"), ("upcalls", 64, "u64"),
        ("evtchn_dropped", 72, "u64"),
    ]
    assert page.offset("vif") == 8 and page.offset("EXCEPTIONS") == 40 and page.field("cr2").size == 8
    assert all(f.doc for f in page.fields) and page.doc
    with pytest.raises(KeyError) as info:
        page.offset("vff")
    assert "vff" in str(info.value) and "vif" in str(info.value)


def test_older_versions_have_no_shared_page_or_user_calls() -> None:
    from vmikit.abi.history import available_versions

    for version, path in available_versions().items():
        old = load_spec(path)
        if version < (1, 3):
            assert old.shared is None and not any(c.user for c in old.calls()), version
