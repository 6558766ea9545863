"""`flatfs convert`: a chain (or any sparse raw file) -> a new qcow2 or sparse raw image.

Only the DATA extents of the source are ever read: ZERO, ALLOC_ZERO and
ABSENT ranges are known to read as zeros and cost nothing, so the work is
proportional to the data, not to the virtual size. Inside the data, blocks
of ``sparse_size`` bytes that are all zeros are not written (qemu-img's
``-S``); an all-zero qcow2 cluster is never allocated.

With ``backing`` the target is a delta: a cluster is stored only where the
source's flattened content differs from the backing chain's (both sides
read only where they have DATA); where the source reads zeros over backing
data, a zero cluster is written.

The parts: :mod:`.options` (what is asked, what was done), :mod:`.targets`
(qcow2 and raw behind one protocol), :mod:`.plan` (what to store),
:mod:`.pipeline` (the threads), :mod:`.compress`, :mod:`.safety` (TARGET
appears whole or not at all), :mod:`.progress`; the data is read by
:mod:`flatfs.readers`.
"""

from __future__ import annotations

import errno
import os
import time

from ..chain import Chain, OpenOptions, open_chain
from ..errors import ConvertError, FlatfsError, ImageIOError
from . import pipeline
from .options import ConvertOptions, Summary, validate
from .progress import Progress
from .safety import (
    Interrupted,
    SignalGuard,
    check_target,
    destination,
    remove_stale_temps,
    write_into_place,
)
from .targets import open_target


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    open_options: OpenOptions | None = None,
    progress: bool = False,
) -> Summary:
    """Open SOURCE's chain (and BACKING's, relative to TARGET's folder) and convert."""
    options = options or ConvertOptions()
    open_options = open_options or OpenOptions()
    validate(options)
    target = os.fspath(target)
    dest = destination(target)
    with open_chain(source, open_options) as chain:
        if not options.backing:
            return convert_chain(chain, target, options, progress=progress)
        bpath = options.backing
        if not os.path.isabs(bpath):
            bpath = os.path.join(os.path.dirname(dest), bpath)
        bopts = OpenOptions(
            format=options.backing_format,
            backing_dir=open_options.backing_dir,
            allow_probe_raw=open_options.allow_probe_raw,
            allow_special=open_options.allow_special,
            force_share=open_options.force_share,
            max_depth=open_options.max_depth,
        )
        try:
            bchain = open_chain(bpath, bopts)
        except ImageIOError as exc:
            if exc.errno == errno.ENOENT:
                raise ConvertError(
                    f"{target}: backing file {options.backing!r} not found "
                    f"(looked for {bpath}; it is resolved against TARGET's folder)"
                ) from None
            raise
        with bchain:
            return convert_chain(chain, target, options, backing=bchain, progress=progress)


def convert_chain(
    source: Chain,
    target: str | os.PathLike[str],
    options: ConvertOptions,
    backing: Chain | None = None,
    progress: bool | Progress = False,
) -> Summary:
    """Convert an open chain into TARGET, safely (temporary file, fsync, rename)."""
    validate(options)
    target = os.fspath(target)
    dest = destination(target)
    t0 = time.monotonic()
    if options.backing and backing is None:
        raise ConvertError("-B/--backing given but no backing chain opened")
    check_target(target, dest, [source] + ([backing] if backing is not None else []), options.force)
    summary = Summary(
        source=source.path, target=target, target_format=options.target_format, virtual_size=source.size
    )
    summary.removed_stale = remove_stale_temps(dest)

    bar: Progress | None = None
    if isinstance(progress, Progress):
        bar = progress
    elif progress:
        total = sum(e.length for e in source.extents() if e.kind.must_read)
        if backing is not None:
            total += sum(e.length for e in backing.extents(0, source.size) if e.kind.must_read)
        bar = Progress(total)

    def write(fd: int) -> None:
        job = open_target(source, backing, fd, target, options, summary)
        pipeline.run(job, summary, bar)
        job.finish()

    with SignalGuard(target) as guard:
        try:
            write_into_place(target, dest, guard, write)
        finally:
            if bar is not None:
                bar.close()
    summary.seconds = time.monotonic() - t0
    return summary


__all__ = [
    "ConvertOptions",
    "Summary",
    "Interrupted",
    "Progress",
    "convert",
    "convert_chain",
    "remove_stale_temps",
    "check_target",
    "destination",
    "FlatfsError",
]
