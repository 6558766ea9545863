"""Deflate for the compressing writers: the incompressible-data test, and the parallel gzip member
of the GCP archive, read back by gzip itself."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from flatfs.convert.archive import GZ_BLOCK, ParallelGzip, deflate_block
from flatfs.deflate import incompressible, zlib_deflate

K = 1024


def _text(rnd: random.Random, n: int) -> bytes:
    words = [b"disk", b"chain", b"qcow2", b"layer", b"extent", b"grain", b"12345", b"host01"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choice(words) for _ in range(9)) + b"\n"
    return bytes(out[:n])


def test_the_sample_tells_random_from_redundant() -> None:
    rnd = random.Random(5)
    assert incompressible(rnd.randbytes(64 * K))
    assert not incompressible(_text(rnd, 64 * K))
    assert not incompressible(bytes(64 * K))
    records = b"".join(i.to_bytes(8, "little") + b"item-%05d" % i + bytes(47) for i in range(1024))
    assert not incompressible(records)
    # a random block repeated: redundant to deflate, and the sample sees it
    assert not incompressible(rnd.randbytes(4 * K) * 16)


def test_zlib_deflate_round_trips_and_stores_what_does_not_shrink() -> None:
    rnd = random.Random(6)
    noise = rnd.randbytes(64 * K)
    text = _text(rnd, 64 * K)
    for data in (noise, text, bytes(64 * K), noise[:100]):
        assert zlib.decompress(zlib_deflate(data)) == data
    assert len(zlib_deflate(noise)) <= len(noise) + 32  # stored, not expanded
    assert len(zlib_deflate(text)) < len(text) // 2


def _content(seed: int, n: int) -> bytes:
    """Pieces of random, text, zeros and repeats (back-references across block edges)."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        kind = rnd.random()
        size = rnd.randrange(1, 300 * K)
        if kind < 0.35:
            out += rnd.randbytes(size)
        elif kind < 0.7:
            out += _text(rnd, size)
        elif kind < 0.8:
            out += bytes(size)
        elif len(out) > 10:
            at = rnd.randrange(max(1, len(out) - 30 * K), len(out))  # a repeat from just before
            out += out[at : at + size]
    return bytes(out[:n])


class _Bytes:
    """A sink that is a bytearray."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, bufs: list[memoryview], offset: int) -> None:
        blob = b"".join(bufs)
        end = offset + len(blob)
        if end > len(self.data):
            self.data += bytes(end - len(self.data))
        self.data[offset:end] = blob


@pytest.mark.parametrize("seed", range(3))
def test_parallel_gzip_is_one_member_gzip_reads(tmp_path: Path, seed: int) -> None:
    data = _content(seed, 3 * GZ_BLOCK + 12345)
    sink = _Bytes()
    gz = ParallelGzip(sink)  # type: ignore[arg-type]
    rnd = random.Random(seed)
    pos = 0
    while pos < len(data):  # as the tar writer hands it over: pieces of any size
        n = rnd.choice([1, 512, 10 * K, 700 * K])
        gz.write(memoryview(data)[pos : pos + n])
        pos += n
    size = gz.finish()
    assert size == len(sink.data)
    assert gzip.decompress(bytes(sink.data)) == data
    assert len(sink.data) < len(data)  # the text and zeros compressed
    out = tmp_path / "x.gz"
    out.write_bytes(sink.data)
    if shutil.which("gzip"):
        subprocess.run(["gzip", "-t", str(out)], check=True)
        assert subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout == data


def test_a_block_uses_the_window_before_it() -> None:
    """The dictionary is the tar before the block: a block that repeats it compresses to almost
    nothing, and inflating it needs that history (a raw inflater primed with it)."""
    rnd = random.Random(9)
    window = _text(rnd, 32 * K)
    block = window[-20 * K :] * 3
    packed = deflate_block(block, window)
    assert len(packed) < len(block) // 20
    d = zlib.decompressobj(-15, zdict=window)
    assert d.decompress(packed) == block
