"""In-memory fake layers, for testing the chain composer without image files."""

from __future__ import annotations

from hypothesis import strategies as st

from flatfs.chain import Chain
from flatfs.extents import Extent, Kind, runs_of

D, Z, A, AZ = Kind.DATA, Kind.ZERO, Kind.ABSENT, Kind.ALLOC_ZERO


class FakeLayer:
    """A layer described by a list of (start, end, kind); data bytes are the depth+1."""

    format = "fake"
    parent = None

    def __init__(self, size: int, runs: list[tuple[int, int, Kind]], fill: int) -> None:
        self.path = f"fake{fill}"
        self.size = size
        self.spec = runs
        self.fill = fill
        self.reads: list[tuple[int, int]] = []

    def extents(self, start, end):
        pos = start
        for s, e, k in self.spec:
            if e <= pos or s >= end:
                continue
            s2, e2 = max(s, pos), min(e, end)
            if s2 > pos:
                yield Extent(pos, s2 - pos, A)
            yield Extent(s2, e2 - s2, k)
            pos = e2
        if pos < end:
            yield Extent(pos, end - pos, A)

    def runs(self, start, end):
        return runs_of(self.extents(start, end))

    def readinto(self, offset, buf):
        self.reads.append((offset, len(buf)))
        for s, e, k in self.spec:
            assert not (s < offset + len(buf) and offset < e) or k is D, "read a non-DATA range"
        buf[:] = bytes([self.fill]) * len(buf)

    def info(self):
        return {}

    def close(self):
        pass


def chain(*layers) -> Chain:
    return Chain(tuple(layers))


runs_st = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 50), st.sampled_from([D, Z, AZ])), max_size=6
)


def normalise(runs, size):
    out, pos = [], 0
    for s, n, k in sorted(runs, key=lambda r: (r[0], r[1])):
        s = max(s, pos)
        e = min(s + n, size)
        if s < e:
            out.append((s, e, k))
            pos = e
    return out
