"""What ESXi's sparse extents share: a grain directory of grain tables of grains, read in bulk.

A vmfsSparse (COWD) and a seSparse extent differ only in how their tables are
encoded; each decodes one grain table at a time into a :class:`GrainTable`
(a code per grain and where each data grain lies) and this module answers
``runs`` and ``readinto`` from it. Decoded tables live in a bounded LRU, so
memory stays bounded whatever the capacity.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import compress
from typing import Any, Protocol

from ...errors import CorruptImage
from ...extents import K_ABSENT, K_DATA, K_ZERO, Runs
from ...hostio import host_size, pread_padded
from ..common import LruCache
from .extent import Extent

# per-grain codes of a decoded table
G_ABSENT, G_ZERO, G_DATA, G_BAD = range(4)
_K_BAD = 255  # a damaged entry's kind: never merged with a neighbour
_KIND_OF = bytes([K_ABSENT, K_ZERO, K_DATA, _K_BAD]) + bytes(252)
CACHE_TABLES = 256  # decoded grain tables kept per extent (shared out among a disk's extents)
_MISS: Any = object()  # not cached (a cached None: no table allocated)
# Empty grain tables one runs() answer may walk past
SKIP_TABLES = 4096
ALL_ABSENT = bytes([K_ABSENT])  # the kinds of a table with no grain


class GrainTable:
    """One decoded grain table.

    ``where[k]``: grain ``k``'s place in the file, in ``unit``s after the
    extent's ``base`` (0 unless data); ``starts``/``ends``/``kinds``: the
    table's runs of extent kinds (extent-relative guest bytes), neighbours of
    different kinds, a damaged entry a run of its own. ``at``/``entry``: the
    table's file offset and entry size, for errors.
    """

    __slots__ = ("where", "codes", "starts", "ends", "kinds", "at", "entry", "raw")

    def __init__(
        self, where: array[int], codes: bytes, at: int, entry: int, raw: array[int] | None = None
    ) -> None:
        self.where, self.codes, self.at, self.entry, self.raw = where, codes, at, entry, raw
        self.starts: array[int] = array("Q")
        self.ends: array[int] = array("Q")
        self.kinds = b""


def mark_past_end(where: array[int], codes: bytes, limit: int) -> bytes:
    """Data grains whose ``where`` is at or past ``limit`` (the file's end) become G_BAD."""
    if not where or max(where) < limit:
        return codes
    marked = bytearray(codes)
    for k in compress(range(len(codes)), map(limit.__le__, where)):
        if marked[k] == G_DATA:
            marked[k] = G_BAD
    return bytes(marked)


def used_tables(path: str, gd: array[int], table_bytes: int, file_size: int, at: int) -> array[int]:
    """The indexes of a grain directory's allocated grain tables, in one C-level pass;
    refused when it points at more grain tables than the file can hold."""
    tables = len(gd) - gd.count(0)
    most = file_size // table_bytes
    if tables > most:
        raise CorruptImage(
            path, f"grain directory points at {tables} grain tables, more than the file can hold ({most})", at
        )
    return array("Q", compress(range(len(gd)), gd)) if tables else array("Q")


class _Kinds(Protocol):
    @property
    def kinds(self) -> bytes: ...


class _Directory(Protocol):
    @property
    def span(self) -> int: ...
    @property
    def gd(self) -> Sequence[int]: ...
    @property
    def used(self) -> Sequence[int]: ...
    def _table(self, i: int) -> _Kinds | None: ...


def absent_until(ext: _Directory, i: int, end: int) -> int:
    """Where the hole that grain table ``i - 1`` ends continues to: past unallocated tables
    (one jump) and empty ones (QEMU preallocates them all), at most SKIP_TABLES of those."""
    limit = i + SKIP_TABLES
    while i * ext.span < end and i < limit:
        if not ext.gd[i]:
            k = bisect_left(ext.used, i)
            if k == len(ext.used):
                return end
            i = ext.used[k]
            continue
        try:
            t = ext._table(i)
        except CorruptImage:
            break  # the damage is answered for when asked from there
        if t is not None and t.kinds != ALL_ABSENT:
            break
        i += 1
    return i * ext.span


class GrainExtent(Extent):
    """A sparse extent whose subclass decodes grain table ``i`` in :meth:`_decode`."""

    grain = 0  # bytes per grain
    span = 0  # guest bytes per grain table
    base = 0  # file offset of grain ``where`` 0
    unit = 1  # bytes per step of ``where``
    gd: array[int]  # the grain directory
    used: array[int]  # indices of the tables the directory points at

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd
        self.file_size = host_size(fd, path)
        self.cache: LruCache[int, GrainTable | None] = LruCache(CACHE_TABLES)  # limit shared out

    def _decode(self, i: int, n: int) -> GrainTable | None:
        """Table ``i`` (``n`` grains of it are inside the extent), or None: none allocated."""
        raise NotImplementedError

    def _table(self, i: int) -> GrainTable | None:
        got = self.cache.get(i, _MISS)
        if got is not _MISS:
            return got
        tbase = i * self.span
        span = min(self.span, self.length - tbase)
        n = -(-span // self.grain)
        t = self._decode(i, n)
        if t is not None:
            self._runs_of(t, tbase, span, n)
        self.cache.put(i, t)
        return t

    def _runs_of(self, t: GrainTable, tbase: int, span: int, n: int) -> None:
        g = self.grain
        kinds = t.codes.translate(_KIND_OF)
        if _K_BAD in kinds:
            changes = bytes(a != b or a == _K_BAD for a, b in zip(kinds[1:], kinds[:-1]))
        else:
            changes = bytes(map(operator.ne, kinds[1:], kinds[:-1]))
        cuts = array("Q", compress(range(tbase + g, tbase + n * g, g), changes))
        t.starts = array("Q", [tbase])
        t.starts.extend(cuts)
        cuts.append(tbase + span)
        t.ends = cuts
        t.kinds = kinds[:1] + bytes(compress(kinds[1:], changes))

    def _bad(self, t: GrainTable, k: int) -> CorruptImage:
        return CorruptImage(
            self.path, "grain table entry points past the end of the file", t.at + t.entry * k
        )

    def coarse(self, out: Runs) -> None:
        """DATA over what each allocated grain table covers (the grain directory alone)."""
        pos = self.start
        for i in self.used:
            s = self.start + i * self.span
            e = min(s + self.span, self.start + self.length)
            out.add(pos, s, K_ABSENT)
            out.add(s, e, K_DATA)
            pos = e
        out.add(pos, self.start + self.length, K_ABSENT)

    def runs(self, rel: int, end: int, out: Runs, base: int) -> None:
        """One grain table's runs, sliced in bulk; a damaged entry ends the answer before it."""
        i = rel // self.span
        tbase = i * self.span
        t = self._table(i)
        if t is None or t.kinds == ALL_ABSENT:
            out.add(base + rel, base + min(end, absent_until(self, i + 1, end)), K_ABSENT)
            return
        lo, hi = rel, min(end, tbase + self.span)
        a = bisect_right(t.starts, lo) - 1
        b = bisect_left(t.starts, hi)
        kinds = t.kinds[a:b]
        bad = kinds.find(_K_BAD)
        if bad == 0:
            raise self._bad(t, (lo - tbase) // self.grain)
        if bad > 0:
            b = a + bad
            kinds = kinds[:bad]
        for s, e, k in zip(t.starts[a:b], t.ends[a:b], kinds):
            out.add(base + max(s, lo), base + min(e, hi), k)

    def readinto(self, rel: int, buf: memoryview) -> None:
        end = rel + len(buf)
        g = self.grain
        step = g // self.unit
        pos = rel
        while pos < end:
            i = pos // self.span
            tbase = i * self.span
            t = self._table(i)
            stop = min(end, tbase + self.span)
            if t is None:
                buf[pos - rel : stop - rel] = bytes(stop - pos)
                pos = stop
                continue
            codes, where = t.codes, t.where
            k = (pos - tbase) // g
            while pos < stop:
                code = codes[k]
                gs = tbase + k * g
                ge = min(gs + g, stop)
                k += 1
                if code == G_DATA:
                    # one pread over grains that follow each other in the file too
                    host = self.base + where[k - 1] * self.unit + (pos - gs)
                    last = where[k - 1]
                    while ge < stop and codes[k] == G_DATA and where[k] == last + step:
                        last = where[k]
                        ge = min(ge + g, stop)
                        k += 1
                    pread_padded(self.fd, self.path, buf[pos - rel : ge - rel], host, self.file_size)
                elif code == G_BAD:
                    raise self._bad(t, k - 1)
                else:
                    while ge < stop and codes[k] in (G_ABSENT, G_ZERO):
                        ge = min(ge + g, stop)
                        k += 1
                    buf[pos - rel : ge - rel] = bytes(ge - pos)
                pos = ge

    def close(self) -> None:
        self.cache.clear()
