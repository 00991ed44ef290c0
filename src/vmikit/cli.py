"""The `vmikit` command line."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vmikit import __version__
from vmikit.errors import GuestCrash, UsageError, VmikitError
from vmikit.machine import layout
from vmikit.outputs import EXTENSION, OUTPUT, TIMEOUT

# What a run's exit status means; in `vmikit --help`, `vmikit run --help` and the README.
EXIT_STATUS = """\b
Exit status:
  0    success (run: the guest's own exit code, 0 when every check passed)
  1    a check failed (run: the guest's; bench, fuzz, compat: a finding)
  2    bad input: unknown guest, bad image, bad option
  3    the host cannot run guests: no /dev/kvm, no permission, no compiler
  4    the guest crashed (triple fault, unhandled exception), with registers
  5    the guest hung: the watchdog stopped it after --timeout
  130  interrupted (Ctrl-C)
  141  stdout was closed early (a broken pipe, e.g. | head)"""

# 128 + the signal, as a shell reports a command killed by it.
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (embedded, CliRunner): nothing left to flush
        pass


class _Group(click.Group):
    """Turns VmikitError into one line on stderr (plus a register dump for guests) and its exit status,
    click's usage errors into the same one line, Ctrl-C into `vmikit: interrupted` (130) and a closed
    stdout into silence (141); loads subsystem commands (SUBCOMMANDS) on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {n for n in SUBCOMMANDS if _load_subcommand(n)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in SUBCOMMANDS:
            command = _load_subcommand(cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except VmikitError as err:
            click.echo(f"vmikit: error: {err}", err=True)
            if isinstance(err, GuestCrash) and err.dump:
                click.echo("registers:\n" + err.dump, err=True)
            ctx.exit(err.exit_status)
        except KeyboardInterrupt:
            # A command may catch it first to write partial results, then re-raise: it ends here.
            click.echo("vmikit: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`| head`): it wants no more output, and no traceback either.
            _silence_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        return None  # not reached: ctx.exit raises

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """click's main, with its errors as one `vmikit: error:` line instead of its Usage/Try/Error block."""
        status: int
        try:
            # "vmikit" also under `python -m vmikit`: the name the messages tell the user to type.
            rv = super().main(args, prog_name or "vmikit", complete_var, standalone_mode=False, **extra)
            status = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except click.exceptions.NoArgsIsHelpError as err:  # bare `vmikit`: the help, and success
            click.echo(err.format_message())
            status = 0
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "vmikit"
            click.echo(f"vmikit: error: {_one_line(err.format_message())}; see '{where} --help'", err=True)
            status = err.exit_code
        except click.ClickException as err:
            click.echo(f"vmikit: error: {_one_line(err.format_message())}", err=True)
            status = err.exit_code
        except click.Abort:  # Ctrl-C before a command ran (click turned it into Abort)
            click.echo("vmikit: interrupted", err=True)
            status = EXIT_INTERRUPTED
        if standalone_mode:
            sys.exit(status)
        return status


@click.group(cls=_Group, context_settings=CONTEXT, epilog=EXIT_STATUS)
@click.version_option(__version__, prog_name="vmikit")
def main() -> None:
    """vmikit: a paravirtualizing hypervisor on KVM implementing VMI.

    Guests are multiboot ELF kernels; the bundled ones are built with gcc on first use.
    `vmikit COMMAND -h` describes each command.
    """


class _GuestsCommand(click.Command):
    """A command whose help ends with the bundled guests (listed when the help is shown: a glob, no build)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from vmikit.guest.build import available_guests

        with formatter.section("Bundled guests"):
            formatter.write_text(", ".join(available_guests()))
        super().format_epilog(ctx, formatter)


def resolve_image(guest: str) -> Path:
    """A bundled guest name (built on first use) or a path to a multiboot ELF."""
    if "/" in guest or guest.endswith(".elf") or Path(guest).exists():
        return Path(guest)
    from vmikit.guest.build import available_guests, build_guest

    if guest in available_guests():
        return build_guest(guest)
    raise UsageError(f"unknown guest '{guest}'", f"choose one of: {', '.join(available_guests())}, or give an ELF path")


# What a terminal may receive from a guest unchanged: printable ASCII, newline and tab. Anything
# else (ESC starting OSC 52 clipboard writes, title changes, screen clears; C1 controls; bytes of
# any encoding) is shown as \xNN text. Byte by byte, so chunking does not matter.
_UNSAFE = re.compile(rb"[^\x20-\x7e\n\t]")


def escape_console(data: bytes) -> bytes:
    """The guest's console bytes made safe for a terminal: control and non-ASCII bytes as visible ``\\xNN``."""
    return _UNSAFE.sub(lambda m: b"\\x%02x" % m.group(0)[0], data)


def console_sink(raw: bool = False) -> Callable[[bytes], None]:
    """Where the guest console goes: stdout, escaped when stdout is a terminal (unless ``raw``);
    a pipe or a file gets the exact bytes."""
    out = sys.stdout.buffer
    escape = not raw and sys.stdout.isatty()

    def sink(data: bytes) -> None:
        out.write(escape_console(data) if escape else data)
        out.flush()

    return sink


def console_input() -> int | None:
    """The guest's COM1 input: stdin when it is a terminal or a pipe (not a file or /dev/null,
    which a guest waiting for a line would read to its end at once, or never)."""
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd):
            # A background job reading its terminal would be stopped (SIGTTIN): only in the foreground.
            return fd if os.tcgetpgrp(fd) == os.getpgrp() else None
        return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):  # no stdin, or a replaced one (CliRunner)
        return None


CMDLINE_MAX_BYTES = layout.MAX_CMDLINE_BYTES  # the loader refuses more too


class _Cmdline(click.ParamType):
    """The guest's command line: UTF-8 (argv bytes that are not arrive as surrogates), no NUL,
    at most CMDLINE_MAX_BYTES bytes (the loader would cut it, perhaps inside a character)."""

    name = "text"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            self.fail("the command line is not valid UTF-8; pass it as UTF-8 text", param, ctx)
        if "\0" in text:
            self.fail("the command line contains a NUL byte, which would end it early", param, ctx)
        if size > CMDLINE_MAX_BYTES:
            self.fail(f"the command line is {size} bytes, the guest's holds {CMDLINE_MAX_BYTES}; shorten it",
                      param, ctx)
        return text


PAGING_HELP = ("How page tables are virtualized: native (the guest owns them; no checks), trap (no ROM: every "
               "store into a page table traps and is validated), direct (registered read-only tables, updated "
               "through validated SetPTE calls) or shadow (the hypervisor keeps the tables the hardware walks).")


@main.command(cls=_GuestsCommand, epilog=EXIT_STATUS, short_help="Run a guest and exit with its status.")
@click.argument("guest", default="hello")
@click.option("--memory", "memory_mib", type=click.IntRange(layout.MIN_MEMORY_MIB, layout.MAX_MEMORY_MIB),
              default=128, show_default=True, metavar="MiB",
              help=f"Guest RAM in MiB, {layout.MIN_MEMORY_MIB} to {layout.MAX_MEMORY_MIB} "
                   f"(trap, direct and shadow paging need more than {(layout.PT_POOL_BASE + layout.PT_POOL_SIZE) >> 20}, "
                   "where the page-table pool ends).")
@click.option("--timeout", type=TIMEOUT, default=30.0, show_default=True,
              help="Watchdog limit in seconds (at most a day).")
@click.option("--rom", type=click.Choice(["full", "minimal", "none"]), default=None,
              help="VMI ROM profile: every call, no optional calls, or no ROM (a bare machine). "
                   "Default: full, or none with --paging trap.")
@click.option("--paging", type=click.Choice(["native", "trap", "direct", "shadow"]), default="native",
              show_default=True, help=PAGING_HELP)
@click.option("--audit", is_flag=True, help="Check every page-table invariant after each update batch (slow).")
@click.option("--cmdline", type=_Cmdline(), default="",
              help=f"The guest's multiboot command line, at most {CMDLINE_MAX_BYTES} bytes (e.g. pages=4096).")
@click.option("--cpus", type=click.IntRange(1, layout.MAX_CPUS), default=1, show_default=True,
              help=f"vCPUs, 1 to {layout.MAX_CPUS}: the MADT lists them; the others wait for INIT/SIPI "
                   "(docs/board.md). More than one needs --rom none so far.")
@click.option("--device", "devices", multiple=True, metavar="NAME[,NAME]",
              help="Add a PCI device or the IOMMU, QEMU's names: edu (QEMU's educational device; repeatable), "
                   "intel-iommu (a VT-d unit with interrupt remapping, listed in a DMAR). See docs/board.md.")
@click.option("--spec", "spec_name", default=None, metavar="VERSION|FILE",
              help="Interface version the hypervisor and its ROM implement: 1.0, 1.1, 1.2, 1.3 or a spec file "
                   "(default: the packaged spec).")
@click.option("--annotations", type=click.Choice(["honour", "ignore"]), default="honour", show_default=True,
              help="Whether the hypervisor honours call annotations (queued SetPTE).")
@click.option("--privilege", type=click.Choice(["deprivileged", "ring0"]), default=None,
              help="Where the guest kernel runs under a ROM: deprivileged at ring 3, the hypervisor owning ring 0 "
                   "(the default), or at ring 0 (for comparison). Without a ROM: ring 0, a bare machine.")
@click.option("--extension", "extensions", multiple=True, type=EXTENSION,
              help="A Python file registering experimental 0xFF calls, or a bundled one by name: muladd "
                   "(repeatable).")
@click.option("--stats", is_flag=True, help="Print exit counts by reason, port and call after the run (stderr).")
@click.option("--json", "json_file", type=OUTPUT, help="Write a JSON summary here.")
@click.option("--raw-console", is_flag=True,
              help="Pass the guest's console to a terminal unchanged (by default control bytes are shown as "
                   "\\xNN there; pipes and files always get the exact bytes).")
@click.option("--trace", "trace_file", type=OUTPUT,
              help="Write a Chrome/Perfetto trace-event timeline of every exit and call here (docs/observe.md).")
@click.option("--gdb", "gdb_address", metavar="[HOST:]PORT",
              help="Wait for gdb on this TCP address (host default 127.0.0.1, port 0: any) with the guest stopped "
                   "before its first instruction; the watchdog then defaults to a day (docs/observe.md).")
def run(guest: str, memory_mib: int, timeout: float, rom: str | None, paging: str, audit: bool, cmdline: str,
        spec_name: str | None, annotations: str, privilege: str | None, extensions: tuple[Path, ...], stats: bool,
        json_file: Path | None, raw_console: bool, trace_file: Path | None = None,
        gdb_address: str | None = None, cpus: int = 1, devices: tuple[str, ...] = ()) -> None:
    """Run GUEST (a bundled guest name or an ELF path), streaming its serial console to stdout,
    and exit with its status."""
    from vmikit.hypervisor.experimental import ExperimentalCalls, load_extension
    from vmikit.session import Session

    spec = None
    if spec_name is not None:
        from vmikit.abi.history import resolve
        from vmikit.abi.spec import load_spec

        spec = load_spec(resolve(spec_name))
    calls = ExperimentalCalls()
    for extension in extensions:
        load_extension(extension, calls)
    image = resolve_image(guest)
    from vmikit.observe import trace

    gdb = None
    if gdb_address is not None and cpus > 1:
        raise UsageError("--gdb debugs one vCPU so far", "use --cpus 1 with --gdb")
    if gdb_address is not None:
        from vmikit.observe.gdbstub import GdbStub, parse_address

        gdb = parse_address(gdb_address)
        if click.get_current_context().get_parameter_source("timeout") is click.core.ParameterSource.DEFAULT:
            timeout = layout.MAX_TIMEOUT_S  # a debugging session is as long as the person at gdb wants
    with trace.recording(trace_file), \
            Session(image, rom=rom, annotations=annotations, paging=paging, memory_mib=memory_mib, timeout=timeout,
                    console=console_sink(raw_console), experimental=calls, audit=audit, cmdline=cmdline, spec=spec,
                    privilege=privilege, console_input=console_input(), cpus=cpus,
                    devices=tuple(d.strip() for v in devices for d in v.split(",") if d.strip())) as session:
        result = session.run() if gdb is None else GdbStub(session, gdb, image).run()
    summary = {"guest": guest, "image": str(image), "memory_mib": memory_mib, **result.summary()}
    if result.run.reset is not None:  # not an error: said, so that an early end is not a mystery
        click.echo(f"vmikit: the guest reset the machine ({result.run.reset}); the run ends there, as with QEMU's "
                   "-no-reboot", err=True)
    if stats:
        _print_stats(summary)
    if json_file is not None:
        json_file.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(result.exit_status)


def _print_stats(summary: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    exits = summary["exits"]
    assert isinstance(exits, dict)
    table = Table(title=f"exits: {exits['total']} in {summary['wall_seconds']} s")
    table.add_column("reason / port / call")
    table.add_column("calls", justify="right")
    table.add_column("exits", justify="right")
    for reason, count in exits["by_reason"].items():
        table.add_row(reason, "", str(count))
    for port, count in exits["by_port"].items():
        table.add_row(f"  port {port}", "", str(count))
    for name, counts in exits.get("by_call", {}).items():
        table.add_row(f"  {name}", str(counts["calls"]), str(counts["exits"]))
    Console(stderr=True).print(table)


@main.command(cls=_GuestsCommand, short_help="Build bundled guests and print their ELF paths.")
@click.argument("names", nargs=-1)
def build(names: tuple[str, ...]) -> None:
    """Build bundled guests NAMES (all by default) and print each ELF path, one per line."""
    from vmikit.guest.build import available_guests, build_guest

    for name in names or available_guests():
        click.echo(str(build_guest(name)))


@main.command(short_help="Check that this host can run vmikit.")
@click.option("--device", default="/dev/kvm", show_default=True, help="The KVM device to check.")
def doctor(device: str) -> None:
    """Check that this host can run vmikit, and say how to fix what is missing (exit 3 if it cannot)."""
    from vmikit.doctor import failure, run_checks

    checks = run_checks(device)
    for check in checks:
        mark = "ok  " if check.ok else ("warn" if check.optional else "FAIL")
        line = f"[{mark}] {check.name}: {check.detail}"
        if not check.ok and check.fix:
            line += f"; fix: {check.fix}"
        click.echo(line)
    error = failure(checks)
    if error is not None:  # a script that reads only stderr learns it too
        raise error


# Commands that live with their subsystem: name -> (module, attribute). Each module defines one
# click command or group; a subsystem adds itself here and nowhere else in this file. They are
# imported only when used, so `vmikit run` does not pay for the benchmark's or fuzzer's imports.
SUBCOMMANDS = {
    "spec": ("vmikit.abi.cli", "spec_group"),
    "bench": ("vmikit.bench.cli", "bench"),
    "fuzz": ("vmikit.fuzz.cli", "fuzz"),
    "compat": ("vmikit.compat.cli", "compat"),
    "trace": ("vmikit.observe.cli", "trace_group"),
    "kvm-unit-tests": ("vmikit.kut.cli", "kvm_unit_tests"),
}


def _load_subcommand(name: str) -> click.Command | None:
    import importlib

    module_name, attribute = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):  # a real missing dependency
            raise
        return None  # the subsystem is not part of this build
    command = getattr(module, attribute)
    assert isinstance(command, click.Command)
    return command
