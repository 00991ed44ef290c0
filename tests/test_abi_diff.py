"""`vmikit spec diff`: one pair of spec files per kind of change, each classified correctly,
and the exit status follows the versioning rules (breaking -> major, compatible -> minor)."""

from __future__ import annotations

import copy
import itertools
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vmikit.abi.cli import spec_group
from vmikit.abi.diff import check, diff_specs
from vmikit.abi.history import available_versions, version_path
from vmikit.abi.model import Version
from vmikit.abi.spec import load_spec, spec_path
from vmikit.abi.versioning import RULES, Severity

Doc = dict[str, Any]
BASE = tomllib.loads(version_path(Version(1, 1)).read_text())
SHARED = tomllib.loads(version_path(Version(1, 3)).read_text())["shared"]  # 1.1 has none


def _toml(value: Any) -> str:
    """Enough TOML for a spec: everything inline (JSON strings are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"


def write(doc: Doc, path: Path) -> Path:
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in doc.items()))
    return path


def family(doc: Doc, name: str) -> Doc:
    return next(f for f in doc["family"] if f["name"] == name)


def call(doc: Doc, qualified: str) -> Doc:
    fam, name = qualified.split(".")
    return next(c for c in family(doc, fam).get("call", []) if c["name"] == name)


def shared(doc: Doc) -> Doc:
    """Give DOC the 1.3 shared page (if it has none yet) and return it."""
    return doc.setdefault("shared", copy.deepcopy(SHARED))


def field(doc: Doc, name: str) -> Doc:
    return next(f for f in shared(doc)["fields"] if f["name"] == name)


def drop_call(doc: Doc, qualified: str) -> None:
    fam = family(doc, qualified.split(".")[0])
    fam["call"] = [c for c in fam["call"] if c["name"] != qualified.split(".")[1]]


@dataclass(frozen=True)
class Case:
    kinds: frozenset[str]  # every kind the diff must report, nothing else
    new: Callable[[Doc], None]
    old: Callable[[Doc], None] = lambda d: None

    @property
    def severity(self) -> Severity:
        sev = {RULES[k].severity for k in self.kinds}
        for s in Severity:
            if s in sev:
                return s
        raise AssertionError


def _k(*kinds: str) -> frozenset[str]:
    return frozenset(kinds)


NEW_CALL = {"number": 0x19, "name": "GetTSCKHz", "doc": "TSC frequency in kHz.",
            "results": [{"name": "khz", "type": "u32"}], "since": "1.2"}



def map_iret(doc: Doc, new_call: Doc) -> None:
    """What 1.3 does with legacy-only IRET (33): map it onto a call, keeping its name."""
    doc["legacy_only"] = [o for o in doc["legacy_only"] if o["number"] != 33]
    family(doc, "CPU")["call"].append({**new_call, "legacy": 33, "legacy_name": "IRET"})


CASES: dict[str, Case] = {
    # --- compatible
    "family-added": Case(_k("family-added", "call-added"), lambda d: d["family"].insert(-1, {
        "id": 0x06, "name": "Timer", "doc": "A one-shot timer.", "since": "1.2",
        "call": [{"number": 0, "name": "Arm", "doc": "Arm it.", "args": [{"name": "ns", "type": "u64"}]}]})),
    "call-added": Case(_k("call-added"), lambda d: family(d, "CPU")["call"].append(dict(NEW_CALL))),
    "optional-call-added": Case(_k("optional-call-added"),
                                lambda d: family(d, "CPU")["call"].append({**NEW_CALL, "optional": True})),
    "annotation-added": Case(_k("annotation-added"), lambda d: d["annotations"].update(
        hot={"bit": 0x02, "title": "hot path", "doc": "A hint that the call repeats soon."})),
    "call-accepts-annotation": Case(_k("call-accepts-annotation"),
                                    lambda d: call(d, "MMU.InvalPage").update(annotations=["queue"])),
    "error-added": Case(_k("error-added"), lambda d: d["errors"].update(BUSY={"value": -11, "doc": "Busy."})),
    "constant-added": Case(_k("constant-added"), lambda d: d["constants"].update(MAX_CPUS={"value": 1, "doc": "CPUs."})),
    "type-added": Case(_k("type-added"), lambda d: d["types"].update(u16={"bits": 16, "doc": "16 bits"})),
    "legacy-added": Case(_k("legacy-added"), lambda d: call(d, "Query.GetVersion").update(legacy=70)),
    "legacy-only-mapped": Case(_k("legacy-added"), lambda d: map_iret(d, NEW_CALL),
                               old=lambda d: family(d, "CPU")["call"].append({**NEW_CALL, "since": "1.1"})),
    "call-allows-user": Case(_k("call-allows-user"), lambda d: call(d, "CPU.RDMSR").update(user=True)),
    "shared-added": Case(_k("shared-added"), shared),
    "shared-field-added": Case(_k("shared-field-added"), lambda d: shared(d)["fields"].append(
        {"name": "ticks", "offset": 48, "type": "u64", "doc": "Timer ticks."}), old=shared),
    # A doc string that is a comment in vmi_spec.h changes generated code: never neutral.
    "header-doc-changed": Case(_k("header-doc-changed"), lambda d: call(d, "CPU.CPUID").update(doc="Run CPUID as presented.")),
    "error-doc-changed": Case(_k("header-doc-changed"), lambda d: d["errors"]["BATCH_INVALID"].update(doc="Bad batch.")),
    "constant-doc-changed": Case(_k("header-doc-changed"), lambda d: d["constants"]["FLUSH_TLB"].update(doc="Flush.")),
    "shared-doc-changed": Case(_k("header-doc-changed"), lambda d: field(d, "vif").update(doc="1 = on."), old=shared),
    "shared-page-doc-changed": Case(_k("header-doc-changed"), lambda d: shared(d).update(doc="The page."), old=shared),
    "legacy-only-changed": Case(_k("legacy-only-changed"), lambda d: d["legacy_only"].append(
        {"number": 74, "name": "Unused74", "doc": "Never defined."})),
    "legacy-only-renamed": Case(_k("legacy-only-changed"), lambda d: d["legacy_only"][0].update(name="Renamed")),
    # --- neutral: only the Markdown reference shows these
    "doc-changed": Case(_k("doc-changed"), lambda d: family(d, "CPU").update(doc="The CPU, virtualised.")),
    "type-doc-changed": Case(_k("doc-changed"), lambda d: d["types"]["level"].update(doc="A level.")),
    "interface-doc-changed": Case(_k("doc-changed"), lambda d: d["interface"].update(doc="The interface.")),
    "batch-doc-changed": Case(_k("doc-changed"), lambda d: d["batch"].update(doc="The batch.")),
    "legacy-only-doc-changed": Case(_k("doc-changed"), lambda d: d["legacy_only"][0].update(doc="Not here.")),
    "arg-renamed": Case(_k("arg-renamed"), lambda d: call(d, "Segmentation.SetGDT")["args"][0].update(name="gdt")),
    # --- breaking
    "interface-renamed": Case(_k("interface-renamed"), lambda d: d["interface"].update(name="VMX")),
    "family-removed": Case(_k("family-removed", "call-removed"),
                           lambda d: d["family"].remove(family(d, "Query"))),
    "family-renumbered": Case(_k("family-renumbered", "call-renumbered"),
                              lambda d: family(d, "Query").update(id=0x06)),
    "family-renamed": Case(_k("family-renamed", "call-renamed"), lambda d: family(d, "Query").update(name="Ask")),
    "family-kind-changed": Case(_k("family-kind-changed"), lambda d: family(d, "Experimental").update(runtime=False)),
    "call-removed": Case(_k("call-removed"), lambda d: drop_call(d, "Query.HasFamily")),
    "call-renumbered": Case(_k("call-renumbered"), lambda d: call(d, "Query.HasFamily").update(number=0x05)),
    "call-renamed": Case(_k("call-renamed"), lambda d: call(d, "Query.HasFamily").update(name="FamilyPresent")),
    "args-changed": Case(_k("args-changed"),
                         lambda d: call(d, "Query.HasFamily")["args"][0].update(type="u64")),
    "results-changed": Case(_k("results-changed"), lambda d: call(d, "Query.GetVersion")["results"].append(
        {"name": "build", "type": "u32"})),
    "became-required": Case(_k("became-required"), lambda d: call(d, "CPU.CPUID").update(optional=False)),
    "became-optional": Case(_k("became-optional"), lambda d: call(d, "CPU.GetCR0").update(optional=True)),
    "annotation-removed": Case(_k("annotation-removed", "call-drops-annotation"), lambda d: (
        d["annotations"].clear(), call(d, "MMU.SetPTE").pop("annotations"), call(d, "MMU.SetLongPTE").pop("annotations"))),
    "annotation-bit-changed": Case(_k("annotation-bit-changed"), lambda d: d["annotations"]["queue"].update(bit=0x02)),
    "annotation-meaning-changed": Case(_k("annotation-meaning-changed"),
                                       lambda d: d["annotations"]["queue"].update(title="must be queued")),
    "annotation-doc-changed": Case(_k("annotation-meaning-changed"),
                                   lambda d: d["annotations"]["queue"].update(doc="Deferred until the next SetCR3.")),
    "call-drops-annotation": Case(_k("call-drops-annotation"), lambda d: call(d, "MMU.SetLongPTE").pop("annotations")),
    "error-removed": Case(_k("error-removed"), lambda d: d["errors"].pop("BATCH_INVALID")),
    "error-value-changed": Case(_k("error-value-changed"), lambda d: d["errors"]["BATCH_INVALID"].update(value=-12)),
    "constant-removed": Case(_k("constant-removed"), lambda d: d["constants"].pop("QUERY_SUPPORTED")),
    "constant-value-changed": Case(_k("constant-value-changed"),  # not one the hypervisor hard-codes
                                   lambda d: d["constants"].update(MAX_CPUS={"value": 2, "doc": "CPUs."}),
                                   old=lambda d: d["constants"].update(MAX_CPUS={"value": 1, "doc": "CPUs."})),
    "type-removed": Case(_k("type-removed"), new=lambda d: None,
                         old=lambda d: d["types"].update(u16={"bits": 16, "doc": "16 bits"})),
    "type-bits-changed": Case(_k("type-bits-changed"), lambda d: d["types"]["level"].update(bits=64)),
    "batch-changed": Case(_k("batch-changed"), lambda d: d["batch"].update(max_entries=128)),
    "legacy-removed": Case(_k("legacy-removed"), lambda d: call(d, "CPU.WBINVD").pop("legacy")),
    "legacy-remapped": Case(_k("legacy-remapped"), lambda d: call(d, "MMU.SetPTE").update(legacy_name="SetPxE32")),
    "call-disallows-user": Case(_k("call-disallows-user"), new=lambda d: None,
                                old=lambda d: call(d, "CPU.CPUID").update(user=True)),
    "shared-removed": Case(_k("shared-removed"), new=lambda d: None, old=shared),
    "shared-size-changed": Case(_k("shared-size-changed"), lambda d: shared(d).update(size=2048), old=shared),
    "shared-field-removed": Case(_k("shared-field-removed"), lambda d: shared(d).update(
        fields=[f for f in SHARED["fields"] if f["name"] != "vpl"]), old=shared),
    "shared-field-moved": Case(_k("shared-field-changed"), lambda d: field(d, "vpl").update(offset=48), old=shared),
    "shared-field-retyped": Case(_k("shared-field-changed"), lambda d: field(d, "exceptions").update(type="u32"),
                                 old=shared),
    "shared-field-renamed": Case(_k("shared-field-removed", "shared-field-added"),
                                 lambda d: field(d, "vpl").update(name="level"), old=shared),
}


def bumped(severity: Severity) -> Version:
    return {Severity.BREAKING: Version(2, 0), Severity.COMPATIBLE: Version(1, 2), Severity.NEUTRAL: Version(1, 1)}[severity]


def pair(tmp_path: Path, case: Case, version: Version) -> tuple[Path, Path]:
    old, new = copy.deepcopy(BASE), copy.deepcopy(BASE)
    case.old(old)
    case.new(new)
    new["interface"]["version"] = {"major": version.major, "minor": version.minor}
    for fam in new["family"]:  # what a case adds says since = the new version (1.2 in CASES)
        for item in (fam, *fam.get("call", [])):
            if item.get("since") == "1.2":
                item["since"] = str(version)
    return write(old, tmp_path / "old.toml"), write(new, tmp_path / "new.toml")


def diff(old: Path, new: Path) -> tuple[int, list[tuple[str, str]], str]:
    result = CliRunner().invoke(spec_group, ["diff", str(old), str(new)])
    lines = result.output.splitlines()
    changes = [(ln.split()[0], ln.split()[1]) for ln in lines if ln.split()[0] in {s.value for s in Severity}]
    return result.exit_code, changes, result.output


def test_every_rule_has_a_case() -> None:
    covered = set().union(*(c.kinds for c in CASES.values()))
    assert covered == set(RULES), set(RULES) ^ covered


@pytest.mark.parametrize("name", CASES)
def test_each_change_is_classified(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    old, new = pair(tmp_path, case, bumped(case.severity))
    status, changes, output = diff(old, new)
    assert {kind for _, kind in changes} == case.kinds, output
    for severity, kind in changes:
        assert severity == RULES[kind].severity.value, output
    assert status == 0, output  # the version follows the rules


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.severity is not Severity.NEUTRAL])
def test_a_change_without_its_bump_exits_non_zero(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    old, new = pair(tmp_path, case, Version(1, 1))  # no bump at all
    status, _, output = diff(old, new)
    assert status == 1, output
    bump = "major" if case.severity is Severity.BREAKING else "minor"
    assert f"needs a {bump} bump" in output and "rule violated" in output


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.severity is Severity.BREAKING])
def test_breaking_with_only_a_minor_bump_exits_non_zero(tmp_path: Path, name: str) -> None:
    status, _, output = diff(*pair(tmp_path, CASES[name], Version(1, 2)))
    assert status == 1 and "breaking changes need a major bump (2.0)" in output, output


def test_no_change_and_version_down(tmp_path: Path) -> None:
    same = write(BASE, tmp_path / "same.toml")
    status, changes, output = diff(same, same)
    assert status == 0 and changes == [] and "no changes" in output
    status, _, output = diff(version_path(Version(1, 2)), version_path(Version(1, 1)))
    assert status == 1 and "the version went down" in output


def test_added_call_must_say_since_the_new_version(tmp_path: Path) -> None:
    new = copy.deepcopy(BASE)
    family(new, "CPU")["call"].append({**NEW_CALL, "since": "1.1"})
    new["interface"]["version"] = {"major": 1, "minor": 2}
    status, _, output = diff(write(BASE, tmp_path / "old.toml"), write(new, tmp_path / "new.toml"))
    assert status == 1 and "CPU.GetTSCKHz is new since 1.1 but says since 1.1" in output, output


def test_fixtures_follow_the_rules() -> None:
    versions = list(available_versions())
    assert versions == [Version(1, 0), Version(1, 1), Version(1, 2), Version(1, 3), Version(1, 4), Version(1, 5)]
    for old, new in itertools.pairwise(versions):
        report = check(load_spec(version_path(old)), load_spec(version_path(new)))
        assert report.ok and report.bump == "minor", report.problems
        assert not [c for c in report.changes if c.severity is Severity.BREAKING]
    first = check(load_spec(version_path(Version(1, 0))), load_spec(version_path(Version(1, 1))))
    kinds = {c.kind for c in first.changes}
    assert {"annotation-added", "family-added", "call-accepts-annotation", "call-added"} <= kinds
    second = check(load_spec(version_path(Version(1, 1))), load_spec(version_path(Version(1, 2))))
    assert {c.subject for c in second.changes if c.kind == "family-added"} == {"family EventChannel (0x05)"}


def test_1_3_is_compatible_with_1_2_and_1_1() -> None:
    new = load_spec(version_path(Version(1, 3)))
    for old in (Version(1, 2), Version(1, 1)):
        report = check(load_spec(version_path(old)), new)
        assert report.ok and report.bump == "minor", report.problems
        assert {c.severity for c in report.changes} == {Severity.COMPATIBLE}, [c.line() for c in report.changes]
        by_kind: dict[str, set[str]] = {}
        for c in report.changes:
            by_kind.setdefault(c.kind, set()).add(c.subject.split(" (")[0])
        assert {"CPU.Deprivilege", "CPU.ReturnToUser"} <= by_kind["call-added"]
        assert by_kind["call-allows-user"] == {"Query.GetVersion", "Query.HasFamily", "Query.QueryCall",
                                               "CPU.CPUID", "CPU.RDTSC", "CPU.IODelay"}
        assert by_kind["shared-added"] == {"shared page"}
        assert by_kind["legacy-added"] == {"legacy 33"}  # IRET, legacy-only until 1.2
        assert {"constant PRIVILEGE_RING0", "constant PRIVILEGE_DEPRIVILEGED"} <= by_kind["constant-added"]
    # Going back from 1.3 takes every one of those away: breaking.
    back = {c.kind for c in diff_specs(new, load_spec(version_path(Version(1, 2))))}
    assert {"call-disallows-user", "shared-removed", "call-removed", "legacy-removed"} <= back


def test_1_5_adds_the_smp_calls_compatibly() -> None:
    report = check(load_spec(version_path(Version(1, 4))), load_spec(version_path(Version(1, 5))))
    assert report.ok and report.bump == "minor", report.problems
    assert not [c for c in report.changes if c.severity is Severity.BREAKING]
    added = {c.subject.split(" (")[0] for c in report.changes if c.kind == "call-added"}
    assert added == {"CPU.SetInitialAPState", "CPU.GetCPUInfo", "MMU.FlushTLBMulti", "MMU.InvalPageMulti"}


def test_the_packaged_spec_is_the_newest_fixture() -> None:
    newest, path = list(available_versions().items())[-1]
    assert spec_path().read_bytes() == path.read_bytes(), f"copy vmi.toml to versions/{path.name}"
    report = check(load_spec(path), load_spec(spec_path()))
    assert report.new == newest == Version(1, 5) and report.changes == [], [c.line() for c in report.changes]


def test_versions_by_name_on_the_command_line() -> None:
    result = CliRunner().invoke(spec_group, ["diff", "1.1", "1.2"])
    assert result.exit_code == 0, result.output
    assert "compatible  family-added                family EventChannel (0x05)" in result.output
    assert result.output.splitlines()[-1] == "1.1 -> 1.2: 0 breaking, 6 compatible, 0 neutral; needs a minor bump: OK"
    for old in ("1.2", "1.1"):
        count = len(check(load_spec(version_path(Version(*map(int, old.split("."))))),
                          load_spec(version_path(Version(1, 3)))).changes)
        result = CliRunner().invoke(spec_group, ["diff", old, "1.3"])
        assert result.exit_code == 0, result.output
        assert "compatible  shared-added                shared page: 4096 bytes, 10 field(s)" in result.output
        assert "compatible  call-allows-user            Query.GetVersion (0x04000000): user false -> true" in result.output
        assert result.output.splitlines()[-1] == \
            f"{old} -> 1.3: 0 breaking, {count} compatible, 0 neutral; needs a minor bump: OK"
    result = CliRunner().invoke(spec_group, ["diff", "1.1", "9.9"])
    assert result.exit_code == 2 and "no spec fixture for version 9.9" in result.output
