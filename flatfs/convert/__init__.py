"""`flatfs convert`: a chain (or any sparse raw file) -> a new qcow2, raw, VDI, VHD, VMDK or VHDX image.

Only the DATA extents of the source are ever read: ZERO, ALLOC_ZERO and
ABSENT ranges are known to read as zeros and cost nothing, so the work is
proportional to the data, not to the virtual size. Inside the data, blocks
of ``sparse_size`` bytes that are all zeros are not written (qemu-img's
``-S``); an all-zero qcow2 cluster is never allocated.

With ``backing`` the target is a delta: a cluster is stored only where the
source's flattened content differs from the backing chain's (both sides
read only where they have DATA); where the source reads zeros over backing
data, a zero cluster is written.

The parts: :mod:`.options` (what is asked, what was done; ``--for`` applied
from :mod:`.profiles`), :mod:`.feeds` (how the data reaches the format's
writer, found in FORMATS), :mod:`.sinks` (where the writer's bytes land: a
new file) and :mod:`.inplace` (or an existing one, ``-n``), :mod:`.archive`
(GCP's sparse tar.gz), :mod:`.plan` (what to store), :mod:`.pipeline` (the
threads), :mod:`.compress`, :mod:`.safety` (TARGET appears whole or not at
all), :mod:`.progress`; the data is read by :mod:`flatfs.readers`.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable

from ..chain import Chain, OpenOptions, open_chain
from ..errors import ConvertError, FlatfsError, ImageIOError
from ..units import human_size
from . import pipeline
from .feeds import open_feed
from .measure import Measure, measure_chain
from .options import ConvertOptions, Summary, UsageError, validate
from .pipeline import Figures
from .progress import Progress
from .safety import (
    Interrupted,
    SignalGuard,
    check_target,
    destination,
    remove_stale_temps,
    write_into_place,
)
from .sinks import Companions, FileSink

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"flatfs: {message}", file=sys.stderr, flush=True)


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    open_options: OpenOptions | None = None,
    progress: bool = False,
    warn: Warn | None = None,
) -> Summary:
    """Open SOURCE's chain (and BACKING's, relative to TARGET's folder) and convert."""
    options = options or ConvertOptions()
    open_options = open_options or OpenOptions()
    options = validate(options)
    target = os.fspath(target)
    dest = destination(target)
    with open_chain(source, open_options) as chain:
        if not options.backing:
            return convert_chain(chain, target, options, progress=progress, warn=warn)
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
            return convert_chain(chain, target, options, backing=bchain, progress=progress, warn=warn)


def convert_chain(
    source: Chain,
    target: str | os.PathLike[str],
    options: ConvertOptions,
    backing: Chain | None = None,
    progress: bool | Progress = False,
    warn: Warn | None = None,
) -> Summary:
    """Convert an open chain into TARGET, safely (temporary file, fsync, no-replace rename).

    With ``options.no_create`` (``-n``) the image is written into the
    existing file or device TARGET instead (see :mod:`.inplace`).
    """
    options = validate(options)
    target = os.fspath(target)
    t0 = time.monotonic()
    if options.backing and backing is None:
        raise ConvertError("-B/--backing given but no backing chain opened")
    summary = Summary(
        source=source.path,
        target=target,
        target_format=options.target_format,
        virtual_size=target_size(source, options),
    )
    if summary.virtual_size != source.size:
        say = warn or _stderr
        note = (
            f"the virtual size is rounded up from {source.size} to {summary.virtual_size} bytes "
            f"(a whole {human_size(options.size_align)}), as the platform requires"
        )
        summary.warnings.append(note)
        say(note)
    if options.no_create:
        _convert_in_place(source, target, options, backing, summary, progress, warn or _stderr)
        summary.seconds = time.monotonic() - t0
        return summary
    dest = destination(target)
    check_target(target, dest, [source] + ([backing] if backing is not None else []), options.force)
    summary.removed_stale = remove_stale_temps(dest)
    bar = _progress_bar(source, backing, progress)

    companions = Companions(
        target, dest, options.force, [source] + ([backing] if backing is not None else [])
    )

    def write(fd: int) -> None:
        sink = FileSink(fd, target, companions, direct=options.target_cache == "none")
        _write(source, backing, options, sink, summary, bar)

    ok = False
    with SignalGuard(target) as guard:
        try:
            write_into_place(target, dest, guard, write, replace=options.force)
            ok = True
        finally:
            companions.close(ok)
            if bar is not None:
                bar.close()
    summary.seconds = time.monotonic() - t0
    return summary


