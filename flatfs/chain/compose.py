"""The flattened guest view of an open chain: one composer, one read path, one seek contract.

``Chain._pieces`` is the one composer: it asks the top layer for its runs,
sends every ABSENT run to the layer below, and reports a range past a short
backing file's end as ABSENT at the depth of the layer whose backing is
short, exactly as QEMU's block-status does. ``extents``, ``readinto`` (and
``pread`` over it), ``seek`` and the data index all hang off it, so nothing
that is not DATA is ever read from a file, and every consumer (the FUSE
view, convert, map, the oracle tests) sees the same answers.
"""

from __future__ import annotations

import errno
import operator
import os
from array import array
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, KINDS, Extent, Runs
from ..formats.api import HostFile, HostRun, Layer
from . import dataindex

SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE


class Piece(NamedTuple):
    """Composed runs that all come from one depth, in bulk: parallel arrays, ascending and
    contiguous, neighbours of different kinds."""

    starts: array[int]
    ends: array[int]
    kinds: bytes | bytearray
    depth: int


class LayerFacts(NamedTuple):
    """What opening the chain learnt about one layer beyond the layer itself (for ``info``)."""

    found_by: str | None = None  # how its parent was found: "name", "search by <kind>"
    resolved_from: str | None = None  # the recorded name that found its parent
    probed: str | None = None  # what probing saw beyond its head (a fixed VHD's footer)


_DATA_KINDS = (K_DATA, K_ALLOC_ZERO)
_HOLE_KINDS = (K_ZERO, K_ABSENT)


def _first(kinds: bytes | bytearray, wanted: tuple[int, int]) -> int:
    """Index of the first run whose kind is one of ``wanted``, or -1."""
    hits = [i for i in (kinds.find(wanted[0]), kinds.find(wanted[1])) if i >= 0]
    return min(hits) if hits else -1


def _merged(runs: Runs) -> Runs:
    """``runs`` with neighbours of equal kind merged (a layer that built its arrays directly)."""
    out = Runs()
    for s, e, k in runs:
        out.add(s, e, k)
    return out


class Chain:
    """The flattened, read-only guest view of an image chain. Immutable; thread-safe."""

    def __init__(
        self,
        layers: tuple[Layer, ...],
        facts: tuple[LayerFacts, ...] = (),
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """``facts`` per layer, top first (missing ones are empty); ``on_close`` releases what
        the opening holds (its file descriptors) once every layer is closed."""
        self.layers = layers
        self.size = layers[0].size
        self.path = layers[0].path
        self.format = layers[0].format
        self._facts = facts + (LayerFacts(),) * (len(layers) - len(facts))
        self._on_close = on_close
        self._index: dataindex.DataIndex | None = None
        self._data_bytes: int | None = None

    def found_by(self, depth: int) -> str | None:
        """How the parent of layer ``depth`` was found ("name", "search by <kind>"), if it has one."""
        return self._facts[depth].found_by

    def resolved_from(self, depth: int) -> str | None:
        """The name layer ``depth`` records for its parent that found it, if a name did."""
        return self._facts[depth].resolved_from

    def probe_note(self, depth: int) -> str | None:
        """What probing layer ``depth`` saw beyond its head (a fixed VHD's footer), if anything."""
        return self._facts[depth].probed

    # -- the one composer --------------------------------------------------
    def _pieces(self, depth: int, start: int, end: int) -> Iterator[Piece]:
        """The composition of [start, end) from layer ``depth`` down, a layer's answer at a time."""
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
            kinds = runs.kinds
            if n > 1 and any(map(operator.eq, kinds[1:], kinds[:-1])):
                runs = _merged(runs)
                kinds = runs.kinds
                n = len(runs)
            i = 0
            a = kinds.find(K_ABSENT) if below else -1
            while a >= 0:
                if a > i:
                    yield Piece(runs.starts[i:a], runs.ends[i:a], kinds[i:a], depth)
                yield from self._pieces(depth + 1, runs.starts[a], runs.ends[a])
                i = a + 1
                a = kinds.find(K_ABSENT, i)
            if i < n:
                if i:
                    yield Piece(runs.starts[i:], runs.ends[i:], kinds[i:], depth)
                else:
                    yield Piece(runs.starts, runs.ends, kinds, depth)
            pos = runs.ends[n - 1]
        if lim < end:
            # Past a short backing file: reads as zeros, decided by nobody
            # below the layer whose backing is short.
            yield Piece(array("Q", [max(start, lim)]), array("Q", [end]), bytes([K_ABSENT]), depth - 1)

    def pieces(self, start: int = 0, end: int | None = None) -> Iterator[Piece]:
        """The flattened map over [start, end) in bulk: coalesced, a piece of one depth at a time.

        What ``map``, the data index and every other consumer of whole maps use:
        no Python object per extent.
        """
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        last: Piece | None = None
        for p in self._pieces(0, start, end):
            if (
                last is not None
                and last.depth == p.depth
                and last.kinds[-1] == p.kinds[0]
                and last.ends[-1] == p.starts[0]
            ):
                starts = array("Q", p.starts)
                starts[0] = last.starts[-1]
                p = Piece(starts, p.ends, p.kinds, p.depth)
                last = Piece(last.starts[:-1], last.ends[:-1], last.kinds[:-1], last.depth)
            if last is not None and len(last.kinds):
                yield last
            last = p
        if last is not None:
            yield last

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Flattened extents over [start, end), coalesced, each with its depth."""
        for p in self.pieces(start, end):
            d = p.depth
            for s, e, k in zip(p.starts, p.ends, p.kinds):
                yield Extent(s, e - s, KINDS[k], d)

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

    def host_data(self, depth: int, offset: int, length: int) -> list[HostRun]:
        """Where a DATA extent that :meth:`extents` reported at ``depth`` lies on the host.

        (guest offset, length, fd, host offset) runs covering it exactly; fd < 0 marks
        a run that is not plain bytes in a host file (compressed...): read it with
        :meth:`read_data`. For copy offload (``os.copy_file_range``).
        """
        return self.layers[depth].host_map(offset, offset + length)

    def host_map(self, start: int = 0, end: int | None = None) -> Iterator[HostRun]:
        """The flattened view's data over [start, end) by host location: DATA only, in guest
        order; every other range reads as zeros and is left out."""
        for p in self.pieces(start, end):
            d = p.depth
            for s, e, k in zip(p.starts, p.ends, p.kinds):
                if k == K_DATA:
                    yield from self.host_data(d, s, e - s)

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
        wanted = _DATA_KINDS if whence == SEEK_DATA else _HOLE_KINDS
        for p in self._pieces(0, offset, self.size):
            i = _first(p.kinds, wanted)
            if i >= 0:
                return max(offset, p.starts[i])
        if whence == SEEK_DATA:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return self.size

    def build_index(self, max_runs: int | None = None) -> None:
        """One pass over the extents: SEEK answers become bisections, data bytes known.

        Past ``max_runs`` data runs (default ``dataindex.MAX_RUNS``) no index is
        kept and :meth:`seek` keeps walking the composition.
        """
        self._index, self._data_bytes = dataindex.scan_pieces(self.size, self.pieces(), max_runs)

    @property
    def indexed(self) -> bool:
        return self._index is not None

    def data_bytes(self) -> int:
        """Bytes of allocated data in the flattened view (for st_blocks)."""
        if self._data_bytes is None:
            self._data_bytes = dataindex.scan_pieces(self.size, self.pieces(), 0)[1]
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
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
