"""The flattened guest view of an open chain: one composer, one read path, one seek contract.

``Chain._compose`` is the one composer: it asks the top layer for its runs,
sends every ABSENT run to the layer below, and reports a range past a short
backing file's end as ABSENT at the depth of the layer whose backing is
short, exactly as QEMU's block-status does. ``extents``, ``readinto`` (and
``pread`` over it), ``seek`` and the data index all hang off it, so nothing
that is not DATA is ever read from a file, and every consumer (the FUSE
view, convert, map, the oracle tests) sees the same answers.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..extents import ABSENT, KINDS, Extent, Runs, coalesce
from ..formats.api import HostFile, Layer
from . import dataindex

if TYPE_CHECKING:
    from .open import Opener

SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE

# A composed run: (start, end, kind code, depth)
Run = tuple[int, int, int, int]


class Chain:
    """The flattened, read-only guest view of an image chain. Immutable; thread-safe."""

    def __init__(self, layers: tuple[Layer, ...], opener: Opener) -> None:
        self.layers = layers
        self.size = layers[0].size
        self.path = layers[0].path
        self.format = layers[0].format
        self._opener = opener
        self._index: dataindex.DataIndex | None = None
        self._data_bytes: int | None = None

    def found_by(self, depth: int) -> str | None:
        """How the parent of layer ``depth`` was found ("name", "search by <kind>"), if it has one."""
        return self._opener.found_by.get(self.layers[depth].path)

    # -- the one composer --------------------------------------------------
    def _compose(self, depth: int, start: int, end: int) -> Iterator[Run]:
        layer = self.layers[depth]
        lim = min(end, layer.size)
        below = depth + 1 < len(self.layers)
        pos = start
        while pos < lim:
            runs = layer.runs(pos, lim)
            n = len(runs)
            if not n or runs.starts[0] != pos or not pos < runs.ends[n - 1] <= lim:
                raise ValueError(
                    f"{layer.path}: {layer.format} layer answered runs({pos:#x}, {lim:#x}) with "
                    f"{n} runs that do not start there and end inside it"
                )
            for s, e, k in runs:
                if k == ABSENT and below:
                    yield from self._compose(depth + 1, s, e)
                else:
                    yield s, e, k, depth
            pos = runs.ends[n - 1]
        if lim < end:
            # Past a short backing file: reads as zeros, decided by nobody
            # below the layer whose backing is short.
            yield max(start, lim), end, ABSENT, depth - 1

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Flattened extents over [start, end), coalesced, each with its depth."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return iter(())
        return coalesce(Extent(s, e - s, KINDS[k], d) for s, e, k, d in self._compose(0, start, end))

    # -- the one read path -------------------------------------------------
    def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        """Fill ``buf`` from ``offset`` (clipped at the end); return the bytes filled.

        Only DATA is read from a file; every other range is zero-filled here.
        """
        mv = memoryview(buf)
        n = max(0, min(len(mv), self.size - offset))
        for e in self.extents(offset, offset + n):
            a = e.start - offset
            b = a + e.length
            if e.kind.must_read:
                self.layers[e.depth].readinto(e.start, mv[a:b])
            else:
                mv[a:b] = bytes(e.length)
        return n

    def read_data(self, depth: int, offset: int, buf: memoryview) -> None:
        """Read a DATA extent that :meth:`extents` reported at ``depth`` (for chunked readers)."""
        self.layers[depth].readinto(offset, buf)

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.readinto(offset, buf)
        return bytes(buf)

    # -- the one seek contract ---------------------------------------------
    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) SEEK_DATA/SEEK_HOLE semantics; raises OSError (ENXIO past the data).

        From the data index once :meth:`build_index` made one, else by walking
        the composition from ``offset`` (uncoalesced: coalescing looks one run
        ahead, and an answer must not depend on, or fail on, a range past it).
        """
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "whence must be SEEK_DATA or SEEK_HOLE")
        if self._index is not None:
            return self._index.seek(offset, whence)
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset >= self.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if whence == SEEK_DATA:
            for s, e, k, _ in self._compose(0, offset, self.size):
                if KINDS[k].is_data and e > s:
                    return max(offset, s)
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        for s, e, k, _ in self._compose(0, offset, self.size):  # SEEK_HOLE
            if not KINDS[k].is_data and e > s:
                return max(offset, s)
        return self.size

    def build_index(self, max_runs: int | None = None) -> None:
        """One pass over the extents: SEEK answers become bisections, data bytes known.

        Past ``max_runs`` data runs (default ``dataindex.MAX_RUNS``) no index is
        kept and :meth:`seek` keeps walking the composition.
        """
        self._index, self._data_bytes = dataindex.scan(self.size, self.extents(), max_runs)

    @property
    def indexed(self) -> bool:
        return self._index is not None

    def data_bytes(self) -> int:
        """Bytes of allocated data in the flattened view (for st_blocks)."""
        if self._data_bytes is None:
            self._data_bytes = sum(e.length for e in self.extents() if e.kind.is_data)
        return self._data_bytes

    # -- each layer alone (for pictures and info) ------------------------------
    def layer_runs(self, depth: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, kind code) of layer ``depth`` alone, over its whole size."""
        layer = self.layers[depth]
        pos = 0
        while pos < layer.size:
            runs = layer.runs(pos, layer.size)
            yield from runs
            pos = runs.ends[len(runs) - 1]

    def coarse_runs(self, depth: int) -> Runs:
        """Where layer ``depth`` may hold data, from its tables alone (cheap on any disk)."""
        return self.layers[depth].coarse_runs()

    # -- host files ----------------------------------------------------------
    def host_files(self) -> tuple[HostFile, ...]:
        """Every host file the chain reads, top layer first."""
        return tuple(f for layer in self.layers for f in layer.host_files())

    def close(self) -> None:
        for lay in self.layers:
            lay.close()
        self._opener.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
