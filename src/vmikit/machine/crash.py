"""Crash reports: register dumps and the guest's own exception frame."""

from __future__ import annotations

import struct
from dataclasses import dataclass

EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
    5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
    10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault",
    13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check",
    18: "#MC machine check", 19: "#XM SIMD error", 20: "#VE virtualization", 21: "#CP control protection",
}

# struct exception_frame in the guest runtime: 24 little-endian u64, this order.
FRAME_FIELDS = (
    "vector", "error_code", "rip", "cs", "rflags", "rsp", "ss",
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "cr2", "cr3",
)
FRAME_SIZE = 8 * len(FRAME_FIELDS)


@dataclass(frozen=True)
class GuestException:
    frame: dict[str, int]

    @classmethod
    def parse(cls, raw: bytes) -> GuestException:
        return cls(dict(zip(FRAME_FIELDS, struct.unpack(f"<{len(FRAME_FIELDS)}Q", raw))))

    @property
    def name(self) -> str:
        vector = self.frame["vector"]
        return EXCEPTION_NAMES.get(vector, f"vector {vector}")

    def summary(self) -> str:
        f = self.frame
        text = f"guest exception {self.name} (vector {f['vector']}, error code {f['error_code']:#x}) at rip {f['rip']:#x}"
        if f["vector"] == 14:
            text += f" touching {f['cr2']:#x}"
        return text


def format_registers(state: dict[str, int]) -> str:
    """A compact multi-line register dump, four registers per line."""
    items = [f"{name:>9}={value:#018x}" for name, value in state.items()]
    return "\n".join("  ".join(items[i:i + 4]) for i in range(0, len(items), 4))
