"""The flatfs command line. The single error boundary: a FlatfsError becomes
one line on stderr and exit status 1; anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .chain import OpenOptions, open_chain
from .errors import FlatfsError
from .extents import Kind


class FlatfsGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlatfsError as exc:
            click.echo(f"flatfs: {exc}", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            # `flatfs map | head`: not an error worth a traceback.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            ctx.exit(1)


def chain_options(format_flag: tuple[str, ...] = ("-f", "--format")) -> Callable:
    """The options every command that opens a chain shares."""

    def deco(fn: Callable) -> Callable:
        opts = [
            click.option(
                *format_flag,
                "fmt",
                type=click.Choice(["qcow2", "raw"]),
                default=None,
                help="Format of the top image (default: probe).",
            ),
            click.option(
                "--backing-dir",
                type=click.Path(file_okay=False),
                default=None,
                help="Refuse backing and data files that resolve outside DIR.",
            ),
            click.option("--no-backing", is_flag=True, help="Show the top image alone."),
            click.option(
                "--allow-probe-raw", is_flag=True, help="Probe a backing file with no recorded format as raw."
            ),
            click.option(
                "--allow-special", is_flag=True, help="Allow backing/data files that are devices or FIFOs."
            ),
            click.option(
                "-U",
                "--force-share",
                is_flag=True,
                help="Open images even if a writer holds them (no locking).",
            ),
        ]
        for o in reversed(opts):
            fn = o(fn)

        @functools.wraps(fn)
        def wrapper(
            *args: Any,
            fmt: str | None,
            backing_dir: str | None,
            no_backing: bool,
            allow_probe_raw: bool,
            allow_special: bool,
            force_share: bool,
            **kw: Any,
        ) -> Any:
            kw["options"] = OpenOptions(
                format=fmt,
                backing_dir=backing_dir,
                no_backing=no_backing,
                allow_probe_raw=allow_probe_raw,
                allow_special=allow_special,
                force_share=force_share,
            )
            return fn(*args, **kw)

        return wrapper

    return deco


@click.group(cls=FlatfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flatfs")
def main() -> None:
    """Inspect and flatten qcow2/raw backing chains."""


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


@main.command()
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@chain_options()
def info(image: str, output: str, options: OpenOptions) -> None:
    """Describe IMAGE and its backing chain, top first."""
    from .info import chain_info

    with open_chain(image, options) as chain:
        rows = chain_info(chain)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for i, r in enumerate(rows):
        if i:
            click.echo("")
        click.echo(f"[{r['depth']}] {r['filename']}")
        click.echo(f"    format:        {r['format']}")
        click.echo(f"    virtual size:  {human_size(r['virtual-size'])} ({r['virtual-size']} bytes)")
        click.echo(f"    disk size:     {human_size(r['actual-size'])}")
        if "cluster-size" in r:
            click.echo(f"    cluster size:  {r['cluster-size']}")
        if "compat" in r:
            click.echo(f"    compat:        {r['compat']}")
        if r.get("backing-filename"):
            fmt = r.get("backing-filename-format") or "(not recorded)"
            click.echo(f"    backing file:  {r['backing-filename']} (format: {fmt})")
        if r.get("features"):
            click.echo(f"    features:      {', '.join(r['features'])}")


@main.command("map")
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@chain_options()
def map_(image: str, output: str, options: OpenOptions) -> None:
    """Print the flattened allocation map of IMAGE's chain."""
    with open_chain(image, options) as chain:
        if output == "json":
            out = sys.stdout
            out.write("[")
            first = True
            for e in chain.extents():
                rec = {
                    "start": e.start,
                    "length": e.length,
                    "depth": e.depth,
                    "present": e.kind.present,
                    "zero": e.kind is not Kind.DATA,
                    "data": e.kind.is_data,
                }
                out.write(("" if first else ",\n") + json.dumps(rec))
                first = False
            if first:
                # An empty disk: qemu-img prints one zero-length entry, so a
                # comparison of the two maps must not need a special case.
                out.write(
                    json.dumps(
                        {"start": 0, "length": 0, "depth": 0, "present": False, "zero": False, "data": False}
                    )
                )
            out.write("]\n")
            return
        click.echo(f"{'Offset':>20}  {'Length':>20}  {'Depth':>5}  Kind")
        for e in chain.extents():
            what = {
                Kind.DATA: "data",
                Kind.ALLOC_ZERO: "data (reads as zeros)",
                Kind.ZERO: "zero",
                Kind.ABSENT: "unallocated (zeros)",
            }[e.kind]
            click.echo(f"{e.start:#20x}  {e.length:#20x}  {e.depth:>5}  {what}")


def _register_optional_commands() -> None:
    from . import cli_convert, cli_mount  # noqa: F401  (they add themselves to `main`)


_register_optional_commands()
