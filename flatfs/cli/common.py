"""What every flatfs command shares: the error boundary, the chain options, sizes."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from ..chain import MAX_CHAIN_DEPTH, OpenOptions
from ..errors import FlatfsError
from ..formats import FORMATS


def format_names() -> list[str]:
    """What -f/-F accept: every format in the table, and its aliases (``vhd`` for ``vpc``)."""
    return [name for f in FORMATS for name in (f.name, *f.aliases)]


def target_format_names() -> list[str]:
    """What -O accepts: the formats that can be written (qcow2 first, the default)."""
    return sorted(
        (f.name for f in FORMATS if f.target is not None or f.writer is not None or f.name == "raw"),
        key=lambda n: n != "qcow2",
    )


Command = Callable[..., Any]


class FlatfsGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlatfsError as exc:
            click.echo(f"flatfs: {exc}", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            # `flatfs map | head`: the reader has what it wanted; end quietly with
            # status 0, as qemu-img map does, so `set -o pipefail` scripts go on.
            try:
                sys.stdout = open(os.devnull, "w")
            except OSError:
                pass
            ctx.exit(0)
        except OSError as exc:
            # FlatfsError covers every file flatfs opens; what is left is its own
            # output: `flatfs map > file` on a full disk
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
                raise
            click.echo(f"flatfs: cannot write the output: {exc.strerror}", err=True)
            ctx.exit(1)


def chain_options() -> Callable[[Command], Command]:
    """The options every command that opens a chain shares; one spelling in every command."""

    def deco(fn: Command) -> Command:
        opts = [
            click.option(
                "-f",
                "--format",
                "fmt",
                type=click.Choice(format_names()),
                default=None,
                help="Format of the top image (default: probe).",
            ),
            click.option(
                "--backing-dir",
                type=click.Path(exists=True, file_okay=False),
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
            click.option(
                "--ignore-parent-id",
                is_flag=True,
                help="Read a parent whose identity (CID, UUID) differs from the one its child records.",
            ),
            click.option(
                "--search-dir",
                "search_dirs",
                multiple=True,
                type=click.Path(exists=True, file_okay=False),
                help="Look for a parent not found where its child records it in DIR (by its file name, "
                "or by UUID for VDI snapshots); repeatable, searched in order.",
            ),
            click.option(
                "--max-depth",
                type=click.IntRange(min=1),
                default=MAX_CHAIN_DEPTH,
                show_default=True,
                help="Refuse backing chains deeper than N images.",
                metavar="N",
            ),
            click.option(
                "-l",
                "--snapshot",
                metavar="ID|NAME",
                default=None,
                help="Read the top image as it was at this internal snapshot (qcow2; "
                "or snapshot.id=ID / snapshot.name=NAME).",
            ),
            click.option(
                "--untrusted",
                is_flag=True,
                help="Safe settings for an image you did not make: --backing-dir (default: the "
                "image's folder), no devices, no raw probing, locks on.",
            ),
            click.option(
                "--allow-text-data",
                is_flag=True,
                help="Read raw data an image names (a FLAT extent, a raw backing or data file) "
                "even if it looks like a text file.",
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
            ignore_parent_id: bool,
            search_dirs: tuple[str, ...],
            max_depth: int,
            snapshot: str | None = None,
            untrusted: bool = False,
            allow_text_data: bool = False,
            **kw: Any,
        ) -> Any:
            if untrusted:
                loose = (allow_special, force_share, allow_probe_raw, allow_text_data)
                backing_dir = _untrusted_fence(backing_dir, kw, *loose)
            kw["options"] = OpenOptions(
                format=fmt,
                backing_dir=backing_dir,
                no_backing=no_backing,
                allow_probe_raw=allow_probe_raw,
                allow_special=allow_special,
                force_share=force_share,
                ignore_parent_id=ignore_parent_id,
                search_dirs=tuple(search_dirs),
                max_depth=max_depth,
                snapshot=snapshot,
                allow_text_data=allow_text_data,
            )
            return fn(*args, **kw)

        return wrapper

    return deco


def _untrusted_fence(
    backing_dir: str | None,
    kw: dict[str, Any],
    allow_special: bool,
    force_share: bool,
    probe_raw: bool,
    text_data: bool,
) -> str:
    """--untrusted: refuse the options that loosen the policy; the fence, by default the image's folder."""
    for given, name in (
        (allow_special, "--allow-special"),
        (force_share, "-U/--force-share"),
        (probe_raw, "--allow-probe-raw"),
        (text_data, "--allow-text-data"),
    ):
        if given:
            raise click.UsageError(f"--untrusted and {name} contradict each other")
    if backing_dir is not None:
        return backing_dir
    image = kw.get("image", kw.get("source"))
    return os.path.dirname(os.path.abspath(str(image))) if image is not None else os.curdir


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class SizeParam(click.ParamType):  # type: ignore[type-arg]  # generic in newer click, not in older
    """A byte count: 65536, 64k, 64K, 2M, 2MiB, 1G."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtTbB]?)(?:i?[bB])?\s*", str(value))
        if not m:
            self.fail(f"{value!r} is not a size (examples: 512, 64k, 2M)", param, ctx)
        return int(m.group(1)) * _UNITS[m.group(2).lower()]


SIZE = SizeParam()
