"""The NBD export's logic without nbdkit: block status flags, bounded replies, reads, options."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from flatfs.chain import OpenOptions
from flatfs.errors import FlatfsError
from flatfs.nbd import export
from flatfs.nbd.export import Export, options_from_json, options_to_json

from ..helpers.images import M, write_sparse_raw


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[Export]:
    writes = [(i * 2 * M, bytes([i + 1]) * 65536) for i in range(8)]
    e = Export(str(write_sparse_raw(tmp_path / "d.raw", 16 * M, writes)), OpenOptions(format="raw"))
    yield e
    e.close()


def test_extents_alternate_data_and_holes(raw: Export) -> None:
    got = raw.extents(16 * M, 0, False)
    assert got[0] == (0, 65536, 0) and got[1] == (65536, 2 * M - 65536, 3)
    assert len(got) == 16 and sum(n for _, n, _ in got) == 16 * M
    assert all(got[i][0] + got[i][1] == got[i + 1][0] for i in range(15))


def test_req_one_and_the_reply_bound(raw: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    assert raw.extents(16 * M, 100, True) == [(100, 65536 - 100, 0)]
    monkeypatch.setattr(export, "MAX_EXTENTS", 3)
    assert len(raw.extents(16 * M, 0, False)) == 3
    assert raw.extents(1 << 60, 15 * M, False) == [(15 * M, M, 3)]  # clipped at the end
    assert raw.extents(10, 16 * M, False) == []


def test_an_answer_reaches_past_its_request_boundedly(raw: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    # the request covers the first data extent and part of the hole; the answer goes on
    got = raw.extents(100 * 1024, 0, False)
    assert got[:2] == [(0, 65536, 0), (65536, 2 * M - 65536, 3)] and len(got) == 16
    monkeypatch.setattr(export, "LOOKAHEAD", 2)
    got = raw.extents(100 * 1024, 0, False)
    assert got == [
        (0, 65536, 0),
        (65536, 2 * M - 65536, 3),
        (2 * M, 65536, 0),
        (2 * M + 65536, 2 * M - 65536, 3),
    ]
    assert raw.extents(100 * 1024, 0, True) == [(0, 65536, 0)]
    assert raw.extents(10, 65536, True) == [(65536, 2 * M - 65536, 3)]  # REQ_ONE: one, maybe longer


def test_past_the_request_no_extent_is_longer_than_nbd_allows(tmp_path: Path) -> None:
    # nbdkit 1.32 dies on an answer to a request of 2**32 - 1 bytes whose first extent is longer
    # (its cacheextents filter may hand the plugin's earlier answer to such a request)
    t = 1 << 40
    e = Export(str(write_sparse_raw(tmp_path / "t.raw", t, [(0, b"x" * 4096)])), OpenOptions(format="raw"))
    try:
        for count in ((1 << 32) - 1, (1 << 32) - 512, 1 << 20):
            got = e.extents(count, 0, False)
            assert got[0] == (0, 4096, 0) and got[1][0] == 4096 and len(got) == 2
            assert all(n <= (1 << 32) - 1 for _, n, _ in got) and got[1][1] >= min(count, t) - 4096
            got = e.extents(count, 4096, False)
            assert len(got) == 1 and count <= got[0][1] <= (1 << 32) - 1
    finally:
        e.close()


def _nbd_walk(e: Export, count: int, req_one: bool) -> list[tuple[int, int, int]]:
    """A client's walk over the whole export, each reply cut as nbdkit 1.32 cuts it (and its
    assertion on the first extent checked), neighbours of equal flags merged."""
    out: list[tuple[int, int, int]] = []
    off = 0
    while off < e.size:
        n = min(count, e.size - off)
        got = e.extents(n, off, req_one)
        assert got[0][0] == off
        blocks: list[tuple[int, int]] = []
        if req_one:
            blocks.append((min(got[0][1], n), got[0][2]))
        else:
            pos = off
            for _, length, flags in got:
                blocks.append((min(length, (1 << 32) - 1), flags))
                pos += blocks[-1][0]
                if pos > off + n:
                    break
                assert length == blocks[-1][0]  # nbdkit's assert(e.length <= length)
        for length, flags in blocks:
            if out and out[-1][2] == flags:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((off, length, flags))
            off += length
    return out


def test_a_walk_over_a_big_empty_tail_gives_the_chain_map(tmp_path: Path) -> None:
    t = 1 << 42  # 4 TiB: 1,024 requests of 4 GiB
    writes = [(0, b"a" * 4096), (5 << 32, b"b" * 4096), (t - 4096, b"c" * 4096)]
    e = Export(str(write_sparse_raw(tmp_path / "t.raw", t, writes)), OpenOptions(format="raw"))
    try:
        want = [(0, 4096, 0), (4096, (5 << 32) - 4096, 3), (5 << 32, 4096, 0)]
        want += [((5 << 32) + 4096, t - 8192 - (5 << 32), 3), (t - 4096, 4096, 0)]
        for count in ((1 << 32) - 1, (1 << 32) - 512, 128 << 20):
            assert _nbd_walk(e, count, False) == want
            assert _nbd_walk(e, count, True) == want
    finally:
        e.close()


def test_reads_and_reads_past_the_end(raw: Export) -> None:
    buf = bytearray(4096)
    raw.pread(buf, 2 * M + 65536 - 2048)
    assert buf == b"\x02" * 2048 + bytes(2048)
    with pytest.raises(OSError) as exc:
        raw.pread(bytearray(4096), 16 * M - 2048)
    assert exc.value.errno == errno.EINVAL
    assert export.error_number(exc.value) == errno.EINVAL
    assert export.error_number(FlatfsError("x")) == errno.EIO
    assert export.error_number(ValueError()) == errno.EIO


def test_every_chain_option_goes_through_json() -> None:
    opts = OpenOptions(format="vpc", search_dirs=("a", "b c"), force_share=True, max_depth=3)
    assert options_from_json(options_to_json(opts)) == opts
    with pytest.raises(FlatfsError, match="does not know"):
        options_from_json('{"format": null, "from_the_future": 1}')
