"""Reading only the data of one or more chains, in aligned chunks.

The one reader of aligned data chunks: it walks ``chain.extents()`` (so
ZERO, ALLOC_ZERO and ABSENT ranges are never read), groups the DATA into
chunks of at most ``limit`` bytes aligned to a granule, and fills a chunk's
buffer through ``chain.read_data`` with the gaps zeroed. Several chains
("sides": a source and the backing it is compared against) can be walked
together; each chunk then carries every side's pieces over the same range.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from .chain import Chain

# (guest offset, length, depth): one data span of a chunk. Not chain.compose.Piece, the
# composer's bulk runs of one depth.
Span = tuple[int, int, int]
_Item = tuple[int, int, int, int]  # (start, end, depth, side)


class Chunk(NamedTuple):
    """Guest range [start, end), aligned to the granule (``end`` clipped at the size).

    ``pieces[side]`` lists that side's data pieces inside it, sorted and disjoint.
    """

    start: int
    end: int
    pieces: list[list[Span]]

    @property
    def data_bytes(self) -> int:
        """Bytes of data the chunk reads, over every side."""
        return sum(n for side in self.pieces for _, n, _ in side)


def data_chunks(sides: Sequence[tuple[Chain, int]], granule: int, limit: int, size: int) -> Iterator[Chunk]:
    """Aligned chunks of the data of ``sides`` ((chain, end of the range to read) each).

    A chunk holds at most ``limit`` bytes (a multiple of ``granule``); data
    in the same or the next granule joins the current chunk, so writes stay
    contiguous; a bigger gap starts a new one. ``size`` clips the last chunk.
    """
    streams = [_data_items(chain, side, end) for side, (chain, end) in enumerate(sides)]
    items: Iterable[_Item] = streams[0] if len(streams) == 1 else heapq.merge(*streams)
    return _chunks(items, granule, limit, size, len(sides))


def _data_items(chain: Chain, side: int, end: int) -> Iterator[_Item]:
    """(start, end, depth, side) for every extent of ``chain`` below ``end`` that must be read."""
    for e in chain.extents(0, end):
        if e.kind.must_read:
            yield (e.start, e.start + e.length, e.depth, side)


def _chunks(items: Iterable[_Item], gran: int, limit: int, size: int, nsides: int) -> Iterator[Chunk]:
    """Group ascending data items into chunks; items of several sides may overlap."""
    it = iter(items)
    look = next(it, None)
    heap: list[_Item] = []
    a = lim = end = -1
    pieces: list[list[Span]] = []
    while True:
        if look is not None and (not heap or look[0] <= heap[0][0]):
            item = look
            look = next(it, None)
        elif heap:
            item = heapq.heappop(heap)
        else:
            break
        s, t, d, w = item
        if a < 0 or s >= lim or s - s % gran > end:
            if a >= 0:
                yield Chunk(a, end, pieces)
            a = s - s % gran
            lim = a + limit
            end = a
            pieces = [[] for _ in range(nsides)]
        e = min(t, lim)
        pieces[w].append((s, e - s, d))
        end = max(end, min(-(-e // gran) * gran, size))
        if e < t:
            heapq.heappush(heap, (e, t, d, w))
    if a >= 0:
        yield Chunk(a, end, pieces)


def fill(chain: Chain, mv: memoryview, start: int, pieces: list[Span], zeros: bytes) -> None:
    """Read ``pieces`` of ``chain`` into ``mv`` (which starts at guest ``start``); zero the gaps.

    ``zeros`` is at least ``len(mv)`` zero bytes (kept by the caller, so no
    chunk allocates its own).
    """
    read = chain.read_data
    pos = 0
    for s, n, d in pieces:
        off = s - start
        if off > pos:
            mv[pos:off] = zeros[: off - pos]
        read(d, s, mv[off : off + n])
        pos = off + n
    if pos < len(mv):
        mv[pos:] = zeros[: len(mv) - pos]


def coalesce_pieces(pieces: list[Span]) -> Iterator[tuple[int, int]]:
    """(guest offset, length) of ``pieces`` with adjacent ones joined (depths dropped)."""
    cur_s = cur_n = -1
    for s, n, _d in pieces:
        if cur_s >= 0 and cur_s + cur_n == s:
            cur_n += n
            continue
        if cur_s >= 0:
            yield cur_s, cur_n
        cur_s, cur_n = s, n
    if cur_s >= 0:
        yield cur_s, cur_n
