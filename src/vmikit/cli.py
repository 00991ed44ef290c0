"""The `vmikit` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vmikit import __version__
from vmikit.errors import GuestCrash, UsageError, VmikitError


class _Group(click.Group):
    """Turns VmikitError into one line on stderr (plus a register dump for guests) and its exit status;
    loads subsystem commands (SUBCOMMANDS) on first use."""

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


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="vmikit")
def main() -> None:
    """vmikit: a paravirtualizing hypervisor on KVM implementing VMI."""


def resolve_image(guest: str) -> Path:
    """A bundled guest name (built on first use) or a path to a multiboot ELF."""
    if "/" in guest or guest.endswith(".elf") or Path(guest).exists():
        return Path(guest)
    from vmikit.guest.build import available_guests, build_guest

    if guest in available_guests():
        return build_guest(guest)
    raise UsageError(f"unknown guest '{guest}'", f"choose one of: {', '.join(available_guests())}, or give an ELF path")


def _stream(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@main.command()
@click.argument("guest", default="hello")
@click.option("--memory", "memory_mib", type=int, default=128, show_default=True, help="Guest RAM in MiB.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Watchdog limit in seconds.")
@click.option("--rom", type=click.Choice(["full", "minimal", "none"]), default=None,
              help="VMI ROM profile: every call, no optional calls, or no ROM (a bare machine). "
                   "Default: full, or none with --paging trap.")
@click.option("--paging", type=click.Choice(["native", "trap", "direct", "shadow"]), default="native",
              show_default=True, help="Page-table style (docs/paging.md).")
@click.option("--audit", is_flag=True, help="Check every page-table invariant after each update batch (slow).")
@click.option("--cmdline", default="", help="The guest's multiboot command line (e.g. pages=4096).")
@click.option("--spec", "spec_name", default=None,
              help="Interface version the hypervisor and its ROM implement: 1.0, 1.1, 1.2 or a spec file "
                   "(default: the packaged spec).")
@click.option("--annotations", type=click.Choice(["honour", "ignore"]), default="honour", show_default=True,
              help="Whether the hypervisor honours call annotations (queued SetPTE).")
@click.option("--privilege", type=click.Choice(["deprivileged", "ring0"]), default=None,
              help="Where the guest kernel runs under a ROM: deprivileged at ring 3, the hypervisor owning ring 0 "
                   "(the default), or at ring 0 (for comparison). Without a ROM: ring 0, a bare machine.")
@click.option("--extension", "extensions", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A Python file registering experimental 0xFF calls (repeatable).")
@click.option("--stats", is_flag=True, help="Print exit counts by reason, port and call after the run.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON summary here.")
def run(guest: str, memory_mib: int, timeout: float, rom: str | None, paging: str, audit: bool, cmdline: str,
        spec_name: str | None, annotations: str, privilege: str | None, extensions: tuple[Path, ...], stats: bool,
        json_file: Path | None) -> None:
    """Run GUEST (a bundled guest name or an ELF path) and exit with its status."""
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
    with Session(image, rom=rom, annotations=annotations, paging=paging, memory_mib=memory_mib, timeout=timeout,
                 console=_stream, experimental=calls, audit=audit, cmdline=cmdline, spec=spec,
                 privilege=privilege) as session:
        result = session.run()
    summary = {"guest": guest, "image": str(image), "memory_mib": memory_mib, **result.summary()}
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


@main.command()
@click.argument("names", nargs=-1)
def build(names: tuple[str, ...]) -> None:
    """Build bundled guests (all by default) and print each ELF path."""
    from vmikit.guest.build import available_guests, build_guest

    for name in names or available_guests():
        click.echo(str(build_guest(name)))


@main.command()
@click.option("--device", default="/dev/kvm", show_default=True, help="The KVM device to check.")
def doctor(device: str) -> None:
    """Check that this host can run vmikit, and say how to fix what is missing."""
    from vmikit.doctor import run_checks

    ok = True
    for check in run_checks(device):
        mark = "ok  " if check.ok else ("warn" if check.optional else "FAIL")
        line = f"[{mark}] {check.name}: {check.detail}"
        if not check.ok and check.fix:
            line += f"; fix: {check.fix}"
        click.echo(line)
        ok &= check.ok or check.optional
    sys.exit(0 if ok else 3)


# Commands that live with their subsystem: name -> (module, attribute). Each module defines one
# click command or group; a subsystem adds itself here and nowhere else in this file. They are
# imported only when used, so `vmikit run` does not pay for the benchmark's or fuzzer's imports.
SUBCOMMANDS = {
    "spec": ("vmikit.abi.cli", "spec_group"),
    "bench": ("vmikit.bench.cli", "bench"),
    "fuzz": ("vmikit.fuzz.cli", "fuzz"),
    "compat": ("vmikit.compat.cli", "compat"),
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
