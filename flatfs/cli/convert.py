"""`flatfs convert` and `flatfs measure` (see flatfs.convert)."""

from __future__ import annotations

import json
from typing import NoReturn

import click

from ..chain import OpenOptions
from .common import SIZE, chain_options, format_names, target_format_names

PLATFORMS = ("azure", "aws", "vsphere", "hyperv", "virtualbox", "gcp")  # convert/profiles.py's, in order
FOR_PLATFORM = click.option(
    "--for",
    "platform",
    type=click.Choice(PLATFORMS),
    default=None,
    help="Apply the platform's import rules (format, options, size); manual: flatfs-convert(1).",
)
TARGET_OPTIONS = click.option(
    "-o",
    "--options",
    "target_options",
    multiple=True,
    metavar="KEY=VALUE[,...]",
    help="Options of the target format, as qemu-img takes them; -o help lists them.",
)


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("target", type=click.Path(dir_okay=False))
@click.option(
    "-O",
    "--target-format",
    type=click.Choice(target_format_names()),
    default=None,
    help="Format of TARGET (default qcow2, or the --for platform's).",
)
@TARGET_OPTIONS
@FOR_PLATFORM
@click.option(
    "-S",
    "--sparse-size",
    type=SIZE,
    default="4k",
    show_default=True,
    help="Inside the data, aligned runs of zeros this long are not written; 0 writes every "
    "byte of the data (holes of SOURCE stay holes).",
)
@click.option(
    "--compat",
    type=click.Choice(["0.10", "1.1"]),
    default=None,
    help="qcow2 version: 1.1 (v3, default) or 0.10 (v2).",
)
@click.option("--cluster-size", type=SIZE, default=None, help="qcow2 cluster size, 512 to 2M (default 64k).")
@click.option("-c", "--compress", is_flag=True, help="Write compressed qcow2 clusters.")
@click.option(
    "--compression-type",
    type=click.Choice(["zlib", "zstd"]),
    default=None,
    help="Compression algorithm recorded in the image (default zlib).",
)
@click.option(
    "--extended-l2",
    is_flag=True,
    help="Write extended L2 entries (32 subclusters per cluster; clusters >= 16k).",
)
@click.option(
    "-B",
    "--backing",
    "backing",
    default=None,
    metavar="BACKING",
    help="Write TARGET as an overlay on BACKING, storing only what differs. The name is "
    "stored as given and resolved against TARGET's folder.",
)
@click.option(
    "-F",
    "--backing-format",
    type=click.Choice(format_names()),
    default=None,
    help="Format of BACKING (default: probe).",
)
@click.option(
    "-C",
    "--copy-offload",
    is_flag=True,
    help="Copy data runs in the kernel (copy_file_range): shared, not copied, where the file system "
    "can (XFS with reflink, btrfs). No zero detection inside the data. Not with -c or -B.",
)
@click.option(
    "-t",
    "--target-cache",
    type=click.Choice(["writeback", "none"]),
    default="writeback",
    help="TARGET's cache mode, as qemu-img's -t: writeback (default: the page cache) or none "
    "(the data past the page cache, O_DIRECT). Not with -n.",
)
@click.option("--force", is_flag=True, help="Replace an existing TARGET.")
@click.option(
    "-n",
    "--no-create",
    "no_create",
    is_flag=True,
    help="Write the image from byte 0 into TARGET, an existing file or block device, without "
    "creating, truncating or renaming it (its old contents are overwritten).",
)
@click.option(
    "--target-is-zero",
    is_flag=True,
    help="With -n: TARGET already reads as zeros, so nothing is zeroed.",
)
@click.option("-p", "--progress", is_flag=True, help="Show a progress bar on stderr.")
@click.option(
    "--output",
    type=click.Choice(["human", "json"]),
    default="human",
    help="json: print a summary of the work done.",
)
@chain_options()
@click.pass_context
def convert(
    ctx: click.Context,
    source: str,
    target: str,
    target_format: str | None,
    target_options: tuple[str, ...],
    platform: str | None,
    sparse_size: int,
    compat: str | None,
    cluster_size: int | None,
    compress: bool,
    compression_type: str | None,
    extended_l2: bool,
    backing: str | None,
    backing_format: str | None,
    copy_offload: bool,
    target_cache: str,
    force: bool,
    no_create: bool,
    target_is_zero: bool,
    progress: bool,
    output: str,
    options: OpenOptions,
) -> None:
    """Write SOURCE's flattened chain to TARGET, reading only its data.

    TARGET appears whole or not at all (with -n: it is written in place). Manual: flatfs-convert(1).
    """
    from ..convert import ConvertOptions, Interrupted, UsageError
    from ..convert import convert as do_convert

    target_format = _target_format(ctx, target_format, platform)
    pairs = _pairs(target_format, target_options)
    opts = ConvertOptions(
        target_format=target_format,
        sparse_size=sparse_size,
        compat=compat,
        cluster_size=cluster_size,
        compress=compress,
        compression_type=compression_type,
        extended_l2=extended_l2,
        backing=backing,
        backing_format=backing_format,
        force=force,
        no_create=no_create,
        target_is_zero=target_is_zero,
        copy_offload=copy_offload,
        target_cache=target_cache,
        target_options=pairs,
        platform=platform,
    )
    try:
        summary = do_convert(source, target, opts, options, progress=progress)
    except UsageError as exc:
        _usage(ctx, str(exc))
    except Interrupted as exc:
        click.echo(f"flatfs: {exc}", err=True)
        ctx.exit(128 + exc.signum)
    for path in summary.removed_stale:
        click.echo(f"flatfs: removed stale temporary file {path}", err=True)
    if output == "json":
        click.echo(json.dumps(summary.as_dict(), indent=2))


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option(
    "-O",
    "--target-format",
    type=click.Choice(target_format_names()),
    default=None,
    help="Format of the target to measure (default qcow2, or the --for platform's).",
)
@TARGET_OPTIONS
@FOR_PLATFORM
@click.option(
    "-S",
    "--sparse-size",
    type=SIZE,
    default="4k",
    show_default=True,
    help="As for convert (checked; the figures do not depend on it).",
)
@click.option("--compat", type=click.Choice(["0.10", "1.1"]), default=None, help="qcow2 version.")
@click.option("--cluster-size", type=SIZE, default=None, help="qcow2 cluster size, 512 to 2M (default 64k).")
@click.option("-c", "--compress", is_flag=True, help="Compressed clusters (the figures are upper bounds).")
@click.option(
    "--compression-type", type=click.Choice(["zlib", "zstd"]), default=None, help="qcow2 compression type."
)
@click.option("--extended-l2", is_flag=True, help="Extended L2 entries.")
@click.option(
    "--output",
    type=click.Choice(["human", "json"]),
    default="human",
    help="json: the figures as a JSON object.",
)
@chain_options()
@click.pass_context
def measure(
    ctx: click.Context,
    source: str,
    target_format: str | None,
    target_options: tuple[str, ...],
    platform: str | None,
    sparse_size: int,
    compat: str | None,
    cluster_size: int | None,
    compress: bool,
    compression_type: str | None,
    extended_l2: bool,
    output: str,
    options: OpenOptions,
) -> None:
    """Print the size a converted SOURCE needs, from its metadata alone.

    Size a volume for `flatfs convert -n` with it. Manual: flatfs-measure(1).
    """
    from ..chain import open_chain
    from ..convert import ConvertOptions, UsageError, measure_chain, validate

    target_format = _target_format(ctx, target_format, platform)
    pairs = _pairs(target_format, target_options)
    opts = ConvertOptions(
        target_format=target_format,
        sparse_size=sparse_size,
        compat=compat,
        cluster_size=cluster_size,
        compress=compress,
        compression_type=compression_type,
        extended_l2=extended_l2,
        target_options=pairs,
        platform=platform,
    )
    try:
        opts = validate(opts)
    except UsageError as exc:
        _usage(ctx, str(exc))
    with open_chain(source, options) as chain:
        m = measure_chain(chain, opts)
    if output == "json":
        click.echo(json.dumps(m.as_dict(), indent=4))
        return
    click.echo(f"required size: {m.required}")
    click.echo(f"fully allocated size: {m.fully_allocated}")
    if m.bitmaps is not None:
        click.echo(f"bitmaps size: {m.bitmaps}")


def _pairs(target_format: str, target_options: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """-o's KEY=VALUE pairs; ``-o help`` prints the target format's keys and exits."""
    from ..convert.options import options_help, split_options

    pairs = split_options(target_options)
    if any(key in ("help", "?") for key, _ in pairs):
        click.echo(f"Options of -O {target_format}:")
        for line in options_help(target_format):
            click.echo(f"  {line}")
        raise click.exceptions.Exit(0)
    return pairs


def _usage(ctx: click.Context, message: str) -> NoReturn:
    """A usage error: one line, exit status 2."""
    click.echo(f"flatfs: {message}", err=True)
    ctx.exit(2)


def _target_format(ctx: click.Context, given: str | None, platform: str | None) -> str:
    """-O as given; without it, qcow2 or the --for platform's format (an -O qcow2 given with
    --for contradicts every platform)."""
    from ..convert.profiles import lookup

    prof = lookup(platform) if platform else None
    if prof is None:
        return given or "qcow2"
    if given is not None and given != prof.format:
        _usage(ctx, f"--for {prof.name} writes -O {prof.format}; it contradicts -O {given}")
    return prof.format
