"""The writable scratch layer (fuse/scratch.py) without FUSE: a model-checked sequence of writes,
zero writes, discards, reads and seeks over a chain-like disk; ENOSPC leaves the view as it was."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatfs.formats import lookup
from flatfs.fuse.scratch import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    OverlayDisk,
    Runs,
    Scratch,
)
from flatfs.fuse.view import window_data_bytes

SIZE = 1 << 16


class Base:
    """A disk with data in a few runs (the chain's role): bytes and a data mask."""

    def __init__(self, runs: list[tuple[int, int]], size: int = SIZE) -> None:
        self.size = size
        self.bytes = bytearray(size)
        self.mask = bytearray(size)
        for s, n in runs:
            self.bytes[s : s + n] = bytes((s + i) % 251 + 1 for i in range(n))
            self.mask[s : s + n] = b"\1" * n

    def readinto(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.size - offset))
        buf[:n] = self.bytes[offset : offset + n]
        return n

    def seek(self, offset: int, whence: int) -> int:
        return _seek(self.mask, offset, whence)

    def data_bytes(self) -> int:
        return self.mask.count(1)


def _seek(mask: bytearray, offset: int, whence: int) -> int:
    if offset >= len(mask):
        raise OSError(errno.ENXIO, "past the end")
    want = 1 if whence == os.SEEK_DATA else 0
    i = mask.find(want, offset)
    if i < 0:
        if whence == os.SEEK_DATA:
            raise OSError(errno.ENXIO, "no data")
        return len(mask)
    return i


def _answer(fn, *args):
    try:
        return fn(*args)
    except OSError as exc:
        return exc.errno


OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE), st.integers(1, 9000), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 9000), st.just(0)),
    st.tuples(st.just("punch"), st.integers(0, SIZE - 1), st.integers(1, 9000), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, max_size=25), st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=8))
def test_model(tmp_path_factory, ops, probes):
    base = Base([(0, 4096), (20000, 3000), (60000, 5536)])
    model, mask = bytearray(base.bytes), bytearray(base.mask)
    s = Scratch(base, str(tmp_path_factory.getbasetemp()))
    try:
        for op, off, n, val in ops:
            end = min(off + n, SIZE)
            if op == "write":
                data = bytes([val]) * n
                if off >= SIZE:
                    assert _answer(s.write, off, data) == errno.ENOSPC
                    continue
                assert s.write(off, data) == end - off
                model[off:end] = data[: end - off]
                mask[off:end] = (b"\1" if val else b"\0") * (end - off)  # zeros are not data
            else:
                mode = FALLOC_FL_ZERO_RANGE if op == "zero" else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                s.fallocate(mode, off, n)
                model[off:end] = bytes(end - off)
                mask[off:end] = bytes(end - off)
        buf = bytearray(SIZE)
        assert s.readinto(0, memoryview(buf)) == SIZE and buf == model
        for p in probes:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert _answer(s.seek, p, whence) == _answer(_seek, mask, p, whence), (
                    p,
                    whence,
                )
            part = bytearray(100)
            s.readinto(p, memoryview(part))
            assert part[: SIZE - p] == model[p : p + 100]
        assert s.data_bytes() == mask.count(1) == window_data_bytes(s, 0, SIZE)
        assert len(s.runs) <= 2 * len(ops) + 1  # grows with the writes, never with the disk
    finally:
        s.close()


OVERLAY_SIZE = 4 << 16  # four 64 KiB clusters: reads that cross clusters, held or not


@pytest.mark.parametrize("seed", range(12))
def test_overlay_disk_reads_its_writes_from_the_overlay(tmp_path: Path, seed: int):
    """--overlay keeps written bytes in the overlay alone: the view reads them back from its
    clusters (across clusters, partly held ones, zeroed ones) exactly as written."""
    rnd = random.Random(seed)
    base = Base([(0, 4096), (70000, 3000), (200000, 50000)], OVERLAY_SIZE)
    model = bytearray(base.bytes)
    entry = lookup("qcow2")
    assert entry is not None and entry.overlay is not None
    overlay = entry.overlay()(str(tmp_path / "o.qcow2"), OVERLAY_SIZE, "base.raw", "raw")
    d = OverlayDisk(base, str(tmp_path), overlay)
    try:
        for i in range(rnd.randrange(1, 12)):
            off, n = rnd.randrange(OVERLAY_SIZE), rnd.randrange(1, 150000)
            end = min(off + n, OVERLAY_SIZE)
            pattern = bytes((i * 7 + k) % 255 + 1 for k in range(255))
            data = bytes(n) if rnd.random() < 0.25 else (pattern * (n // 255 + 1))[:n]
            assert d.write(off, data) == end - off
            model[off:end] = data[: end - off]
        assert os.fstat(d.fd).st_blocks == 0  # nothing written twice: the scratch file stays empty
        buf = bytearray(OVERLAY_SIZE)
        assert d.readinto(0, memoryview(buf)) == OVERLAY_SIZE
        assert _first_difference(buf, model) is None
        for _ in range(8):
            at = rnd.randrange(OVERLAY_SIZE)
            part = bytearray(rnd.randrange(1, OVERLAY_SIZE))
            n = d.readinto(at, memoryview(part))
            assert _first_difference(part[:n], model[at : at + n]) is None, at
    finally:
        d.close()


def _first_difference(a: bytearray, b: bytearray) -> int | None:
    """The first offset where ``a`` and ``b`` differ (None when equal): a short failure message."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_runs_merge_and_split():
    r = Runs()
    r.set(10, 20, 1)
    r.set(20, 30, 1)
    assert (r.starts, r.ends, r.kinds) == ([10], [30], [1])
    r.set(15, 25, 2)
    assert (r.starts, r.ends, r.kinds) == ([10, 15, 25], [15, 25, 30], [1, 2, 1])
    r.set(0, 40, 1)
    assert (r.starts, r.ends, r.kinds) == ([0], [40], [1])


def test_scratch_has_no_name(tmp_path: Path):
    s = Scratch(Base([]), str(tmp_path))
    try:
        s.write(100, b"x" * 10)
        assert os.listdir(tmp_path) == []
        assert os.fstat(s.fd).st_nlink == 0
    finally:
        s.close()


def test_enospc_fails_the_write_and_keeps_the_view(tmp_path: Path):
    """A scratch directory on a tiny tmpfs: the write that does not fit fails with ENOSPC, and
    what reads back (and what SEEK_DATA says) is exactly what was acknowledged before."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(small)], check=True)
    try:
        s = Scratch(Base([(0, 4096)]), str(small))
        try:
            s.write(8192, b"\x11" * 16384)
            acked = bytearray(SIZE)
            s.readinto(0, memoryview(acked))
            with pytest.raises(OSError) as ei:
                s.write(16384, b"\x22" * 40000)  # over acknowledged data, then past the space left
            assert ei.value.errno == errno.ENOSPC
            after = bytearray(SIZE)
            s.readinto(0, memoryview(after))
            assert after == acked
            assert _answer(s.seek, 24576, os.SEEK_DATA) == errno.ENXIO
            assert s.data_bytes() == 4096 + 16384
            s.write(8192, b"\x33" * 4096)  # an overwrite of what is ours needs no new blocks
            assert s.readinto(8192, memoryview(after)[:1]) == 1 and after[0] == 0x33
        finally:
            s.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)
