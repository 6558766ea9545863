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
