"""Open an image and its backing chain; compose the flattened guest view.

``Chain.extents`` is the one composer: it asks the top layer, sends every
ABSENT run to the layer below, and reports a range past a short backing
file's end as ABSENT at the depth of the layer whose backing is short, exactly
as QEMU's block-status does. ``readinto``/``pread``/``seek``/``data_bytes``
all hang off it, so nothing that is not DATA is ever read from a file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import layer as _layer
from .errors import ChainError, FlatfsError, ImageIOError, UnsupportedImage
from .extents import Extent, Kind, coalesce
from .layer import Layer, probe, read_head

# A chain deeper than this is refused. QEMU sets no limit, but a hostile image
# set could otherwise make us open thousands of files; real chains made by
# snapshot tools stay far below it.
MAX_CHAIN_DEPTH = 64

SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """How to open a chain. The defaults are the safe ones."""

    format: str | None = None  # format of the top image; None = probe
    backing_dir: str | None = None  # refuse backing/data files that resolve outside it
    no_backing: bool = False  # show the top layer alone
    allow_probe_raw: bool = False  # let an unrecorded backing format be probed as raw
    allow_special: bool = False  # allow backing/data files that are devices or FIFOs
    force_share: bool = False  # skip QEMU-compatible image locking
    max_depth: int = MAX_CHAIN_DEPTH
    readahead: bool = True  # False: POSIX_FADV_RANDOM on every file, before its first read


class Opener:
    """Opens host files for one chain, applying the policy in OpenOptions.

    Layers that need a second file (qcow2's external data file) call
    :meth:`open_related` so the same rules apply to it.
    """

    def __init__(self, options: OpenOptions) -> None:
        self.options = options
        self.fds: list[int] = []
        self.locks: list[object] = []

    def resolve(self, referrer: str, name: str, what: str) -> str:
        if name.startswith("json:") or "://" in name.split("/", 1)[0] + ("/" if "/" in name else ""):
            raise UnsupportedImage(referrer, f"{what} {name!r} is not a local file name")
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(referrer), name)

    def check_dir(self, referrer: str, path: str, what: str) -> None:
        bdir = self.options.backing_dir
        if bdir is None:
            return
        real = os.path.realpath(path)
        root = os.path.realpath(bdir)
        if os.path.commonpath([real, root]) != root:
            raise ChainError(
                f"{referrer}: {what} {path!r} resolves to {real!r}, outside --backing-dir {bdir!r}"
            )

    def open(self, path: str, *, top: bool, referrer: str | None = None, what: str = "backing file") -> int:
        try:
            # O_NONBLOCK: a FIFO must be refused, not waited on
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if referrer is not None and exc.errno == errno.ENOENT:
                raise ChainError(f"{referrer}: {what} {path!r} not found") from None
            raise ImageIOError.from_oserror(path, exc) from None
        self.fds.append(fd)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc) from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageIOError(path, "is a directory")
        if not self.options.allow_special:
            # The user named the top image, so a block device is fine there; a file
            # an image names must be a regular file unless explicitly allowed.
            if top and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageIOError(path, "not a regular file or block device")
            if not top and not stat.S_ISREG(st.st_mode):
                raise ChainError(
                    f"{referrer}: {what} {path!r} is not a regular file "
                    "(use --allow-special to allow devices)"
                )
        os.set_blocking(fd, True)
        if not self.options.readahead:
            # Before the first read: even the 4 KiB probe of the header would
            # otherwise start a readahead of several MiB. Readahead past a data
            # extent fills the page cache over the unwritten extents next to
            # it, and ext4's SEEK_DATA then reports those as data: reads through
            # a long-lived view would change what `qemu-img map` says about the
            # image, and stop matching the view's SEEK walk, computed at mount.
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        if not self.options.force_share:
            from .locking import lock_shared_readonly  # local: keeps the import graph flat

            self.locks.append(lock_shared_readonly(fd, path))
        return fd

    def open_related(self, referrer: str, name: str, what: str) -> tuple[str, int]:
        """Open a file an image refers to (its data file), under the same policy."""
        path = self.resolve(referrer, name, what)
        self.check_dir(referrer, path, what)
        return path, self.open(path, top=False, referrer=referrer, what=what)

    def close(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError:
                pass


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class Chain:
    """The flattened, read-only guest view of an image chain. Immutable; thread-safe."""

    def __init__(self, layers: tuple[Layer, ...], opener: Opener) -> None:
        self.layers = layers
        self.size = layers[0].size
        self.path = layers[0].path
        self._opener = opener

    # -- the one composer --------------------------------------------------
    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Flattened extents over [start, end), coalesced, each with its depth."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return iter(())
        return coalesce(self._compose(0, start, end))

    def _compose(self, depth: int, start: int, end: int) -> Iterator[Extent]:
        layer = self.layers[depth]
        lim = min(end, layer.size)
        if start < lim:
            below = depth + 1 < len(self.layers)
            for e in layer.extents(start, lim):
                if e.kind is Kind.ABSENT and below:
                    yield from self._compose(depth + 1, e.start, e.end)
                elif e.depth == depth:
                    yield e
                else:
                    yield Extent(e.start, e.length, e.kind, depth)
        if lim < end:
            # Past a short backing file: reads as zeros, decided by nobody
            # below the layer whose backing is short.
            s = max(start, lim)
            yield Extent(s, end - s, Kind.ABSENT, depth - 1)

    # -- consumers ---------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` from ``offset`` (clipped at the end); return bytes filled.

        ``buf`` must come in zeroed or be zeroed here: only DATA is read.
        """
        mv = memoryview(buf)
        n = max(0, min(len(mv), self.size - offset))
        for e in self.extents(offset, offset + n):
            a = e.start - offset
            b = a + e.length
            if e.kind is Kind.DATA:
                self.layers[e.depth].readinto(e.start, mv[a:b])
            else:
                mv[a:b] = bytes(e.length) if e.length <= 1 << 20 else _zeros(e.length)
        return n

    def pread(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self.size - offset))
        buf = bytearray(n)
        mv = memoryview(buf)
        for e in self.extents(offset, offset + n):
            if e.kind is Kind.DATA:
                a = e.start - offset
                self.layers[e.depth].readinto(e.start, mv[a : a + e.length])
        return bytes(buf)

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) SEEK_DATA/SEEK_HOLE semantics; raises OSError(ENXIO)."""
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset >= self.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        # The uncoalesced composition: coalescing looks one extent ahead, and
        # an answer must not depend on (or fail on) a range past it.
        if whence == SEEK_DATA:
            for e in self._compose(0, offset, self.size):
                if e.kind.is_data and e.length > 0:
                    return max(offset, e.start)
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if whence == SEEK_HOLE:
            for e in self._compose(0, offset, self.size):
                if not e.kind.is_data and e.length > 0:
                    return max(offset, e.start)
            return self.size
        raise OSError(errno.EINVAL, "whence must be SEEK_DATA or SEEK_HOLE")

    def data_bytes(self) -> int:
        """Bytes of allocated data in the flattened view (for st_blocks)."""
        return sum(e.length for e in self.extents() if e.kind.is_data)

    def close(self) -> None:
        for lay in self.layers:
            lay.close()
        self._opener.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ZERO_CACHE: bytes = b""


def _zeros(n: int) -> bytes:
    global _ZERO_CACHE
    if len(_ZERO_CACHE) < n:
        _ZERO_CACHE = bytes(n)
    return _ZERO_CACHE[:n]


def open_layer(
    path: str, fmt: str | None, opener: Opener, *, top: bool, referrer: str | None = None
) -> Layer:
    """Open one image file as a layer, probing its format when ``fmt`` is None."""
    fd = opener.open(path, top=top, referrer=referrer)
    head = read_head(path, fd)
    if fmt is None:
        fmt = probe(path, head)
        if fmt is None:
            if not top and not opener.options.allow_probe_raw:
                raise ChainError(
                    f"{referrer}: backing file {path!r} has no recorded format and does not look like "
                    "any image format; refusing to probe it as raw (use --allow-probe-raw)"
                )
            fmt = "raw"
    entry = _layer.lookup(fmt)
    if entry is None:
        raise UnsupportedImage(path, f"unknown or unsupported format {fmt!r}")
    return entry.open(path, fd, opener=opener)


def open_chain(path: str | os.PathLike[str], options: OpenOptions | None = None) -> Chain:
    """Open ``path`` and every backing file below it."""
    from . import (
        qcow2,  # noqa: F401  (registers the format)
        raw,  # noqa: F401
    )

    options = options or OpenOptions()
    path = os.fspath(path)
    opener = Opener(options)
    layers: list[Layer] = []
    seen: dict[tuple[int, int], str] = {}
    try:
        lay = open_layer(path, options.format, opener, top=True)
        while True:
            ident = _identity(lay.fd)
            if ident in seen:
                raise ChainError(f"{layers[-1].path}: backing chain loops back to {seen[ident]!r}")
            seen[ident] = lay.path
            layers.append(lay)
            ref = lay.backing
            if ref is None or options.no_backing:
                break
            if len(layers) >= options.max_depth:
                raise ChainError(f"{path}: backing chain is deeper than {options.max_depth} images")
            bpath = opener.resolve(lay.path, ref.name, "backing file")
            opener.check_dir(lay.path, bpath, "backing file")
            lay = open_layer(bpath, ref.format, opener, top=False, referrer=lay.path)
    except FlatfsError:
        for done in layers:
            done.close()
        opener.close()
        raise
    except BaseException:
        opener.close()
        raise
    return Chain(tuple(layers), opener)
