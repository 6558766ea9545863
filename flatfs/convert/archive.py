"""``--for gcp``: ``disk.raw`` as a sparse member of a gzip-compressed GNU tar (oldgnu format).

A tar is packaging, not a disk image format flatfs reads, so this writer
lives with convert, behind the same ``ImageWriter`` protocol as the
formats' writers, over the same sink.

Facts from the GNU tar manual ("Basic Tar Format", "Old GNU Format",
"Storing Sparse Files") this module relies on: 512-byte header blocks of
NUL-terminated octal fields (base-256, the first byte 0x80, where a number
does not fit); the checksum is the sum of the header's bytes with the
checksum field read as spaces; the oldgnu magic "ustar  \\0"; type 'S', a
sparse file: up to 4 (offset, numbytes) entries in the header (at 386),
``isextended`` at 482 and the file's real size at 483, then extension
blocks of 21 entries each (``isextended`` at 504); the member's ``size`` is
the bytes stored, the regions' data in order; a map whose last entry is
(real size, 0) when the file ends in a hole; the archive ends with two zero
blocks, padded to a whole record (20 blocks).

The map is known before any data (it is the chain's data extents, from
metadata, in 512-byte units); the bytes of a region that the pipeline
found to be zeros (``-S``) are written as zeros, so the map and the data
always agree.

The gzip member (RFC 1952) is compressed on every core, the way pigz does
it: the tar stream is cut into blocks of :data:`GZ_BLOCK`; each is raw
deflate ended by a sync flush (so the pieces join into one deflate stream),
primed with the 32 KiB of tar before it (so the ratio is a single stream's);
the CRC-32 and size of the whole are kept in order on the writing thread.
Within a block, each 64 KiB that would not shrink is stored rather than
compressed (:mod:`flatfs.deflate`).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ..deflate import LEVEL as DEFLATE_LEVEL
from ..deflate import incompressible
from ..formats.api import Sink

BLOCK = 512
RECORD = 20 * BLOCK
NAME = b"disk.raw"
HEADER_ENTRIES, EXT_ENTRIES = 4, 21
LEVEL = DEFLATE_LEVEL  # gzip's default
_ZEROS = bytes(1 << 20)
GZ_BLOCK = 1 << 20  # tar bytes per compression task
PIECE = 64 << 10  # within a block: stored or compressed, piece by piece
WINDOW = 32 << 10  # deflate's window: the dictionary each block starts from
MAX_THREADS = 8


def number(n: int, width: int) -> bytes:
    """A tar numeric field: octal with a NUL, or GNU base-256 where octal does not fit."""
    if n < 8 ** (width - 1):
        return f"{n:0{width - 1}o}".encode() + b"\0"
    return b"\x80" + n.to_bytes(width - 1, "big")


def sparse_map(runs: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(offset, numbytes) regions: ``runs`` rounded out to 512 bytes and merged, then (size, 0)
    if the file ends in a hole (GNU tar's convention, so that extraction gives the full size)."""
    out: list[tuple[int, int]] = []
    for s, e in runs:
        s, e = s // BLOCK * BLOCK, min(size, -(-e // BLOCK) * BLOCK)
        if e <= s:
            continue
        if out and out[-1][0] + out[-1][1] >= s:
            start = out[-1][0]
            out[-1] = (start, max(e, start + out[-1][1]) - start)
        else:
            out.append((s, e - s))
    if not out or out[-1][0] + out[-1][1] < size:
        out.append((size, 0))
    return out


def headers(regions: list[tuple[int, int]], size: int, mtime: int) -> bytes:
    """The member's header block and its sparse extension blocks."""
    stored = sum(n for _, n in regions)
    h = bytearray(BLOCK)
    h[0 : len(NAME)] = NAME
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = number(stored, 12)
    h[136:148] = number(mtime, 12)
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"
    first, rest = regions[:HEADER_ENTRIES], regions[HEADER_ENTRIES:]
    for i, (off, n) in enumerate(first):
        at = 386 + 24 * i
        h[at : at + 12] = number(off, 12)
        h[at + 12 : at + 24] = number(n, 12)
    h[482] = 1 if rest else 0
    h[483:495] = number(size, 12)
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\0 "
    out = [bytes(h)]
    while rest:
        ext = bytearray(BLOCK)
        part, rest = rest[:EXT_ENTRIES], rest[EXT_ENTRIES:]
        for i, (off, n) in enumerate(part):
            ext[24 * i : 24 * i + 12] = number(off, 12)
            ext[24 * i + 12 : 24 * i + 24] = number(n, 12)
        ext[504] = 1 if rest else 0
        out.append(bytes(ext))
    return b"".join(out)


