"""`vmikit spec ...`: look at, decode, encode and generate from the interface definition."""

from __future__ import annotations

from pathlib import Path

import click

from vmikit.abi.callid import CALLID_MAX, CallId
from vmikit.abi.describe import describe
from vmikit.abi.model import Spec
from vmikit.abi.spec import load_spec, spec_path
from vmikit.errors import UsageError, VmikitError
from vmikit.outputs import OUTPUT


_SPEC_FILE = "vmikit.abi.spec_file"


class _SpecGroup(click.Group):
    """One line and the error's exit status, also when the group runs on its own (tests, embedding)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except VmikitError as err:
            click.echo(f"vmikit: error: {err}", err=True)
            ctx.exit(err.exit_status)


@click.group("spec", cls=_SpecGroup, short_help="The VMI interface: show, decode, encode, generate.")
@click.option("--spec", "--file", "spec_file", default=None, metavar="VERSION|FILE",
              help="Use this spec (a kept version such as 1.0, or a spec file) instead of the packaged vmi.toml; "
                   "--file is the older name.")
@click.pass_context
def spec_group(ctx: click.Context, spec_file: str | None) -> None:
    """The VMI interface definition: show, decode, encode, generate the C header and reference."""
    from vmikit.abi.history import resolve

    # meta, not obj: the main CLI may own ctx.obj
    ctx.meta[_SPEC_FILE] = resolve(spec_file) if spec_file is not None else None


def _spec_file(ctx: click.Context) -> Path | None:
    return ctx.meta.get(_SPEC_FILE)


def _spec(ctx: click.Context) -> Spec:
    return load_spec(_spec_file(ctx))


def _int(text: str, what: str) -> int:
    try:
        return int(text.replace("_", ""), 0)
    except ValueError:
        try:
            return int(text, 10)  # a decimal with leading zeros
        except ValueError:
            raise UsageError(f"{what} {text!r} is not a number", "give it in hex (0x03000001) or decimal") from None


def _write(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}", "choose a writable path with -o") from None


@spec_group.command("path")
@click.pass_context
def path_cmd(ctx: click.Context) -> None:
    """Print where the spec file is."""
    # No loading: a user looking for a broken spec file still finds it.
    click.echo(str(Path(_spec_file(ctx) or spec_path()).resolve()))


@spec_group.command("show", short_help="A table of every family and call.")
@click.pass_context
def show_cmd(ctx: click.Context) -> None:
    """A table of every family and call."""
    spec = _spec(ctx)
    rows = []
    for call in spec.calls():
        rows.append((
            call.family_name, call.name, f"0x{call.call_id():08x}",
            ", ".join(str(a) for a in call.args) or "-",
            "yes" if call.optional else "",
            "yes" if call.user else "",
            ", ".join(sorted(call.annotations)),
            "" if call.legacy is None else str(call.legacy),
        ))
    headers = ("family", "call", "ID", "args", "optional", "user", "annotations", "legacy")
    title = f"{spec.name} {spec.version}  ({spec.path})"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but a plain table beats a crash
        click.echo(title)
        for row in (headers, *rows):
            click.echo("  ".join(row))
        return
    from rich.text import Text

    # Spec strings are text, never rich markup: a name such as "[link=...]" must print as written.
    table = Table(title=Text(title))
    for header in headers:
        table.add_column(header, no_wrap=header != "args")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console = Console()
    if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


@spec_group.command("decode", short_help="Name the call behind a call ID.")
@click.argument("value")
@click.pass_context
def decode_cmd(ctx: click.Context, value: str) -> None:
    """Name the call behind a call ID (hex or decimal); unknown parts are named, not errors."""
    number = _int(value, "call ID")
    if not 0 <= number <= CALLID_MAX:
        raise UsageError(f"call ID {value} does not fit in 32 bits", "give a value in 0..0xffffffff")
    click.echo(describe(_spec(ctx), number))


@spec_group.command("encode", short_help="Print the call ID of a call name.")
@click.argument("name")
@click.option("--annotation", "-a", "annotations", multiple=True, metavar="NAME|0xNN",
              help="An annotation by name (queue) or as bits; repeatable.")
@click.pass_context
def encode_cmd(ctx: click.Context, name: str, annotations: tuple[str, ...]) -> None:
    """Print the call ID of NAME (e.g. MMU.SetPTE)."""
    spec = _spec(ctx)
    try:
        call = spec.by_name(name)
    except KeyError as exc:
        raise UsageError(str(exc)) from None
    accepted = spec.annotation_mask(call)
    allowed = ", ".join(sorted(call.annotations)) or "none"
    bits = 0
    for ann in annotations:
        if ann.strip()[:1].isdigit():
            value = _int(ann, "annotation")
            if not 0 <= value <= 0xFF:
                raise UsageError(f"annotation {ann} does not fit in 8 bits", "give a value in 0x00..0xff")
        else:
            try:
                value = spec.annotation_bits(ann)
            except KeyError as exc:
                raise UsageError(str(exc)) from None
        if value & ~accepted:
            raise UsageError(f"{call.qualified_name} does not accept annotation {ann}",
                             f"it accepts: {allowed}")
        bits |= value
    click.echo(f"0x{CallId(call.family, call.number, 0, bits).encode():08x}")


@spec_group.command("header")
@click.option("-o", "--output", type=OUTPUT, default=None, help="Write here instead of stdout.")
@click.pass_context
def header_cmd(ctx: click.Context, output: Path | None) -> None:
    """Generate the guest C header vmi_spec.h."""
    from vmikit.abi import cheader

    _write(cheader.generate(_spec(ctx)), output)


@spec_group.command("doc")
@click.option("-o", "--output", type=OUTPUT, default=None, help="Write here instead of stdout.")
@click.pass_context
def doc_cmd(ctx: click.Context, output: Path | None) -> None:
    """Generate the Markdown interface reference."""
    from vmikit.abi import refdoc

    _write(refdoc.generate(_spec(ctx)), output)


@spec_group.command("diff", short_help="Classify every change between two specs.")
@click.argument("old")
@click.argument("new")
def diff_cmd(old: str, new: str) -> None:
    """Classify every change from OLD to NEW (spec files, or fixture versions such as 1.0).

    One line per change: class (breaking / compatible / neutral), kind, what changed. Exits 1
    when NEW's version does not follow the versioning rules (`vmikit spec doc`, "Versioning
    rules"): a breaking change without a major bump, a compatible one without a minor bump.
    """
    from vmikit.abi.diff import check
    from vmikit.abi.history import resolve

    report = check(load_spec(resolve(old)), load_spec(resolve(new)))
    for change in report.changes:
        click.echo(change.line())
    if not report.changes:
        click.echo("no changes")
    for problem in report.problems:
        click.echo(f"rule violated: {problem}")
    click.echo(report.summary())
    if not report.ok:
        raise click.exceptions.Exit(1)
