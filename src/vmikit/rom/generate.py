"""Generate the ROM's per-build sources from the spec: the stubs + entry table (entries.S),
the layout header (rom_layout.h) and the linker script. Output is deterministic.

What each call gets is decided here (``plan_stubs``); the shared code the stubs jump to
is hand-written in ``src/hcall.S`` (and ``src/queue.c`` for the queue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmikit.abi.cheader import c_comment, c_ident
from vmikit.abi.model import Call, Spec
from vmikit.machine import layout
from vmikit.rom.image import FLAG_HONOURS_ANNOTATIONS, RomProfile

SOURCE_DIR = Path(__file__).resolve().parent / "src"
QUEUE_ANNOTATION = "queue"

# Optional calls that are one plain instruction: the FULL ROM runs them natively, no exit.
# CPUID is not here: what CPUID says is the hypervisor's to decide.
NATIVE = {
    "CPU.RDTSC": "vmi_native_rdtsc",
    "Time.GetCycleCounter": "vmi_native_rdtsc",  # the cycle counter is the TSC (VMI 1.4)
    "CPU.RDPMC": "vmi_native_rdpmc",
    "CPU.IODelay": "vmi_native_iodelay",
    "CPU.EnableInterrupts": "vmi_native_sti",
    "CPU.DisableInterrupts": "vmi_native_cli",
    "CPU.GetInterruptMask": "vmi_native_get_if",
    "CPU.SetInterruptMask": "vmi_native_set_if",
}
# A deprivileged kernel (docs/execution-model.md) runs the ROM at ring 3: instructions that
# need ring 0 are replaced by shared-page code (the interrupt flag, CR2) or by plain hypercalls.
NATIVE_DEPRIVILEGED = {
    "CPU.RDTSC": "vmi_native_rdtsc",
    "Time.GetCycleCounter": "vmi_native_rdtsc",
    "CPU.IODelay": "vmi_native_iodelay",
    "CPU.EnableInterrupts": "vmi_shared_sti",
    "CPU.DisableInterrupts": "vmi_shared_cli",
    "CPU.GetInterruptMask": "vmi_shared_get_if",
    "CPU.SetInterruptMask": "vmi_shared_set_if",
    "CPU.GetCR2": "vmi_shared_cr2",
}
# Hypercalls with work to do in the guest after a successful exit (see hcall.S).
TAILS = {
    "MMU.FlushTLB": "vmi_hcall_flushtlb",
    "MMU.InvalPage": "vmi_hcall_invlpg",
}


@dataclass(frozen=True)
class Stub:
    call_id: int
    name: str  # e.g. "MMU.SetPTE|queue"
    kind: str  # "hypercall" | "native" | "queue"
    target: str  # the label the stub jumps to (or is, for native)

    @property
    def label(self) -> str:
        return self.target if self.kind == "native" else f"vmi_e_{self.call_id:08x}"


def rom_calls(spec: Spec, profile: RomProfile) -> list[Call]:
    """Calls of every ordinary family (not legacy 0x00, not run-time Experimental) in the profile."""
    calls = [c for c in spec.calls() if c.family != 0x00 and not spec.families[c.family].runtime]
    if profile is RomProfile.MINIMAL:
        calls = [c for c in calls if not c.optional]
    return calls


def plan_stubs(spec: Spec, profile: RomProfile, honour_annotations: bool, deprivileged: bool = False) -> list[Stub]:
    """One stub per entry, sorted by call ID (the entry table's order)."""
    stubs: list[Stub] = []
    native = NATIVE_DEPRIVILEGED if deprivileged else NATIVE
    for call in rom_calls(spec, profile):
        name = call.qualified_name
        # GetCR2 is not optional: even the minimal ROM reads it from the shared page.
        if name in native and (call.optional or deprivileged):
            stubs.append(Stub(call.call_id(), name, "native", native[name]))
            continue
        # Deprivileged: the hypervisor completes TLB flushes itself (no invlpg, no CR3 reload here).
        target = "vmi_hcall" if deprivileged else TAILS.get(name, "vmi_hcall")
        if honour_annotations and name == "MMU.FlushQueue":
            target = "vmi_flush_queue"  # flushes the ROM's own buffer (queue.c)
        stubs.append(Stub(call.call_id(), name, "hypercall", target))
        if honour_annotations and QUEUE_ANNOTATION in call.annotations:
            queued = call.call_id(spec.annotation_bits(QUEUE_ANNOTATION))
            stubs.append(Stub(queued, f"{name}|{QUEUE_ANNOTATION}", "queue", "vmi_enqueue"))
    return sorted(stubs, key=lambda s: s.call_id)


def _defines(values: dict[str, int]) -> str:
    return "".join(f"#define {c_ident(k):<24} {int(v):#x}\n" for k, v in values.items())


def layout_header(spec: Spec, profile: RomProfile, honour_annotations: bool, deprivileged: bool = False,
                  smp: bool = False) -> str:
    """rom_layout.h: plain numbers (no C suffixes) so both .S and .c can use them."""
    values = {
        "ROM_SMP": int(smp),  # per-CPU state in GS-based areas (layout.PERCPU_*), for several vCPUs
        "PCPU_SIZE": layout.PERCPU_SIZE,
        "PCPU_SELF": layout.PERCPU_SELF,
        "PCPU_MAGIC": layout.PERCPU_MAGIC,
        "PCPU_MAGIC_VALUE": layout.PERCPU_MAGIC_VALUE,
        "PCPU_CPU": layout.PERCPU_CPU,
        "PCPU_SHARED": layout.PERCPU_SHARED,
        # The ROM's own part of an area, between its header and the shared page: the queue.
        "PCPU_COUNT": 0x10,
        "PCPU_QUEUE": 0x40,
        "PCPU_QUEUE_ENTRIES": (layout.PERCPU_SHARED - 0x40) // spec.batch.entry_size,
        "ROM_BASE": layout.ROM_BASE,
        "ROM_DATA_BASE": layout.ROM_DATA_BASE,
        "ROM_DATA_SIZE": layout.ROM_DATA_SIZE,
        "PORT_HYPERCALL": layout.PORT_HYPERCALL,
        "ROM_HONOURS_ANNOTATIONS": int(honour_annotations),
        "ROM_NATIVE_CALLS": int(profile is RomProfile.FULL),
        "ROM_DEPRIVILEGED": int(deprivileged),
        "SHARED_PAGE": layout.SHARED_PAGE,
        **({"ROM_SHARED_VIF": spec.shared.offset("vif"), "ROM_SHARED_PENDING": spec.shared.offset("pending"),
            "ROM_SHARED_CR2": spec.shared.offset("cr2"),
            "ROM_SHARED_PRIVILEGE": spec.shared.offset("privilege"),
            **{f"ROM_CALL_{name.upper()}": spec.by_name(f"CPU.{name}").call_id()
               for name in ("EnableInterrupts", "DisableInterrupts", "GetInterruptMask", "SetInterruptMask", "GetCR2")}}
           if spec.shared is not None else {}),  # ring 0 too: sti/cli keep the events' vif (1.4)
        "FLUSH_TLB": spec.constants["FLUSH_TLB"].value,
        "FLUSH_GLOBAL": spec.constants["FLUSH_GLOBAL"].value,
        "CR4_PGE": 1 << 7,
        "RFLAGS_IF": 1 << 9,
    }
    return ("/* rom_layout.h: GENERATED by vmikit.rom from machine/layout.py and the spec. */\n"
            "#ifndef VMIKIT_ROM_LAYOUT_H\n#define VMIKIT_ROM_LAYOUT_H\n"
            + _defines(values) + "#endif\n")


def linker_script(template: str) -> str:
    for key in ("ROM_BASE", "ROM_IMAGE_MAX", "ROM_DATA_BASE", "ROM_BSS_MAX"):
        template = template.replace(f"@{key}@", f"{getattr(layout, key):#x}")
    return template


def entries_asm(spec: Spec, stubs: list[Stub], honour_annotations: bool) -> str:
    """entries.S: the header (length, size and checksum patched after linking), the entry
    table and the stubs. Every non-native stub starts with `movl $CALL_ID, %eax` (B8 imm32)."""
    flags = FLAG_HONOURS_ANNOTATIONS if honour_annotations else 0
    out = [
        # entries.S goes through cpp: spec text appears only inside comments, made safe there.
        f"/* entries.S: GENERATED by vmikit.rom from {c_comment(spec.name)} {spec.version}. DO NOT EDIT. */",
        '#include "rom_layout.h"',
        "",
        '\t.section .rom.header, "a"',
        "\t.globl vmi_rom_header",
        "vmi_rom_header:",
        "\t.word 0xAA55\t\t\t/* option-ROM signature */",
        "\t.byte 0\t\t\t\t/* length in 512-byte blocks: patched */",
        "\t.byte 0xC3, 0x90, 0x90\t\t/* legacy init entry: ret */",
        "\t.word 0",
        '\t.ascii "VMIK"',
        f"\t.word {spec.version.major}, {spec.version.minor}\t\t/* interface version */",
        "\t.long 0\t\t\t\t/* image size: patched */",
        f"\t.long {len(stubs)}\t\t\t/* entries */",
        "\t.long vmi_entry_table - ROM_BASE",
        f"\t.long {flags:#x}\t\t\t/* flags: bit 0 = honours annotations */",
        "\t.long vmi_raw_call - ROM_BASE",
        "\t.long ROM_DATA_BASE, ROM_DATA_SIZE",
        "\t.byte 0, 0, 0",
        "\t.byte 0\t\t\t\t/* checksum adjust: patched */",
        "",
        '\t.section .rom.table, "a"',
        "\t.p2align 2",
        "vmi_entry_table:",
    ]
    out += [f"\t.long {int(s.call_id):#010x}, {c_ident(s.label)} - ROM_BASE\t/* {c_comment(s.name)} */" for s in stubs]
    out += ["", "\t.text", '#include "hcall.S"', ""]
    for s in stubs:
        if s.kind == "native":
            continue  # the entry is the hand-written code itself
        out += [f"{c_ident(s.label)}:\t\t\t\t/* {c_comment(s.name)} */", f"\tmovl\t${int(s.call_id):#010x}, %eax"]
        if s.kind == "queue":
            out.append("\tmovl\t%eax, %r8d\t\t/* 5th C argument: the annotated call ID */")
        out.append(f"\tjmp\t{c_ident(s.target)}")
    return "\n".join(out) + "\n"
