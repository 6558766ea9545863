"""Extent vocabulary shared by layers, the chain and every consumer. Pure: no I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class Kind(enum.Enum):
    """What one layer (or the flattened chain) says about a byte range."""

    DATA = "data"  # bytes stored at this depth
    ALLOC_ZERO = "alloc-zero"  # allocated at this depth, but the host file has a hole there
    ZERO = "zero"  # reads as zeros, decided at this depth
    ABSENT = "absent"  # not decided here: ask the layer below (zeros at the bottom)

    @property
    def is_data(self) -> bool:
        """Allocated storage: qemu-img map's ``data``, and what SEEK_DATA finds."""
        return self is Kind.DATA or self is Kind.ALLOC_ZERO

    @property
    def must_read(self) -> bool:
        """Only these bytes ever need reading from a file; everything else is zeros."""
        return self is Kind.DATA

    @property
    def present(self) -> bool:
        """Decided somewhere in the chain: qemu-img map's ``present``."""
        return self is not Kind.ABSENT


@dataclass(frozen=True, slots=True)
class Extent:
    start: int
    length: int
    kind: Kind
    depth: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents of equal kind and depth. Input must be ascending."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and cur.end == e.start and cur.kind is e.kind and cur.depth == e.depth:
            cur = Extent(cur.start, cur.length + e.length, cur.kind, cur.depth)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def clip(extents: Iterable[Extent], start: int, end: int) -> Iterator[Extent]:
    """Restrict ascending extents to [start, end)."""
    for e in extents:
        if e.end <= start:
            continue
        if e.start >= end:
            break
        s = max(e.start, start)
        t = min(e.end, end)
        if s == e.start and t == e.end:
            yield e
        else:
            yield Extent(s, t - s, e.kind, e.depth)
