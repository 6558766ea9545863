"""Extent vocabulary shared by layers, the chain and every consumer. Pure: no I/O."""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Iterator
from typing import NamedTuple


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


class Extent(NamedTuple):
    start: int
    length: int
    kind: Kind
    depth: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


# Kind codes for bulk runs (K_*: array codes, not Kinds): KINDS[code] is the Kind, CODES[kind] its code.
KINDS: tuple[Kind, ...] = (Kind.DATA, Kind.ALLOC_ZERO, Kind.ZERO, Kind.ABSENT)
CODES: dict[Kind, int] = {k: i for i, k in enumerate(KINDS)}
K_DATA, K_ALLOC_ZERO, K_ZERO, K_ABSENT = range(4)  # the codes of KINDS, as Runs.kinds holds them


class Runs:
    """One layer's map of a range, in bulk: parallel arrays, ascending and contiguous.

    Run ``i`` covers ``[starts[i], ends[i])`` with kind ``KINDS[kinds[i]]``. A
    format fills a table's worth at a time (an L2 table, a grain table, a BAT
    block) with :meth:`add`, which merges a run into its neighbour of the same
    kind, so one object describes thousands of clusters. (A plain class: made
    for every table, and a dataclass costs start-up time in every command.)
    """

    __slots__ = ("starts", "ends", "kinds")

    def __init__(
        self,
        starts: array[int] | None = None,
        ends: array[int] | None = None,
        kinds: bytearray | None = None,
    ) -> None:
        self.starts: array[int] = array("Q") if starts is None else starts
        self.ends: array[int] = array("Q") if ends is None else ends
        self.kinds: bytearray = bytearray() if kinds is None else kinds

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Runs):
            return NotImplemented
        return (self.starts, self.ends, self.kinds) == (other.starts, other.ends, other.kinds)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Runs({list(self)!r})"

    def add(self, start: int, end: int, code: int) -> None:
        """Append ``[start, end)`` of kind code ``code``; it must start where the last run ends."""
        if end <= start:
            return
        n = len(self.kinds)
        if n:
            last = self.ends[n - 1]
            if last != start:
                raise ValueError(f"run at 0x{start:x} does not follow the run ending at 0x{last:x}")
            if self.kinds[n - 1] == code:
                self.ends[n - 1] = end
                return
        self.starts.append(start)
        self.ends.append(end)
        self.kinds.append(code)

    def __len__(self) -> int:
        return len(self.kinds)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(start, end, kind code) per run."""
        return zip(self.starts, self.ends, self.kinds)

    def extents(self, depth: int = 0) -> Iterator[Extent]:
        for s, e, k in zip(self.starts, self.ends, self.kinds):
            yield Extent(s, e - s, KINDS[k], depth)


def runs_of(extents: Iterable[Extent]) -> Runs:
    """The bulk form of ascending, contiguous extents."""
    out = Runs()
    for e in extents:
        out.add(e.start, e.end, CODES[e.kind])
    return out


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