def _write(
    source: Chain,
    backing: Chain | None,
    options: ConvertOptions,
    sink: FileSink,
    summary: Summary,
    bar: Progress | None,
) -> None:
    """The source's data through the format's writer into ``sink``, made durable; the summary."""
    try:
        feed = open_feed(source, backing, options, sink, summary.target, summary.virtual_size)
        handed = pipeline.run(feed, bar)
        figures = feed.finish()
        sink.commit(figures.file_size)
    finally:
        sink.close()
    tally(summary, figures, sink, handed)


def tally(summary: Summary, figures: Figures, sink: FileSink, handed: int) -> None:
    """The summary's figures, all counted here: the feed's and writer's, the sink's bytes."""
    summary.data_read = handed - sink.copied  # the kernel copied those: never read
    summary.copied = sink.copied
    summary.bytes_written = sink.written
    summary.file_size = figures.file_size
    summary.granularity = figures.granularity
    summary.zero_clusters_skipped = figures.zero_skipped
    summary.same_as_backing = figures.same_as_backing
    summary.data_clusters = figures.data_clusters
    summary.compressed_clusters = figures.compressed_clusters
    summary.zero_clusters = figures.zero_clusters


def target_size(source: Chain, options: ConvertOptions) -> int:
    """The target's virtual size: the source's, rounded up as ``--for`` asks."""
    a = options.size_align
    return -(-source.size // a) * a


def _progress_bar(source: Chain, backing: Chain | None, progress: bool | Progress) -> Progress | None:
    if isinstance(progress, Progress):
        return progress
    if not progress:
        return None
    total = sum(e.length for e in source.extents() if e.kind.must_read)
    if backing is not None:
        total += sum(e.length for e in backing.extents(0, source.size) if e.kind.must_read)
    return Progress(total)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def needed_size(source: Chain, options: ConvertOptions, backing: Chain | None = None) -> int:
    """The bytes an existing target must hold for ``convert -n`` (an upper bound for qcow2)."""
    return measure_chain(source, options, backing).required


def _convert_in_place(
    source: Chain,
    target: str,
    options: ConvertOptions,
    backing: Chain | None,
    summary: Summary,
    progress: bool | Progress,
    warn: Warn,
) -> None:
    from .inplace import Existing, InPlaceSink, Zeroer  # only -n needs it (and ctypes)

    chains = [source] + ([backing] if backing is not None else [])
    with Existing(target, chains) as ex:
        need = needed_size(source, options, backing)
        if ex.size < need:
            what = "device" if ex.device else "file"
            raise ConvertError(
                f"{target}: too small: the {options.target_format} image needs {need} bytes "
                f"({_mib(need)}); the {what} holds {ex.size} ({_mib(ex.size)})"
            )

        def say(message: str) -> None:
            summary.warnings.append(message)
            warn(message)

        zeroer = None if options.target_is_zero else Zeroer(ex.fd, target, ex.device, say)
        bar = _progress_bar(source, backing, progress)
        outcome = "TARGET holds no valid image (its old header was already erased)"
        with SignalGuard(target, outcome.replace("TARGET", "it")):
            try:
                start = ex.invalidate(zeroer) if zeroer is not None else 0
                sink = InPlaceSink(ex.fd, target, ex.size, zeroer, start, need)
                _write(source, backing, options, sink, summary, bar)
            finally:
                if bar is not None:
                    bar.close()
        if zeroer is not None:
            summary.zeroed = zeroer.zeroed


__all__ = [
    "ConvertOptions",
    "Summary",
    "UsageError",
    "validate",
    "Interrupted",
    "Progress",
    "convert",
    "convert_chain",
    "measure_chain",
    "Measure",
    "needed_size",
    "remove_stale_temps",
    "check_target",
    "destination",
    "FlatfsError",
]
