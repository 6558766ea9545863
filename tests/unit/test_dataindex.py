"""The data-run index answers SEEK_DATA/SEEK_HOLE exactly as Chain.seek does."""

from __future__ import annotations

import errno
import os

from hypothesis import given
from hypothesis import strategies as st

from flatfs.chain.dataindex import DataIndex, scan, scan_pieces
from flatfs.extents import Extent, Kind

from ..helpers.fakes import AZ, D, FakeLayer, Z, chain, normalise, runs_st

SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE


def answer(fn, offset: int, whence: int) -> int | str:
    """The offset, or the errno name: what a caller of lseek(2) sees."""
    try:
        return fn(offset, whence)
    except OSError as exc:
        return errno.errorcode[exc.errno]


def index_of(c) -> DataIndex:
    """The index one extent at a time; the chain's bulk scan must build the same one."""
    idx, data = scan(c.size, c.extents())
    assert idx is not None
    assert data == c.data_bytes()
    bulk, bulk_data = scan_pieces(c.size, c.pieces())
    assert bulk is not None and bulk_data == data
    assert (list(bulk.starts), list(bulk.ends)) == (list(idx.starts), list(idx.ends))
    return idx


def test_runs_coalesce_across_depths_and_kinds():
    top = FakeLayer(100, [(10, 20, D), (20, 30, AZ), (50, 60, Z)], 1)
    base = FakeLayer(100, [(30, 40, D), (60, 70, D), (90, 100, D)], 2)
    idx = index_of(chain(top, base))
    assert list(idx.starts) == [10, 60, 90]
    assert list(idx.ends) == [40, 70, 100]
    assert len(idx) == 3


def test_seek_edges():
    c = chain(FakeLayer(100, [(10, 20, D), (20, 30, AZ), (50, 60, Z), (70, 80, D)], 1))
    idx = index_of(c)
    for off in (0, 9, 10, 15, 29, 30, 69, 70, 79, 80, 81, 99, 100, 101, 1 << 62):
        for whence in (SEEK_DATA, SEEK_HOLE, os.SEEK_SET, os.SEEK_END):
            assert answer(idx.seek, off, whence) == answer(c.seek, off, whence), (off, whence)
    assert answer(idx.seek, -1, SEEK_DATA) == "EINVAL"
    assert idx.seek(81, SEEK_HOLE) == 81
    assert answer(idx.seek, 81, SEEK_DATA) == "ENXIO"


def test_data_up_to_the_end_and_no_data_at_all():
    full = chain(FakeLayer(64, [(0, 64, D)], 1))
    assert index_of(full).seek(5, SEEK_HOLE) == 64
    empty = chain(FakeLayer(64, [], 1))
    idx = index_of(empty)
    assert len(idx) == 0
    assert answer(idx.seek, 0, SEEK_DATA) == "ENXIO"
    assert idx.seek(0, SEEK_HOLE) == 0


def test_bulk_scan_drops_the_index_past_max_runs_too():
    c = chain(FakeLayer(100, [(i * 10, i * 10 + 5, D) for i in range(10)], 1))
    idx, data = scan_pieces(c.size, c.pieces(), max_runs=10)
    assert idx is not None and len(idx) == 10 and data == 50
    idx, data = scan_pieces(c.size, c.pieces(), max_runs=9)
    assert idx is None and data == 50


def test_too_many_runs_drops_the_index_but_still_counts_data():
    ex = [Extent(i * 10, 5, Kind.DATA) for i in range(10)]
    idx, data = scan(100, ex, max_runs=10)
    assert idx is not None and len(idx) == 10 and data == 50
    idx, data = scan(100, ex, max_runs=9)
    assert idx is None and data == 50
    idx, data = scan(100, iter(ex), max_runs=3)
    assert idx is None and data == 50
    assert scan(100, ex, max_runs=0) == (None, 50)


def test_gaps_between_extents_are_holes():
    idx, data = scan(
        100, [Extent(10, 10, Kind.DATA), Extent(20, 10, Kind.ALLOC_ZERO), Extent(40, 5, Kind.DATA)]
    )
    assert data == 25
    assert (list(idx.starts), list(idx.ends)) == ([10, 40], [30, 45])
    assert idx.seek(30, SEEK_DATA) == 40
    assert idx.seek(44, SEEK_HOLE) == 45


@given(st.lists(st.tuples(st.integers(1, 256), runs_st), min_size=1, max_size=5), st.data())
def test_index_matches_chain_seek(spec, data):
    layers = [FakeLayer(size, normalise(runs, size), i + 1) for i, (size, runs) in enumerate(spec)]
    c = chain(*layers)
    idx = index_of(c)
    assert all(s < e for s, e in zip(idx.starts, idx.ends))
    assert all(e < s for e, s in zip(idx.ends, idx.starts[1:]))
    offsets = (
        set(range(0, c.size + 2))
        if c.size <= 64
        else set(data.draw(st.lists(st.integers(0, c.size + 1), min_size=1, max_size=40)))
    )
    for e in c.extents():
        offsets.update((e.start, e.end - 1, e.end))
    for off in sorted(offsets):
        for whence in (SEEK_DATA, SEEK_HOLE):
            assert answer(idx.seek, off, whence) == answer(c.seek, off, whence), (off, whence)


def test_walk_visits_every_run():
    c = chain(FakeLayer(1000, [(s, s + 7, D) for s in range(3, 1000, 50)], 1))
    idx = index_of(c)
    pos, seen = 0, []
    while True:
        try:
            d = idx.seek(pos, SEEK_DATA)
        except OSError:
            break
        h = idx.seek(d, SEEK_HOLE)
        seen.append((d, h))
        pos = h
    assert seen == [(s, s + 7) for s in range(3, 1000, 50)]


def test_chain_seeks_through_its_index_or_walks_the_composition(monkeypatch):
    from flatfs.chain import dataindex

    layers = (
        FakeLayer(100, [(10, 20, D), (40, 50, AZ), (60, 70, Z)], 1),
        FakeLayer(100, [(20, 30, D), (80, 90, D)], 2),
    )
    walk = chain(*layers)
    with_index = chain(*layers)
    with_index.build_index()
    assert with_index.indexed
    monkeypatch.setattr(dataindex, "MAX_RUNS", 2)
    without = chain(*layers)
    without.build_index()
    assert not without.indexed
    assert with_index.data_bytes() == without.data_bytes() == walk.data_bytes() == 40
    for off in range(0, 102):
        for whence in (SEEK_DATA, SEEK_HOLE, os.SEEK_SET):
            want = answer(walk.seek, off, whence) if whence != os.SEEK_SET else "EINVAL"
            assert answer(with_index.seek, off, whence) == want
            assert answer(without.seek, off, whence) == want
