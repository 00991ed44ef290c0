"""The x86 board: guest RAM, the multiboot kernel, ports, watchdog and the run result.

The board is the ``VcpuOps`` the engine calls from its run loop. Devices (and,
later, the hypercall port) register port handlers with ``on_out``/``on_in``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vmikit.background import Background
from vmikit.engine import BootState, Engine, Exit, ExitKind, StopRun, Vcpu, WatchdogExpired, open_engine
from vmikit.errors import GuestCrash, GuestHang, UsageError
from vmikit.machine import layout
from vmikit.machine.acpi import build_tables
from vmikit.machine.chipset import Chipset
from vmikit.machine.crash import FRAME_SIZE, GuestException, format_registers
from vmikit.machine.loader import MULTIBOOT_BOOTLOADER_MAGIC, LoadedKernel, load_multiboot
from vmikit.machine.fwcfg import FwCfg
from vmikit.machine.edu import Edu
from vmikit.machine.pci import BOARD_DEVICES, PciBus
from vmikit.machine.vtd import VtdUnit
from vmikit.machine.ports import InHandler, OutHandler
from vmikit.machine.testdev import TestDev
from vmikit.machine.uart import HostInput, Uart16550
from vmikit.memory import GuestMemory, GuestMemoryError, Region

ConsoleSink = Callable[[bytes], None]

CONSOLE_CAPTURE_LIMIT = 4 << 20  # bytes kept for the run result; the rest is counted, not stored
WATCHDOG_GRACE_S = 2.0  # after the limit, how long the VMM may stay busy outside the guest
HALT_PROBE_S = 0.1  # how often the watchdog looks for a vCPU halted for good (engine probe_halt)


class Watchdog(Background):
    """Looks for vCPUs halted for good while the run lasts; stops a run at its time limit: first a
    kick that ends the next KVM_RUN, then, if the VMM is stuck outside the guest (a handler that
    does not return, console output nobody reads), hard kicks every grace period until the run
    loop has returned. With several vCPUs the run ends as halted when every one of them is, three
    probes in a row (one probe's flags can lag a CPU that a SIPI just started)."""

    def __init__(self, vcpus: list[Vcpu], limit: float, on_all_halted: Callable[[], None] | None = None) -> None:
        super().__init__("vmikit-watchdog")
        self._vcpus = vcpus
        self._limit = limit
        self._on_all_halted = on_all_halted
        self.hard = False  # a hard kick was needed

    def _loop(self) -> None:
        deadline = time.monotonic() + self._limit
        all_halted = 0
        while (left := deadline - time.monotonic()) > 0:
            if self._done.wait(min(left, HALT_PROBE_S)):
                return
            if self._on_all_halted is not None:
                all_halted = all_halted + 1 if all(v.halted_for_good for v in self._vcpus) else 0
                if all_halted >= 3:
                    self._on_all_halted()
                    all_halted = 0
            for vcpu in self._vcpus:
                vcpu.probe_halt()
        for vcpu in self._vcpus:
            vcpu.kick()
        while not self._done.wait(WATCHDOG_GRACE_S):
            self.hard = True
            for vcpu in self._vcpus:
                vcpu.kick(hard=True)


class CpuOps:
    """One vCPU's view of the board when there are several: the handling of each exit holds the
    board's lock (devices and hypervisor see one exit at a time, as with one vCPU; KVM_RUN itself
    runs unlocked, so the vCPUs' guest code runs in parallel) and names the CPU it came from."""

    __slots__ = ("_machine", "_index", "_lock")

    def __init__(self, machine: Machine, index: int, lock: threading.Lock) -> None:
        self._machine, self._index, self._lock = machine, index, lock

    def pio_out(self, port: int, size: int, value: int) -> None:
        with self._lock:
            self._machine.current_cpu = self._index
            self._machine.pio_out(port, size, value)

    def pio_in(self, port: int, size: int) -> int:
        with self._lock:
            self._machine.current_cpu = self._index
            return self._machine.pio_in(port, size)

    def mmio_read(self, addr: int, size: int) -> int:
        with self._lock:
            self._machine.current_cpu = self._index
            return self._machine.mmio_read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        with self._lock:
            self._machine.current_cpu = self._index
            self._machine.mmio_write(addr, size, value)


@dataclass
class RunResult:
    exit_status: int
    console: str
    exits_by_reason: dict[str, int]
    wall_seconds: float
    console_dropped: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    rom_writes: int = 0  # guest writes to the read-only ROM, refused
    mmio_unmapped: int = 0  # accesses to guest-physical addresses nothing decodes
    reset: str | None = None  # the guest reset the machine, which ended the run: through what
    cpu_seconds: float = 0.0  # the VMM process's own CPU time (every thread) during the run
    exits_by_cpu: list[dict[str, int]] = field(default_factory=list)  # per vCPU, with more than one

    @property
    def exits_total(self) -> int:
        return sum(self.exits_by_reason.values())

    def summary(self) -> dict[str, object]:
        return {
            "exit_status": self.exit_status,
            "exits": {"total": self.exits_total, "by_reason": dict(self.exits_by_reason), "by_port": dict(self.ports),
                      **({"by_cpu": [dict(c) for c in self.exits_by_cpu]} if self.exits_by_cpu else {})},
            "cpus": max(1, len(self.exits_by_cpu)),
            "wall_seconds": round(self.wall_seconds, 6),
            "cpu_seconds": round(self.cpu_seconds, 6),
            "console_bytes_dropped": self.console_dropped,
            "rom_writes_refused": self.rom_writes,
            "mmio_unmapped": self.mmio_unmapped,
            "reset": self.reset,
        }


class Console:
    """COM1 transmit: bytes go to a sink as lines complete, and into a bounded capture."""

    def __init__(self, sink: ConsoleSink | None) -> None:
        self._sink = sink
        self._line = bytearray()
        self.captured = bytearray()
        self.dropped = 0

    def put(self, byte: int) -> None:
        self._line.append(byte)
        if byte == 0x0A or len(self._line) >= 4096:
            self.flush()

    def flush(self) -> None:
        if not self._line:
            return
        line = bytes(self._line)
        self._line.clear()  # first: a sink that raises must not get the same line again
        room = CONSOLE_CAPTURE_LIMIT - len(self.captured)
        self.captured += line[:room]
        self.dropped += max(0, len(line) - room)
        if self._sink is not None:
            self._sink(line)

    def text(self) -> str:
        return self.captured.decode("utf-8", errors="replace")


class Machine:
    """An x86 PC-like board with 1 to 8 vCPUs running a multiboot kernel. vCPU 0 (the BSP) starts
    at the kernel's entry; the others wait for INIT/SIPI, each in KVM_RUN on a thread of its own."""

    def __init__(self, image: Path, *, memory_mib: int = 128, engine: Engine | None = None,
                 console: ConsoleSink | None = None, timeout: float = 30.0, cmdline: str = "",
                 rom: bytes | None = None, pool_readonly: bool = False,
                 private: tuple[int, int] | None = None, console_input: int | None = None, cpus: int = 1,
                 devices: Sequence[str] = ()) -> None:
        unknown = [d for d in devices if d not in BOARD_DEVICES]
        if unknown:
            raise UsageError(f"unknown --device '{unknown[0]}'", f"choose from: {', '.join(BOARD_DEVICES)}")
        if list(devices).count("intel-iommu") > 1:
            raise UsageError("--device intel-iommu given twice", "the board has one remapping unit")
        self.devices = tuple(devices)
        self.pci: PciBus | None = None  # a PCI bus only when a device asks for one (docs/board.md)
        self.iommu: VtdUnit | None = None
        if not 1 <= cpus <= layout.MAX_CPUS:
            raise UsageError(f"--cpus {cpus} is out of range", f"choose 1 to {layout.MAX_CPUS} vCPUs")
        self.cpus = cpus
        self.current_cpu = 0  # the vCPU whose exit is being handled (CpuOps sets it, under the lock)
        if not layout.MIN_MEMORY_MIB <= memory_mib <= layout.MAX_MEMORY_MIB:
            raise UsageError(f"--memory {memory_mib} MiB is out of range",
                             f"choose {layout.MIN_MEMORY_MIB} to {layout.MAX_MEMORY_MIB} MiB")
        if not 0 < timeout <= layout.MAX_TIMEOUT_S:  # also refuses nan
            raise UsageError(f"--timeout {timeout} is out of range",
                             f"give the guest a time limit in seconds, more than 0 and at most {layout.MAX_TIMEOUT_S:g}")
        self.timeout = timeout
        self.ram_end = memory_mib * layout.MiB
        self.memory = GuestMemory()
        self.console = Console(console)
        self._out: dict[int, OutHandler] = {}
        self._in: dict[int, InHandler] = {}
        self._port_counts: dict[int, int] = {}
        self._panic: GuestException | None = None
        self._panic_error: str | None = None
        self.rom: Region | None = None
        self.monitor: Region | None = None
        self._mmio_writers: list[tuple[int, int, OutHandler]] = []
        self._mmio: list[tuple[int, int, InHandler, OutHandler]] = []
        self.reset_by: str | None = None
        self._input: HostInput | None = None
        self.rom_writes = 0
        self.mmio_unmapped = 0
        self._cpu = 0.0  # process CPU time of the last run()
        self._ended_cpu = 0  # the vCPU whose exit ended the run
        self._exit_lock: threading.Lock | None = None  # several vCPUs: held while an exit is handled
        self._own_engine = engine is None
        self.engine = engine or open_engine()
        self.vm = self.engine.create_vm()
        try:
            self._build(image, cmdline, rom, pool_readonly, private)
            if console_input is not None:
                self._input = HostInput(console_input, self.uart)
                self._input.__enter__()
        except BaseException:
            self.close()
            raise

    def _build(self, image: Path, cmdline: str, rom: bytes | None, pool_readonly: bool,
               private: tuple[int, int] | None) -> None:
        regions = [Region(0, layout.LOW_RAM_END, name="low")]
        pool_end = layout.PT_POOL_BASE + layout.PT_POOL_SIZE
        if self.ram_end > pool_end:
            # The page-table pool is its own slot, so trap/direct paging can make it read-only.
            regions += [Region(layout.HIGH_RAM_BASE, layout.PT_POOL_BASE - layout.HIGH_RAM_BASE, name="high"),
                        Region(layout.PT_POOL_BASE, layout.PT_POOL_SIZE, readonly=pool_readonly, name="pt-pool"),
                        Region(pool_end, self.ram_end - pool_end, name="high2")]
        else:
            regions.append(Region(layout.HIGH_RAM_BASE, self.ram_end - layout.HIGH_RAM_BASE, name="high"))
        if private is not None:
            # The hypervisor's own tables (shadow paging): read-only to the guest, which can reach
            # them through its boot identity map; shadow entries carry A/D so the walker never writes.
            regions.append(Region(private[0], private[1], readonly=True, name="hypervisor", kind="private"))
        if rom is not None:
            if len(rom) > layout.ROM_IMAGE_MAX:
                raise UsageError(f"the ROM image is {len(rom)} bytes, more than the {layout.ROM_IMAGE_MAX}-byte window",
                                 "drop calls from the ROM profile")
            self.rom = Region(layout.ROM_BASE, layout.ROM_IMAGE_MAX, readonly=True, name="rom", kind="rom")
            # The monitor area: the hypervisor's own descriptor tables and stubs (a deprivileged
            # kernel runs on them), read-only to the guest like the ROM.
            self.monitor = Region(layout.MONITOR_BASE, layout.MONITOR_SIZE, readonly=True, name="monitor", kind="rom")
            regions += [self.rom, self.monitor, Region(layout.ROM_DATA_BASE, layout.ROM_DATA_SIZE, name="rom-data")]
        # The firmware area: the ACPI tables a PC guest looks for, read-only like a BIOS image.
        regions.append(Region(layout.BIOS_BASE, layout.BIOS_SIZE, readonly=True, name="bios", kind="rom"))
        for region in regions:
            self.memory.add(region)
            self.vm.add_memory(region)
        if rom is not None:
            self.memory.write(layout.ROM_BASE, rom)
        self.memory.write(layout.BIOS_BASE, build_tables(cpus=self.cpus, iommu="intel-iommu" in self.devices))
        self.kernel: LoadedKernel = load_multiboot(image, self.memory, self.ram_end, cmdline)
        self.vcpu = self.vm.create_vcpu(BootState(entry=self.kernel.entry, rax=MULTIBOOT_BOOTLOADER_MAGIC,
                                                  rbx=self.kernel.info_addr))
        self.vcpus = [self.vcpu] + [self.vm.create_vcpu(None) for _ in range(1, self.cpus)]
        self.uart = Uart16550(self.console.put)
        self.fw_cfg = FwCfg(self.ram_end, cpus=self.cpus)
        for device in (self.uart, self.fw_cfg, Chipset(self._reset), TestDev(self._flush_page)):
            device.attach(self)
        if self.devices:
            self.iommu = VtdUnit() if "intel-iommu" in self.devices else None
            self.pci = PciBus(self.iommu)
            for _ in range(self.devices.count("edu")):
                self.pci.add(Edu())
            self.pci.attach(self)
            if self.iommu is not None:
                self.iommu.attach(self)
        self.on_out(layout.PORT_EXIT, self._exit_port)
        self.on_out(layout.PORT_PANIC, self._panic_port)

    # --- devices ---------------------------------------------------------

    def on_out(self, port: int, handler: OutHandler) -> None:
        self._out[port] = handler

    def on_in(self, port: int, handler: InHandler) -> None:
        self._in[port] = handler

    def on_mmio(self, base: int, size: int, read: InHandler, write: OutHandler) -> None:
        self._mmio.append((base, base + size, read, write))

    def irq_line(self, irq: int, level: bool) -> None:
        self.vm.irq_line(irq, level)

    def phys_read(self, gpa: int, length: int) -> bytes:
        if self.memory.kind_of(gpa, length) not in ("ram", "rom"):
            raise GuestMemoryError(gpa, length, "is not memory a device may read")
        return self.memory.read(gpa, length)

    def phys_write(self, gpa: int, data: bytes) -> None:
        if not self.memory.writable_by_guest(gpa, len(data)):
            raise GuestMemoryError(gpa, len(data), "is not RAM a device may write")
        self.memory.write(gpa, data)

    def signal_msi(self, address: int, data: int) -> bool:
        return self.vm.signal_msi(address, data)

    def ioapic_entry(self, pin: int) -> int:
        return self.vm.ioapic_redirection()[pin]

    def _reset(self, how: str) -> None:
        self.reset_by = how
        raise StopRun(0)

    def _flush_page(self, gpa: int) -> None:
        self.vm.flush_translations([(gpa, layout.PAGE_SIZE)])

    def on_mmio_write(self, base: int, size: int, handler: OutHandler) -> None:
        """Guest writes into [base, base+size) that exit (read-only slots) go to handler(addr, size, value)."""
        self._mmio_writers.append((base, base + size, handler))

    def _exit_port(self, port: int, size: int, value: int) -> None:
        raise StopRun(value)

    def _panic_port(self, port: int, size: int, value: int) -> None:
        try:
            self._panic = GuestException.parse(self.memory.read(value, FRAME_SIZE))
        except GuestMemoryError as exc:
            self._panic_error = f"the guest reported an exception with a bad frame address ({exc})"

    # --- VcpuOps ---------------------------------------------------------

    def pio_out(self, port: int, size: int, value: int) -> None:
        self._port_counts[port] = self._port_counts.get(port, 0) + 1
        handler = self._out.get(port)
        if handler is not None:
            handler(port, size, value)
        # Writes to ports nobody decodes are dropped, as on real hardware.

    def pio_in(self, port: int, size: int) -> int:
        self._port_counts[port] = self._port_counts.get(port, 0) + 1
        handler = self._in.get(port)
        return handler(port, size) if handler is not None else (1 << (8 * size)) - 1

    def mmio_read(self, addr: int, size: int) -> int:
        for base, end, read, _ in self._mmio:
            if base <= addr < end:
                return read(addr, size)
        self.mmio_unmapped += 1
        return (1 << (8 * size)) - 1  # unmapped: the bus floats high

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        for base, end, _, write in self._mmio:
            if base <= addr < end:
                write(addr, size, value)
                return
        for base, end, handler in self._mmio_writers:
            if base <= addr < end:
                handler(addr, size, value)
                return
        # A write to the read-only ROM is refused (dropped) and reported; to nowhere, dropped.
        if layout.ROM_BASE <= addr < layout.MONITOR_BASE + layout.MONITOR_SIZE and self.rom is not None:
            self.rom_writes += 1
        else:
            self.mmio_unmapped += 1

    # --- running ---------------------------------------------------------

    def run(self) -> RunResult:
        """Run to the guest's exit; raises GuestCrash/GuestHang with a register dump otherwise."""
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.cpus == 1:
            with Watchdog(self.vcpus, self.timeout) as watchdog:
                try:
                    exit_ = self.vcpu.run(self)
                except WatchdogExpired:  # a hard kick that landed as the run loop was returning
                    exit_ = Exit(ExitKind.KICKED, "stopped by the watchdog")
                if not watchdog.hard:
                    self.console.flush()  # not after a hard kick: the console may be what was stuck
        else:
            exit_ = self._run_smp()
        wall = time.perf_counter() - start
        self._cpu = time.process_time() - cpu_start
        if exit_.kind is ExitKind.STOPPED:
            status = exit_.code if 0 <= exit_.code <= 255 else 255
            if status == layout.EXIT_EXCEPTION and self._panic is not None:
                raise GuestCrash(self._panic.summary(), "fix the guest code at that address",
                                 dump=format_registers(self._panic.frame))
            return self._result(status, wall)
        dump = format_registers(self.vcpus[self._ended_cpu].dump_state())
        if self.cpus > 1:
            dump = f"vCPU {self._ended_cpu}:\n{dump}"
        if exit_.kind is ExitKind.KICKED:
            raise GuestHang(f"guest did not finish within {self.timeout:g} s and was stopped by the watchdog",
                            "raise --timeout if it is just slow, or fix the loop it is stuck in", dump=dump)
        if self._panic_error:
            raise GuestCrash(self._panic_error, "pass the physical address of the exception frame", dump=dump)
        if exit_.kind is ExitKind.SHUTDOWN:
            cause = exit_.detail if exit_.detail != "triple fault" else "the CPU shut down while delivering an exception"
            raise GuestCrash(f"guest triple fault ({cause})", "check the guest's IDT, GDT and stack", dump=dump)
        if exit_.kind is ExitKind.HALT:
            raise GuestCrash("guest halted without writing an exit code",
                             f"end the guest with outl(code, {layout.PORT_EXIT:#x})", dump=dump)
        if exit_.kind is ExitKind.FAIL_ENTRY:
            raise GuestCrash(f"KVM could not enter the guest ({exit_.detail})",
                             "the guest's register state is invalid for VM entry", dump=dump)
        if exit_.kind is ExitKind.INTERNAL_ERROR:
            raise GuestCrash(f"KVM internal error: {exit_.detail}",
                             "see the register dump for the instruction at rip", dump=dump)
        raise GuestCrash(exit_.detail, "report this exit to the vmikit developers", dump=dump)

    @contextlib.contextmanager
    def exit_lock_released(self) -> Iterator[None]:
        """Inside an exit's handler: let the other vCPUs' exits be handled meanwhile (a handler
        that sleeps, CPU.Halt's). The calling vCPU is the current one again afterwards."""
        lock, cpu = self._exit_lock, self.current_cpu
        if lock is None or not lock.locked():
            yield
            return
        lock.release()
        try:
            yield
        finally:
            lock.acquire()
            self.current_cpu = cpu

    def _run_smp(self) -> Exit:
        """Every vCPU on a thread of its own (vCPU 0 on this one, where signals land). The first
        to end the run for a reason of its own (the exit port, a crash) decides how it ended;
        the others are kicked. Halted for good is when every vCPU is."""
        lock = threading.Lock()  # the run's end, decided once
        exits = self._exit_lock = threading.Lock()
        ended: list[tuple[int, Exit]] = []
        all_halted = threading.Event()

        def finish(index: int, exit_: Exit) -> None:
            with lock:
                if exit_.kind is ExitKind.KICKED and (ended or all_halted.is_set()):
                    return  # stopped because another vCPU (or the watchdog's halt check) ended the run
                if not ended:
                    ended.append((index, exit_))
                    for other in self.vcpus:
                        other.kick()

        def halted() -> None:
            all_halted.set()
            for vcpu in self.vcpus:
                vcpu.kick()

        def ap(index: int) -> None:
            try:
                finish(index, self.vcpus[index].run(CpuOps(self, index, exits)))
            except BaseException as exc:  # a VMM bug on this thread: end the run, do not hang it
                finish(index, Exit(ExitKind.INTERNAL_ERROR, f"vCPU {index}'s thread failed: {exc!r}"))

        for vcpu in self.vcpus:
            vcpu.stop_on_halt = False
        threads = [threading.Thread(target=ap, args=(i,), name=f"vmikit-vcpu{i}", daemon=True)
                   for i in range(1, self.cpus)]
        with Watchdog(self.vcpus, self.timeout, halted) as watchdog:
            for thread in threads:
                thread.start()
            try:
                finish(0, self.vcpu.run(CpuOps(self, 0, exits)))
            except WatchdogExpired:
                finish(0, Exit(ExitKind.KICKED, "stopped by the watchdog"))
            for vcpu in self.vcpus:
                vcpu.kick()
            for thread in threads:
                thread.join(WATCHDOG_GRACE_S)  # a thread stuck in a handler stays behind (daemon)
            if not watchdog.hard:
                self.console.flush()
        if ended:
            self._ended_cpu, exit_ = ended[0]
            return exit_
        return Exit(ExitKind.HALT, "every vCPU halted with interrupts disabled, and nothing can wake them")

    def _result(self, status: int, wall: float) -> RunResult:
        counts = [vcpu.exit_counts() for vcpu in self.vcpus]
        total: dict[str, int] = {}
        for per_cpu in counts:
            for reason, n in per_cpu.items():
                total[reason] = total.get(reason, 0) + n
        return RunResult(
            exit_status=status, console=self.console.text(), exits_by_reason=total,
            exits_by_cpu=counts if self.cpus > 1 else [],
            wall_seconds=wall, console_dropped=self.console.dropped,
            ports={f"{p:#x}": n for p, n in sorted(self._port_counts.items())},
            rom_writes=self.rom_writes, mmio_unmapped=self.mmio_unmapped, reset=self.reset_by,
            cpu_seconds=self._cpu,
        )

    def close(self) -> None:
        """Release the VM: vCPU and VM fds first (KVM then drops its hold on guest memory), then
        the engine, then guest memory. Every step runs even if one before it failed."""
        if self.vm is None:
            return
        if self._input is not None:
            self._input.__exit__()
        vm, self.vm = self.vm, None  # type: ignore[assignment]
        try:
            vm.close()
        finally:
            try:
                if self._own_engine:
                    close = getattr(self.engine, "close", None)
                    if close:
                        close()
            finally:
                self.memory.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: TracebackType | None) -> None:
        release_frames(exc)
        self.close()


def release_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames an exception (and those it was raised during)
    passed through: they hold views of the kvm_run page and of guest memory (register structs,
    arrays), which would keep the mappings alive (and make closing them fail) as long as the
    exception is."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
