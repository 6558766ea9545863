"""A sorted index of the flattened view's data runs, for O(log n) SEEK_DATA/SEEK_HOLE.

``Chain.seek`` composes the chain's extents from the offset onwards on every
call (tens of microseconds, more on a deep chain); a tool that walks the whole
view (``qemu-img map``, ``cp --sparse``) makes thousands of such calls. The
chain is immutable while it is open, so one pass over ``Chain.extents()`` at
open time can record where the data runs are, and every later SEEK_DATA or
SEEK_HOLE is a bisection over two arrays.

A run is a maximal stretch of ``Kind.is_data`` extents, whatever their depths:
``qemu-img map`` and SEEK_DATA do not care which layer holds the bytes. Each
run costs 16 bytes; past ``max_runs`` the index is dropped and callers fall
back to ``Chain.seek``. Pure: no I/O, no FUSE.
"""

from __future__ import annotations

import errno
import operator
import os
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from itertools import compress
from typing import Protocol

from ..extents import Extent

SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE

# 1 Mi runs: 16 MiB of index. A view with more data runs than that (a very
# fragmented multi-terabyte image) answers from Chain.seek instead.
MAX_RUNS = 1 << 20


def check_seek(size: int, offset: int, whence: int) -> None:
    """The arguments lseek(2) refuses before it looks at any data: EINVAL, or ENXIO at or past the end."""
    if whence not in (SEEK_DATA, SEEK_HOLE):
        raise OSError(errno.EINVAL, "whence must be SEEK_DATA or SEEK_HOLE")
    if offset < 0:
        raise OSError(errno.EINVAL, "negative offset")
    if offset >= size:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))


class DataIndex:
    """Start and end of every data run of a view of ``size`` bytes; answers like ``Chain.seek``."""

    __slots__ = ("size", "starts", "ends")

    def __init__(self, size: int, starts: array[int], ends: array[int]) -> None:
        self.size = size
        self.starts = starts  # ascending, disjoint, non-adjacent: starts[i] < ends[i] < starts[i+1]
        self.ends = ends

    def __len__(self) -> int:
        return len(self.starts)

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) SEEK_DATA/SEEK_HOLE semantics, exactly as ``Chain.seek``; raises OSError."""
        check_seek(self.size, offset, whence)
        ends = self.ends
        i = bisect_right(ends, offset)  # the first run that ends after offset
        if whence == SEEK_DATA:
            if i == len(ends):
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
            start = int(self.starts[i])
            return start if start > offset else offset
        if i < len(ends) and self.starts[i] <= offset:  # SEEK_HOLE
            return int(ends[i])  # a hole, or the end of the view
        return offset


def scan(size: int, extents: Iterable[Extent], max_runs: int | None = None) -> tuple[DataIndex | None, int]:
    """One pass over a view's ascending extents: (its data index, or None past ``max_runs``; data bytes).

    ``max_runs`` defaults to :data:`MAX_RUNS`.

    ``extents`` must be ascending and disjoint (``Chain.extents()`` is); gaps
    between them count as holes.
    """
    starts = array("Q")
    ends = array("Q")
    if max_runs is None:
        max_runs = MAX_RUNS
    keep = max_runs > 0
    data = 0
    run_start = run_end = -1
    for e in extents:
        if not e.kind.is_data or e.length <= 0:
            continue
        data += e.length
        if not keep:
            continue
        if e.start == run_end:
            run_end = e.end
            continue
        if run_end >= 0:
            if len(starts) >= max_runs:
                keep = False
                starts = ends = array("Q")
                continue
            starts.append(run_start)
            ends.append(run_end)
        run_start, run_end = e.start, e.end
    if keep and run_end >= 0:
        if len(starts) >= max_runs:
            keep = False
        else:
            starts.append(run_start)
            ends.append(run_end)
    return (DataIndex(size, starts, ends) if keep else None), data


class _Bulk(Protocol):
    @property
    def starts(self) -> array[int]: ...
    @property
    def ends(self) -> array[int]: ...
    @property
    def kinds(self) -> bytes | bytearray: ...


# kind code -> 1 where it is data (DATA, ALLOC_ZERO): what SEEK_DATA finds
_IS_DATA = bytes([1, 1, 0, 0]) + bytes(252)


def scan_pieces(
    size: int, pieces: Iterable[_Bulk], max_runs: int | None = None
) -> tuple[DataIndex | None, int]:
    """:func:`scan` over the chain's map in bulk (``Chain.pieces()``): no Python work per run.

    Data runs that touch are merged, whatever their depths and kinds.
    """
    if max_runs is None:
        max_runs = MAX_RUNS
    keep = max_runs > 0
    starts: array[int] = array("Q")
    ends: array[int] = array("Q")
    data = 0
    for p in pieces:
        mask = p.kinds.translate(_IS_DATA)
        if 1 not in mask:
            continue
        ds = array("Q", compress(p.starts, mask))
        de = array("Q", compress(p.ends, mask))
        data += sum(de) - sum(ds)
        if not keep:
            continue
        if b"\x01\x01" in mask:  # data runs of two kinds side by side: merge them
            apart = bytes(map(operator.ne, de[:-1], ds[1:]))  # 1 where a run does not touch the next
            ds = array("Q", compress(ds, b"\x01" + apart))
            de = array("Q", compress(de, apart + b"\x01"))
        if ends and ends[-1] == ds[0]:
            ends[-1] = de[0]
            ds, de = ds[1:], de[1:]
        starts.extend(ds)
        ends.extend(de)
        if len(starts) > max_runs:
            keep = False
            starts, ends = array("Q"), array("Q")
    return (DataIndex(size, starts, ends) if keep else None), data
