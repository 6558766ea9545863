"""`flatfs mount` / `flatfs umount` (see fuse/mount.py). Imports mfusepy only when run."""

from __future__ import annotations

import click

from ..chain import OpenOptions
from .common import chain_options


def _fuse_options(groups: tuple[str, ...]) -> tuple[str, ...]:
    """-o values flatfs cannot honour are usage errors (exit 2), named before anything opens."""
    for group in groups:
        for opt in group.split(","):
            key = opt.strip().partition("=")[0]
            if key == "rw":
                raise click.BadParameter("rw: the view is read-only", param_hint="'-o'")
            if key in ("fsname", "subtype"):
                raise click.BadParameter(
                    f"{key}: flatfs sets {key} itself (umount relies on it)", param_hint="'-o'"
                )
    return groups


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path())
@click.option(
    "--foreground",
    is_flag=True,
    help="Stay in the foreground (for systemd Type=notify: READY=1 once live).",
)
@click.option(
    "--allow-other",
    is_flag=True,
    help="Let other users read the view (non-root needs user_allow_other in /etc/fuse.conf).",
)
@click.option("--debug", is_flag=True, help="Log every FUSE request to stderr (implies --foreground).")
@click.option(
    "-o",
    "fuse_options",
    multiple=True,
    metavar="OPT[,OPT...]",
    callback=lambda ctx, param, value: _fuse_options(value),
    help="Extra FUSE mount options, e.g. -o max_idle_threads=16.",
)
@click.option(
    "-P",
    "--partitions",
    is_flag=True,
    help="Also show each partition (MBR, GPT) as NAME-pN.raw, numbered as Linux numbers them.",
)
@click.option(
    "--writable",
    is_flag=True,
    help="Accept writes, kept in a throwaway scratch layer; the chain is never written.",
)
@click.option(
    "--scratch-dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Where the (nameless) scratch file of --writable lives (default: $TMPDIR).",
)
@click.option(
    "--overlay",
    "overlay",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Keep the writes as a new qcow2 FILE over IMAGE (implies --writable; FILE must not exist).",
)
@chain_options()
def mount(
    image: str,
    mountpoint: str,
    foreground: bool,
    allow_other: bool,
    debug: bool,
    fuse_options: tuple[str, ...],
    partitions: bool,
    writable: bool,
    scratch_dir: str | None,
    overlay: str | None,
    options: OpenOptions,
) -> None:
    """Show IMAGE's flattened chain as one read-only raw file at MOUNTPOINT.

    A directory MOUNTPOINT holds the view as <name>.raw; a file MOUNTPOINT is
    covered by it. Manual: flatfs-mount(1).
    """
    writable = writable or overlay is not None
    if scratch_dir is not None and not writable:
        raise click.UsageError("--scratch-dir needs --writable")
    from ..fuse.mount import MountRequest
    from ..fuse.mount import mount as do_mount

    do_mount(
        MountRequest(
            image=image,
            mountpoint=mountpoint,
            options=options,
            foreground=foreground,
            allow_other=allow_other,
            debug=debug,
            fuse_options=fuse_options,
            partitions=partitions,
            writable=writable,
            scratch_dir=scratch_dir,
            overlay=overlay,
        )
    )


@click.command()
@click.argument("mountpoint", type=click.Path())
@click.option("-l", "--lazy", is_flag=True, help="Detach now even if busy (fusermount3 -u -z).")
@click.option("-q", "--quiet", is_flag=True, help="Succeed silently if nothing is mounted there.")
def umount(mountpoint: str, lazy: bool, quiet: bool) -> None:
    """Unmount a flatfs view (refuses anything that is not one). Manual: flatfs-mount(1)."""
    from ..fuse.mount import umount as do_umount

    do_umount(mountpoint, lazy=lazy, quiet=quiet)
