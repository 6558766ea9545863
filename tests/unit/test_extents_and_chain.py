"""Extents helpers and the chain composer, against in-memory fake layers."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flatfs.extents import Extent, clip, coalesce

from ..helpers.fakes import AZ, A, D, FakeLayer, Z, chain, normalise, runs_st


def test_coalesce_merges_equal_neighbours_only():
    ex = [
        Extent(0, 10, D, 0),
        Extent(10, 5, D, 0),
        Extent(15, 5, D, 1),
        Extent(20, 1, Z, 1),
        Extent(30, 1, Z, 1),
    ]
    assert list(coalesce(ex)) == [
        Extent(0, 15, D, 0),
        Extent(15, 5, D, 1),
        Extent(20, 1, Z, 1),
        Extent(30, 1, Z, 1),
    ]


def test_clip():
    ex = [Extent(0, 10, D), Extent(10, 10, Z), Extent(20, 10, D)]
    assert list(clip(ex, 5, 25)) == [Extent(5, 5, D), Extent(10, 10, Z), Extent(20, 5, D)]


def test_kind_vocabulary_matches_qemu_map():
    assert (D.is_data, D.present, D.must_read) == (True, True, True)
    assert (AZ.is_data, AZ.present, AZ.must_read) == (True, True, False)
    assert (Z.is_data, Z.present) == (False, True)
    assert (A.is_data, A.present) == (False, False)


def test_absent_goes_down_and_depth_is_reported():
    top = FakeLayer(100, [(0, 10, D), (20, 30, Z)], 1)
    mid = FakeLayer(100, [(5, 25, D), (40, 50, Z)], 2)
    base = FakeLayer(100, [(45, 60, D)], 3)
    c = chain(top, mid, base)
    assert list(c.extents()) == [
        Extent(0, 10, D, 0),
        Extent(10, 10, D, 1),
        Extent(20, 10, Z, 0),
        Extent(30, 10, A, 2),
        Extent(40, 10, Z, 1),
        Extent(50, 10, D, 2),
        Extent(60, 40, A, 2),
    ]
    data = c.pread(0, 100)
    assert data[:10] == b"\1" * 10 and data[10:20] == b"\2" * 10 and data[50:60] == b"\3" * 10
    assert data[20:50] == bytes(30) and data[60:] == bytes(40)


def test_short_backing_reads_zero_at_the_overlay_depth():
    top = FakeLayer(100, [], 1)
    base = FakeLayer(40, [(0, 100, D)], 2)
    c = chain(top, base)
    assert list(c.extents()) == [Extent(0, 40, D, 1), Extent(40, 60, A, 0)]
    assert c.pread(30, 20) == b"\2" * 10 + bytes(10)
    assert base.reads == [(30, 10)]


def test_long_backing_is_cut_to_the_overlay_size():
    c = chain(FakeLayer(50, [], 1), FakeLayer(100, [(0, 100, D)], 2))
    assert c.size == 50
    assert list(c.extents()) == [Extent(0, 50, D, 1)]
    assert len(c.pread(40, 100)) == 10


def test_seek_data_and_hole():
    c = chain(FakeLayer(100, [(10, 20, D), (20, 30, AZ), (50, 60, Z), (70, 80, D)], 1))
    SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE
    assert c.seek(0, SEEK_DATA) == 10
    assert c.seek(15, SEEK_DATA) == 15
    assert c.seek(15, SEEK_HOLE) == 30  # alloc-zero is data, as qemu-img map says
    assert c.seek(30, SEEK_DATA) == 70
    assert c.seek(75, SEEK_HOLE) == 80
    with pytest.raises(OSError) as e:
        c.seek(81, SEEK_DATA)
    assert e.value.errno == errno.ENXIO
    assert c.seek(81, SEEK_HOLE) == 81
    with pytest.raises(OSError) as e:
        c.seek(100, SEEK_HOLE)
    assert e.value.errno == errno.ENXIO
    assert c.data_bytes() == 30


@given(st.lists(st.tuples(st.integers(1, 256), runs_st), min_size=1, max_size=5))
def test_composition_is_contiguous_and_reads_only_data(spec):
    layers = [FakeLayer(size, normalise(runs, size), i + 1) for i, (size, runs) in enumerate(spec)]
    c = chain(*layers)
    ex = list(c.extents())
    assert ex[0].start == 0 and ex[-1].end == c.size
    assert all(a.end == b.start for a, b in zip(ex, ex[1:]))
    # a byte-by-byte model of the chain
    for e in ex:
        for off in (e.start, e.end - 1):
            for depth, lay in enumerate(layers):
                if off >= lay.size:
                    want = (A, depth - 1)
                    break
                kind = next((k for s, t, k in lay.spec if s <= off < t), A)
                if kind is not A or depth == len(layers) - 1:
                    want = (kind, depth)
                    break
            assert (e.kind, e.depth) == want
    data = c.pread(0, c.size)
    for e in ex:
        fill = bytes([e.depth + 1]) if e.kind is D else b"\0"
        assert data[e.start : e.end] == fill * e.length


class BrokenAfter(FakeLayer):
    """A layer whose metadata cannot be read past ``broken``: asking raises EIO."""

    def __init__(self, size, runs, fill, broken):
        super().__init__(size, runs, fill)
        self.broken = broken

    def extents(self, start, end):
        for e in super().extents(start, end):
            if e.end > self.broken:
                raise OSError(errno.EIO, "unreadable")
            yield e


def test_seek_answers_without_looking_past_its_answer():
    # Data in the top layer at [4096, 8192); the base cannot be read from 8192 on.
    # SEEK_DATA from 0 finds 4096 in the top layer and must not touch the base
    # past it (coalescing would, to see whether the next extent merges).
    base = BrokenAfter(1 << 20, [(0, 4096, Z)], 2, broken=4096)
    top = FakeLayer(1 << 20, [(4096, 8192, D)], 1)
    c = chain(top, base)
    assert c.seek(0, os.SEEK_DATA) == 4096
    assert c.seek(4096, os.SEEK_DATA) == 4096
    with pytest.raises(OSError) as exc:  # the hole's end lies in the broken range
        c.seek(4096, os.SEEK_HOLE)
    assert exc.value.errno == errno.EIO