def archive_size(runs: Iterable[tuple[int, int]], size: int) -> int:
    """An upper bound of the .tar.gz's size (stored gzip blocks: 5 bytes per 16 KiB, plus 18)."""
    regions = sparse_map(runs, size)
    ext = -(-max(0, len(regions) - HEADER_ENTRIES) // EXT_ENTRIES)
    tar = BLOCK * (1 + ext) + -(-sum(n for _, n in regions) // BLOCK) * BLOCK + 2 * BLOCK
    tar = -(-tar // RECORD) * RECORD
    return tar + 5 * -(-tar // 16384) + 18


class SparseTarGzWriter:
    """disk.raw of ``size`` bytes, its data where ``runs`` say, gzipped into the sink."""

    def __init__(self, sink: Sink, size: int, runs: Iterable[tuple[int, int]]) -> None:
        self.sink = sink
        self.size = size
        self.regions = sparse_map(runs, size)
        self.gz = ParallelGzip(sink)
        self.tar = 0  # bytes of the tar produced
        self.walk = self._positions()
        self.pos = 0  # the guest offset the tar's data has reached
        self.end = 0  # the end of the current region
        self._emit(headers(self.regions, size, int(time.time())))
        self._next_region()

    def _positions(self) -> Iterator[tuple[int, int]]:
        yield from ((off, off + n) for off, n in self.regions if n)

    def _next_region(self) -> bool:
        nxt = next(self.walk, None)
        if nxt is None:
            self.pos = self.end = self.size
            return False
        self.pos, self.end = nxt
        return True

    def _emit(self, data: bytes | memoryview) -> None:
        self.tar += len(data)
        self.gz.write(data)

    def _zeros_to(self, stop: int) -> None:
        while self.pos < stop:
            n = min(stop - self.pos, len(_ZEROS))
            self._emit(memoryview(_ZEROS)[:n])
            self.pos += n

    def write_data(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        at = offset  # how far this piece has been taken
        while at < end:
            while self.pos >= self.end and self.pos < self.size:
                self._next_region()
            if at >= self.end:  # past this region: its rest reads zeros
                self._zeros_to(self.end)
                continue
            self._zeros_to(max(self.pos, at))
            stop = min(end, self.end)
            if stop > self.pos:
                self._emit(data[self.pos - offset : stop - offset])
                self.pos = stop
            at = stop

    def finish(self) -> int:
        while True:
            self._zeros_to(self.end)
            if not self._next_region():
                break
        self._emit(bytes(-self.tar % BLOCK) + bytes(2 * BLOCK))
        self._emit(bytes(-self.tar % RECORD))
        return self.gz.finish()


class ParallelGzip:
    """One gzip member written into ``sink`` from offset 0, compressed block by block on a
    thread pool and written in order (see the module docstring)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.out = 0  # bytes of the .gz written
        self.crc = 0
        self.size = 0
        self.buf = bytearray()
        self.window = b""  # the last WINDOW bytes before the block being gathered
        self.threads = max(1, min(os.cpu_count() or 1, MAX_THREADS))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flatfs-gzip")
        self.pending: deque[Future[bytes]] = deque()
        # magic, deflate, no flags, no mtime (as gzip -n), no extra flags, OS unknown
        self._put(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: bytes | memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.buf += data
        while len(self.buf) >= GZ_BLOCK:
            self._submit(bytes(self.buf[:GZ_BLOCK]))
            del self.buf[:GZ_BLOCK]

    def finish(self) -> int:
        try:
            if self.buf:
                self._submit(bytes(self.buf))
                self.buf = bytearray()
            while self.pending:
                self._put(self.pending.popleft().result())
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self._put(zlib.compressobj(LEVEL, zlib.DEFLATED, -15).flush())  # the final, empty block
        self._put(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        return self.out

    def _submit(self, block: bytes) -> None:
        self.pending.append(self.pool.submit(deflate_block, block, self.window))
        # the next block's dictionary: the tail of this one (whole blocks are longer than a window)
        self.window = block[-WINDOW:] if len(block) >= WINDOW else (self.window + block)[-WINDOW:]
        while len(self.pending) > 2 * self.threads:
            self._put(self.pending.popleft().result())

    def _put(self, data: bytes) -> None:
        if data:
            self.sink.write([memoryview(data)], self.out)
            self.out += len(data)


def deflate_block(block: bytes, window: bytes) -> bytes:
    """``block`` as raw deflate ending on a byte boundary (sync flush), primed with ``window`` (the
    bytes before it); each :data:`PIECE` that would not shrink stored instead of compressed."""
    mv = memoryview(block)
    kinds = [incompressible(mv[p : p + PIECE]) for p in range(0, len(mv), PIECE)]
    out: list[bytes] = []
    i = 0
    while i < len(kinds):
        j = i + 1
        while j < len(kinds) and kinds[j] == kinds[i]:
            j += 1
        pos, end = i * PIECE, j * PIECE
        if kinds[i]:
            c = zlib.compressobj(0, zlib.DEFLATED, -15)
        else:
            before = (window + block[:pos])[-WINDOW:] if pos < WINDOW else block[pos - WINDOW : pos]
            if before:
                c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, before)
            else:  # the start of the stream: nothing before it to refer to
                c = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        out.append(c.compress(mv[pos:end]))
        out.append(c.flush(zlib.Z_SYNC_FLUSH))
        i = j
    return b"".join(out)
