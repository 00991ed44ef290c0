"""The VMI ROM: builds for every profile, matches docs/rom-abi.md, is rejected when corrupt, caches."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from vmikit.abi.spec import load_spec
from vmikit.errors import HostError
from vmikit.machine import layout
from vmikit.rom import RomImage, RomProfile, build_rom, parse_rom
from vmikit.rom import build as rb
from vmikit.rom import generate
from vmikit.rom.image import CHECKSUM_OFFSET, HEADER

SPEC = load_spec()
QUEUE = SPEC.annotation_bits("queue")
COMBOS = [(p, h) for p in RomProfile for h in (True, False)]
MOV_EAX_IMM32 = 0xB8

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("objcopy") is None,
                                reason="gcc/objcopy not installed (apt-get install gcc binutils)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rom-cache")


@pytest.fixture(scope="module")
def roms(cache: Path) -> dict[tuple[RomProfile, bool], RomImage]:
    return {(p, h): build_rom(p, honour_annotations=h, cache_dir=cache) for p, h in COMBOS}


def _ids(*names: str, annotation: int = 0) -> set[int]:
    return {SPEC.by_name(n).call_id(annotation) for n in names}


def _fix_checksum(data: bytearray) -> bytes:
    data[CHECKSUM_OFFSET] = 0
    data[CHECKSUM_OFFSET] = -sum(data) & 0xFF
    return bytes(data)


@pytest.mark.parametrize(("profile", "honour"), COMBOS, ids=lambda v: getattr(v, "value", str(v)))
def test_header_and_table(roms: dict[tuple[RomProfile, bool], RomImage], profile: RomProfile, honour: bool) -> None:
    rom = roms[profile, honour]
    parsed = parse_rom(rom.data)
    assert parsed.entries == rom.entries and parsed.profile is profile and parsed.honours_annotations is honour
    (sig, blocks, init, _, magic, major, minor, size, count, table, flags, raw,
     data_base, data_size, _pad, _adj) = HEADER.unpack_from(rom.data)
    assert (sig, magic, init) == (0xAA55, b"VMIK", b"\xc3\x90\x90")
    assert (major, minor) == tuple(SPEC.version)
    assert sum(rom.data) % 256 == 0
    assert blocks * 512 == size == len(rom.data) <= layout.ROM_IMAGE_MAX
    assert (data_base, data_size) == (layout.ROM_DATA_BASE, layout.ROM_DATA_SIZE)
    assert flags & 1 == honour
    assert HEADER.size <= raw < size
    pairs = [struct.unpack_from("<II", rom.data, table + 8 * i) for i in range(count)]
    assert [cid for cid, _ in pairs] == sorted(cid for cid, _ in pairs)
    assert all(HEADER.size <= off < size for _, off in pairs)

    plain = {c.call_id() for c in SPEC.calls() if c.family != 0 and not SPEC.families[c.family].runtime}
    optional = {c.call_id() for c in SPEC.calls() if c.optional}
    queued = _ids("MMU.SetPTE", "MMU.SetLongPTE", annotation=QUEUE)
    expected = plain - optional if profile is RomProfile.MINIMAL else plain
    assert set(rom.entries) == expected | (queued if honour else set())
    if not honour:  # an annotated lookup falls back to the plain entry
        assert rom.resolve(SPEC.by_name("MMU.SetPTE").call_id(QUEUE)) == rom.entries[SPEC.by_name("MMU.SetPTE").call_id()]


def test_sizes_fit(roms: dict[tuple[RomProfile, bool], RomImage]) -> None:
    for rom in roms.values():
        assert len(rom.data) <= layout.ROM_IMAGE_MAX
    assert len(roms[RomProfile.FULL, True].data) >= len(roms[RomProfile.MINIMAL, False].data)


def test_hypercall_stubs_load_their_call_id(roms: dict[tuple[RomProfile, bool], RomImage]) -> None:
    native = {SPEC.by_name(n).call_id() for n in generate.NATIVE}
    for rom in roms.values():
        for cid, off in rom.entries.items():
            if cid in native:
                continue
            assert rom.data[off] == MOV_EAX_IMM32, f"{cid:#010x}"
            assert struct.unpack_from("<I", rom.data, off + 1)[0] == cid, f"{cid:#010x}"
    full = roms[RomProfile.FULL, True]
    rdtsc = full.entries[SPEC.by_name("CPU.RDTSC").call_id()]
    assert full.data[rdtsc:rdtsc + 2] == b"\x0f\x31"  # runs rdtsc natively, no exit
    cpuid = full.entries[SPEC.by_name("CPU.CPUID").call_id()]
    assert full.data[cpuid] == MOV_EAX_IMM32  # CPUID stays the hypervisor's
    queued = full.entries[SPEC.by_name("MMU.SetPTE").call_id(QUEUE)]
    assert full.data[queued + 5:queued + 8] == b"\x41\x89\xc0"  # mov %eax,%r8d: id to vmi_enqueue


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed (apt-get install binutils)")
def test_objdump_spot_check(roms: dict[tuple[RomProfile, bool], RomImage], tmp_path: Path) -> None:
    rom = roms[RomProfile.FULL, True]
    path = tmp_path / "rom.bin"
    path.write_bytes(rom.data)

    def disasm(offset: int, n: int = 3) -> list[str]:
        base = layout.ROM_BASE + offset
        out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={layout.ROM_BASE:#x}",
                              f"--start-address={base:#x}", f"--stop-address={base + 24:#x}", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return [line.split("\t")[-1].strip() for line in out.splitlines() if line.startswith("   c")][:n]

    for name in ("MMU.SetPTE", "CPU.SetCR3", "Query.GetVersion"):
        cid = SPEC.by_name(name).call_id()
        assert disasm(rom.entries[cid])[0].replace(" ", "") == f"mov${cid:#x},%eax"
    raw = disasm(rom.raw_entry, 5)
    assert [i.split()[0] for i in raw] == ["mov"] * 5 and raw[0].replace(" ", "") == "mov%edi,%eax"


def test_queue_buffer_lives_in_rom_data(cache: Path, roms: dict[tuple[RomProfile, bool], RomImage]) -> None:
    elves = [p for p in cache.glob("*/rom.elf") if (p.parent / "queue.c").is_file()]
    assert elves
    with elves[0].open("rb") as f:
        elf = ELFFile(f)
        bss = elf.get_section_by_name(".bss")
        assert bss["sh_type"] == "SHT_NOBITS" and bss["sh_addr"] == layout.ROM_DATA_BASE
        symbols = {s.name: s for s in elf.get_section_by_name(".symtab").iter_symbols()}
        queue = symbols["vmi_queue"]
        assert queue["st_size"] == SPEC.batch.max_entries * SPEC.batch.entry_size
        assert layout.ROM_DATA_BASE <= queue["st_value"] < layout.ROM_DATA_BASE + layout.ROM_DATA_SIZE


def test_corrupt_images_rejected(roms: dict[tuple[RomProfile, bool], RomImage]) -> None:
    good = roms[RomProfile.FULL, True]
    flipped = bytearray(good.data)
    flipped[200] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        parse_rom(bytes(flipped))
    bad_sig = bytearray(good.data)
    bad_sig[8:12] = b"VMIX"
    with pytest.raises(ValueError, match="VMI signature"):
        parse_rom(_fix_checksum(bad_sig))
    bad_sig[0:2] = b"\x00\x00"
    with pytest.raises(ValueError, match="option-ROM signature"):
        parse_rom(_fix_checksum(bad_sig))
    table = struct.unpack_from("<I", good.data, 24)[0]
    outside = bytearray(good.data)
    struct.pack_into("<I", outside, table + 4, len(good.data) + 16)
    with pytest.raises(ValueError, match="outside the image"):
        parse_rom(_fix_checksum(outside))
    unsorted = bytearray(good.data)
    first, second = unsorted[table:table + 8], unsorted[table + 8:table + 16]
    unsorted[table:table + 16] = second + first
    with pytest.raises(ValueError, match="not sorted"):
        parse_rom(_fix_checksum(unsorted))
    major = bytearray(good.data)
    struct.pack_into("<H", major, 12, SPEC.version.major + 1)
    with pytest.raises(ValueError, match="major"):
        parse_rom(_fix_checksum(major))
    with pytest.raises(ValueError, match="disagree"):
        parse_rom(_fix_checksum(bytearray(good.data[:-512])))
    with pytest.raises(ValueError, match="too short"):
        parse_rom(good.data[:20])


def test_cache_hit_skips_compilation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_rom(RomProfile.MINIMAL, honour_annotations=True, cache_dir=tmp_path)

    def no_compile(*_: object) -> bytes:
        raise AssertionError("cache miss: recompiled")

    monkeypatch.setattr(rb, "_compile", no_compile)
    second = build_rom(RomProfile.MINIMAL, honour_annotations=True, cache_dir=tmp_path)
    assert second == first
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1
    with pytest.raises(AssertionError, match="cache miss"):  # another flag is another key
        build_rom(RomProfile.MINIMAL, honour_annotations=False, cache_dir=tmp_path)


def test_missing_gcc_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb.shutil, "which", lambda name: None if name == "gcc" else "/usr/bin/" + name)
    with pytest.raises(HostError, match=r"gcc not found.*apt-get install gcc binutils") as err:
        build_rom(cache_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_compile_failure_names_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "entries_asm", lambda *_: "\tthis is not an instruction\n")
    with pytest.raises(HostError, match="building the VMI ROM failed") as err:
        build_rom(cache_dir=tmp_path)
    log = Path(str(err.value).rsplit("full log in ", 1)[1])
    assert log.is_file() and "not an instruction" in log.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build")]  # temp dir cleaned


def test_a_spec_without_the_queue_annotation_builds_an_unaware_rom(tmp_path: Path) -> None:
    from vmikit.abi.history import version_path
    from vmikit.abi.model import Version
    from vmikit.abi.spec import load_spec

    old = load_spec(version_path(Version(1, 0)))
    assert "queue" not in old.annotations
    image = build_rom(RomProfile.FULL, honour_annotations=True, spec=old, cache_dir=tmp_path)
    assert not image.honours_annotations
    assert parse_rom(image.data, old).entries == image.entries


# What a ring-3 kernel must never execute (each raises #GP there): a deprivileged ROM has none.
PRIVILEGED_MNEMONICS = ("cli", "sti", "hlt", "invlpg", "wrmsr", "rdmsr", "rdpmc", "lgdt", "lidt", "ltr", "lldt",
                        "clts", "wbinvd", "swapgs", "sysret", "iret")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed (apt-get install binutils)")
@pytest.mark.parametrize("profile", list(RomProfile))
def test_deprivileged_rom_has_no_privileged_instruction(cache: Path, profile: RomProfile) -> None:
    def instructions(deprivileged: bool) -> list[str]:
        rom = build_rom(profile, honour_annotations=True, cache_dir=cache, deprivileged=deprivileged)
        elf_path = next(p / "rom.elf" for p in cache.iterdir() if (p / "rom.bin").is_file()
                        and (p / "rom.bin").read_bytes() == rom.data)
        with elf_path.open("rb") as f:  # the code starts at vmi_hcall; before it: header and table
            symtab = ELFFile(f).get_section_by_name(".symtab")
            start = symtab.get_symbol_by_name("vmi_hcall")[0]["st_value"]
        out = subprocess.run(["objdump", "-d", f"--start-address={start:#x}", str(elf_path)],
                             capture_output=True, text=True, check=True).stdout
        return [parts[2].strip() for parts in (line.split("\t") for line in out.splitlines()) if len(parts) >= 3]

    def privileged(code: list[str]) -> list[str]:
        return [i for i in code if i.split(" ")[0] in PRIVILEGED_MNEMONICS or "%cr" in i or "%db" in i]

    ring0 = privileged(instructions(False))
    assert any("%cr3" in i for i in ring0), "the check must see the ring-0 ROM's CR3 reload"
    if profile is RomProfile.FULL:
        assert {"cli", "sti"} <= {i.split(" ")[0] for i in ring0}
    assert privileged(instructions(True)) == []


def test_cache_entries_are_readable_by_all_whatever_the_umask(tmp_path: Path) -> None:
    """Issue 13 item 5 for the ROM cache: entries were left to the umask (the build directory
    mkdtemp's 0700), so a cache made by one user could not be read by another."""
    import os
    import stat
    import subprocess
    import sys

    cache = tmp_path / "rom"
    code = f"from vmikit.rom import build_rom; from pathlib import Path; build_rom(cache_dir=Path({str(cache)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr
    entries = [cache, *cache.rglob("*")]
    assert any(p.name == "rom.bin" for p in entries)
    for path in entries:
        assert stat.S_IMODE(path.stat().st_mode) == (0o644 if path.is_file() else 0o755), path
