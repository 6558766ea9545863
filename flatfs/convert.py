"""`flatfs convert`: a chain (or any sparse raw file) -> a new qcow2 or sparse raw image.

Only the DATA extents of the source are ever read: ZERO, ALLOC_ZERO and
ABSENT ranges are known to read as zeros and cost nothing, so the work is
proportional to the data, not to the virtual size. Inside the data, blocks
of ``sparse_size`` bytes that are all zeros are not written (qemu-img's
``-S``); an all-zero qcow2 cluster is never allocated.

With ``backing`` the target is a delta: a cluster is stored only where the
source's flattened content differs from the backing chain's (both sides
read only where they have DATA); where the source reads zeros over backing
data, a zero cluster is written.

Safety: the image is written into a temporary file next to TARGET
(``.NAME.flatfs-tmp-PID-RANDOM``), fsynced and renamed into place, and the
folder is fsynced. Any error, SIGINT, SIGTERM, SIGHUP or a full disk removes
the temporary file and leaves no TARGET (an existing TARGET replaced with
``force`` stays untouched). Temporary files left by a killed run are removed
by the next run for the same TARGET once their process is gone.

Test hook: ``FLATFS_CONVERT_TEST_DELAY=SECONDS`` sleeps that long after each
chunk of data, so tests can interrupt a conversion midway.
"""

from __future__ import annotations

import errno
import heapq
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

from .chain import Chain, OpenOptions, open_chain
from .errors import ConvertError, FlatfsError, ImageIOError
from .formats.qcow2.writer import (
    ALL_ALLOC,
    DEFAULT_CLUSTER_SIZE,
    SUBCLUSTERS,
    Qcow2Writer,
    cluster_bits_of,
)
from .hostio import pwritev_all

# 1 MiB: a chunk read is still in the CPU cache when it is written out. Larger
# chunks measured 2-4x slower here (each copy then goes through memory).
CHUNK_BYTES = 1 << 20  # read, classify and write this much at a time
COMPRESS_CHUNK_BYTES = 1 << 20  # compressed: one thread-pool task
MAX_COMPRESS_THREADS = 8
DEFAULT_SPARSE_SIZE = 4096  # qemu-img's default -S
ZLIB_LEVEL = 6  # what QEMU uses (Z_DEFAULT_COMPRESSION)
ZLIB_WBITS = -12  # raw deflate, 4 KiB window: what qcow2 requires
ZSTD_LEVEL = 3  # QEMU's zstd default
TEST_DELAY_ENV = "FLATFS_CONVERT_TEST_DELAY"
TMP_MARK = ".flatfs-tmp-"

_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)


class Interrupted(ConvertError):
    """The conversion was stopped by a signal; nothing was left behind."""

    def __init__(self, signum: int, target: str) -> None:
        self.signum = signum
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"{target}: conversion interrupted by {name}; nothing written")


@dataclass(frozen=True)
class ConvertOptions:
    target_format: str = "qcow2"  # "qcow2" or "raw"
    sparse_size: int = DEFAULT_SPARSE_SIZE  # 0: write every byte of the data extents
    compat: str | None = None  # "0.10" or "1.1" (default)
    cluster_size: int | None = None  # default 64 KiB
    compress: bool = False
    compression_type: str | None = None  # "zlib" (default) or "zstd"
    extended_l2: bool = False
    backing: str | None = None  # stored as given; resolved against TARGET's folder
    backing_format: str | None = None  # default: the backing image's own format
    force: bool = False  # overwrite an existing TARGET
    threads: int | None = None  # compression threads (default: CPUs, at most 8)


@dataclass
class Summary:
    source: str
    target: str
    target_format: str
    virtual_size: int = 0
    data_read: int = 0  # bytes read from the source (and backing) chains
    bytes_written: int = 0  # bytes written to the target file
    zero_clusters_skipped: int = 0  # granules of data that were all zeros, not written
    granularity: int = 0  # size of those granules (cluster, or -S for raw)
    same_as_backing: int = 0  # clusters not written because they equal the backing
    data_clusters: int = 0
    compressed_clusters: int = 0
    zero_clusters: int = 0
    file_size: int = 0
    seconds: float = 0.0
    removed_stale: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = {
            "source": self.source,
            "target": self.target,
            "format": self.target_format,
            "virtual-size": self.virtual_size,
            "data-read": self.data_read,
            "bytes-written": self.bytes_written,
            "zero-clusters-skipped": self.zero_clusters_skipped,
            "granularity": self.granularity,
            "seconds": round(self.seconds, 3),
            "file-size": self.file_size,
        }
        if self.target_format == "qcow2":
            d.update(
                {
                    "data-clusters": self.data_clusters,
                    "compressed-clusters": self.compressed_clusters,
                    "zero-clusters": self.zero_clusters,
                    "same-as-backing-clusters": self.same_as_backing,
                }
            )
        return d


# -- progress ----------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Progress:
    """A one-line progress bar on stderr: data bytes done of total, rate, ETA."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        total = max(self.total, self.done)
        frac = self.done / total if total else 1.0
        bar = "#" * int(frac * 30)
        elapsed = max(now - self.t0, 1e-6)
        rate = self.done / elapsed
        if self.done >= total:
            eta = "done"
        elif rate > 0:
            secs = int((total - self.done) / rate)
            eta = f"ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        else:
            eta = "ETA --:--:--"
        line = (
            f"  {frac * 100:5.1f}% [{bar:<30}] {_human(self.done)} / {_human(total)}  {_human(rate)}/s  {eta}"
        )
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


# -- reading only the data -------------------------------------------------------

Piece = tuple[int, int, int]  # (guest offset, length, depth)


def _data_items(chain: Chain, which: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, depth, which) for every extent of ``chain`` that must be read."""
    for e in chain.extents(0, end):
        if e.kind.must_read:
            yield (e.start, e.start + e.length, e.depth, which)


def _chunks(
    items: Iterable[tuple[int, int, int, int]], gran: int, limit: int, size: int, nsides: int
) -> Iterator[tuple[int, int, list[list[Piece]]]]:
    """Group ascending data items into chunks [a, b) aligned to ``gran``.

    A chunk holds at most ``limit`` bytes; data in the same or the next
    granule joins the current chunk, so writes stay contiguous; a bigger gap
    starts a new one. Items from several sides (source, backing) may overlap;
    each side's pieces come out sorted and disjoint.
    """
    it = iter(items)
    look = next(it, None)
    heap: list[tuple[int, int, int, int]] = []
    a = lim = end = -1
    pieces: list[list[Piece]] = []
    while True:
        if look is not None and (not heap or look[0] <= heap[0][0]):
            item = look
            look = next(it, None)
        elif heap:
            item = heapq.heappop(heap)
        else:
            break
        s, t, d, w = item
        if a < 0 or s >= lim or s - s % gran > end:
            if a >= 0:
                yield a, end, pieces
            a = s - s % gran
            lim = a + limit
            end = a
            pieces = [[] for _ in range(nsides)]
        e = min(t, lim)
        pieces[w].append((s, e - s, d))
        end = max(end, min(-(-e // gran) * gran, size))
        if e < t:
            heapq.heappush(heap, (e, t, d, w))
    if a >= 0:
        yield a, end, pieces


def _fill(layers: Sequence[Any], mv: memoryview, a: int, pieces: list[Piece], zeros: bytes) -> None:
    """Read ``pieces`` (guest offset, length, depth) into ``mv`` (guest offset ``a``); zero the gaps."""
    pos = 0
    for s, n, d in pieces:
        off = s - a
        if off > pos:
            mv[pos:off] = zeros[: off - pos]
        layers[d].readinto(s, mv[off : off + n])
        pos = off + n
    if pos < len(mv):
        mv[pos:] = zeros[: len(mv) - pos]


def _zero_blocks(buf: bytearray, start: int, end: int, h: int, zh: bytes) -> bytearray:
    """Mask of h-byte blocks of buf[start:end] (1 = all zeros); the last may be short.

    Uses bytes.find to skip quickly over data that has no run of h zeros.
    """
    n = end - start
    nblocks = -(-n // h)
    mask = bytearray(nblocks)
    pos = start
    full_end = start + (n // h) * h
    while pos < full_end:
        p = buf.find(zh, pos, full_end)
        if p < 0:
            break
        q = start + -(-(p - start) // h) * h
        while q < full_end and buf.startswith(zh, q):
            mask[(q - start) // h] = 1
            q += h
        pos = max(q, p + 1)
    if full_end < end and buf.startswith(zh[: end - full_end], full_end):
        mask[nblocks - 1] = 1
    return mask


def _runs(
    mask: bytearray | bytes, value: int, lo: int = 0, hi: int | None = None
) -> Iterator[tuple[int, int]]:
    """[i, j) runs of ``value`` in mask[lo:hi]."""
    hi = len(mask) if hi is None else hi
    other = 1 - value
    i = lo
    while i < hi:
        i = mask.find(value, i, hi)
        if i < 0:
            return
        j = mask.find(other, i, hi)
        if j < 0:
            j = hi
        yield i, j
        i = j


# -- compression -------------------------------------------------------------

_tls = threading.local()


def _compressor(kind: str) -> Callable[[bytes | memoryview], bytes]:
    if kind == "zlib":
        return lambda data: zlib.compress(data, ZLIB_LEVEL, ZLIB_WBITS)
    c = getattr(_tls, "zstd", None)
    if c is None:
        import zstandard

        c = _tls.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c.compress


def _compress_all(kind: str, cs: int, clusters: list[memoryview]) -> list[bytes | None]:
    """Compress each cluster; None where compression would not make it smaller."""
    comp = _compressor(kind)
    out: list[bytes | None] = []
    for mv in clusters:
        data: bytes | memoryview = mv if len(mv) == cs else bytes(mv) + bytes(cs - len(mv))
        p = comp(data)
        out.append(p if len(p) < cs else None)
    return out


# -- the pipeline ----------------------------------------------------------------
#
# Chunks are prepared (read, classified, compressed) on a small thread pool,
# several ahead; the main thread applies them strictly in guest order (host
# allocation and L2 entries), and the data is written by a second pool.
# pread/pwrite, zlib and zstandard all release the GIL. Each chunk owns a
# slot (its buffers); a slot is reused only after its writes completed, so
# memory stays at (slots x chunk size) whatever the image size.


class _Slot:
    __slots__ = ("buf", "bbuf", "writes")

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.bbuf: bytearray | None = None
        self.writes: list[Future] = []

    def wait(self) -> None:
        writes, self.writes = self.writes, []
        for f in writes:
            f.result()


WRITEBACK_EVERY = 32 << 20  # start the kernel's writeback after this many bytes


class _TargetIO:
    """The writer's WriteIO, inline or on a thread pool (writes then tracked per slot).

    Every WRITEBACK_EVERY bytes it asks the kernel to start writing back what
    was written so far (posix_fadvise DONTNEED starts asynchronous writeback
    of dirty pages and drops clean ones), so the fsync that makes TARGET
    durable before the rename has little left to do, and a big conversion
    does not flood the page cache.
    """

    def __init__(self, fd: int, path: str, threads: int) -> None:
        self.fd = fd
        self.path = path
        self._lo = -1
        self._hi = 0
        self._pending = 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="flatfs-write") if threads else None
        self.owner: list[Future] | None = None
        self.loose: deque[Future] = deque()

    def write(self, bufs: list[memoryview], offset: int) -> None:
        n = sum(len(b) for b in bufs)
        self._lo = offset if self._lo < 0 else min(self._lo, offset)
        self._hi = max(self._hi, offset + n)
        self._pending += n
        if self._pending >= WRITEBACK_EVERY:
            self.writeback()
        if self.pool is None:
            pwritev_all(self.fd, bufs, offset, self.path)
            return
        f = self.pool.submit(pwritev_all, self.fd, bufs, offset, self.path)
        if self.owner is not None:
            self.owner.append(f)
            return
        self.loose.append(f)
        while self.loose and (self.loose[0].done() or len(self.loose) > 16):
            self.loose.popleft().result()

    def drain(self) -> None:
        while self.loose:
            self.loose.popleft().result()

    def writeback(self) -> None:
        if self._lo >= 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, self._lo, self._hi - self._lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a hint
        self._lo, self._hi, self._pending = -1, 0, 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


Chunk = tuple[int, int, list[list[Piece]]]


class _Job:
    """Drives chunks through prepare (pool, any order) and apply (main thread, in order).

    Two reader threads keep a few 1 MiB reads in flight (a cold disk wants
    queue depth); the main thread writes each chunk as soon as it is ready,
    while it is still in cache. More writer threads only contend on the
    target's inode lock, so writes stay in the main thread (write_threads = 0).
    Compression is CPU-bound and gets one thread per CPU. prep_threads = 0
    runs everything inline.
    """

    chunk_bytes = CHUNK_BYTES
    prep_threads = 2
    write_threads = 0

    def __init__(self, summary: Summary, progress: Progress | None) -> None:
        self.summary = summary
        self.progress = progress
        self.delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        self.zeros = bytes(self.chunk_bytes)
        self.io: _TargetIO | None = None

    def chunks(self) -> Iterator[Chunk]:
        raise NotImplementedError

    def prepare(self, chunk: Chunk, slot: _Slot) -> Any:
        raise NotImplementedError

    def apply(self, chunk: Chunk, slot: _Slot, prepared: Any) -> None:
        raise NotImplementedError

    def pipeline(self) -> None:
        assert self.io is not None
        if self.prep_threads == 0:
            return self._inline()
        depth = 2 * self.prep_threads
        slots = [_Slot() for _ in range(depth + self.write_threads)]
        free = deque(slots)
        ahead: deque[tuple[Chunk, _Slot, Future]] = deque()
        pool = ThreadPoolExecutor(self.prep_threads, thread_name_prefix="flatfs-read")
        it = self.chunks()
        more = True
        try:
            while True:
                while more and len(ahead) < depth and free:
                    chunk = next(it, None)
                    if chunk is None:
                        more = False
                        break
                    slot = free.popleft()
                    slot.wait()
                    ahead.append((chunk, slot, pool.submit(self.prepare, chunk, slot)))
                if not ahead:
                    break
                chunk, slot, fut = ahead.popleft()
                prepared = fut.result()
                self.io.owner = slot.writes
                try:
                    self.apply(chunk, slot, prepared)
                finally:
                    self.io.owner = None
                free.append(slot)
                done = sum(n for side in chunk[2] for _, n, _ in side)
                self.summary.data_read += done
                if self.progress is not None:
                    self.progress.add(done)
                if self.delay:
                    time.sleep(self.delay)
            for slot in slots:
                slot.wait()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _inline(self) -> None:
        assert self.io is not None
        slot = _Slot()
        for chunk in self.chunks():
            prepared = self.prepare(chunk, slot)
            self.io.owner = slot.writes
            try:
                self.apply(chunk, slot, prepared)
            finally:
                self.io.owner = None
            slot.wait()
            done = sum(n for side in chunk[2] for _, n, _ in side)
            self.summary.data_read += done
            if self.progress is not None:
                self.progress.add(done)
            if self.delay:
                time.sleep(self.delay)


# -- the qcow2 job -------------------------------------------------------------

OP_DATA = 0  # (OP_DATA, guest cluster, buffer offset, length, segments, bitmaps)
OP_ZERO = 1  # (OP_ZERO, guest cluster, count, bitmaps)


class _QcowJob(_Job):
    def __init__(
        self,
        src: Chain,
        bak: Chain | None,
        writer: Qcow2Writer,
        opts: ConvertOptions,
        summary: Summary,
        progress: Progress | None,
        ctype: str,
    ) -> None:
        cs = writer.cs
        self.compress = opts.compress
        if self.compress:
            self.prep_threads = max(2, min(opts.threads or os.cpu_count() or 1, MAX_COMPRESS_THREADS))
        chunk = max(cs, COMPRESS_CHUNK_BYTES if self.compress else CHUNK_BYTES)
        self.chunk_bytes = chunk - chunk % cs
        super().__init__(summary, progress)
        self.src = src
        self.bak = bak
        self.bak_end = min(bak.size, writer.size) if bak is not None else 0
        self.w = writer
        self.cs = cs
        self.size = writer.size
        self.ctype = ctype
        s = opts.sparse_size
        # Zero detection granule inside a chunk: -S when it divides the cluster,
        # else the cluster (an all-zero cluster is never allocated either way).
        # Over a backing file, zeros where the backing reads zeros are "the
        # same as the backing" and never stored, whatever -S says.
        self.detect = s > 0 or bak is not None
        self.h = s if 0 < s <= cs and cs % s == 0 else cs
        self.zh = bytes(self.h)
        self.zc = bytes(cs)
        self.sub = cs // SUBCLUSTERS if writer.extended_l2 else 0
        self.zsub = bytes(self.sub)

    def run(self) -> None:
        self.io = _TargetIO(self.w.fd, self.w.path, self.write_threads)
        self.w.io = self.io
        try:
            self.pipeline()
            self.w.finish()
        finally:
            self.io.close()

    def chunks(self) -> Iterator[Chunk]:
        items: Iterable = _data_items(self.src, 0, self.size)
        if self.bak is not None:
            items = heapq.merge(items, _data_items(self.bak, 1, self.bak_end))
        return _chunks(items, self.cs, self.chunk_bytes, self.size, 2)

    def prepare(self, chunk: Chunk, slot: _Slot) -> tuple:
        a, b, (sp, bp) = chunk
        n = b - a
        if slot.buf is None:
            slot.buf = bytearray(self.chunk_bytes)
        buf = slot.buf
        mv = memoryview(buf)[:n]
        _fill(self.src.layers, mv, a, sp, self.zeros)
        bbuf = None
        if bp:
            assert self.bak is not None
            if slot.bbuf is None:
                slot.bbuf = bytearray(self.chunk_bytes)
            bbuf = slot.bbuf
            _fill(self.bak.layers, memoryview(bbuf)[:n], a, bp, self.zeros)
        if bbuf is None and not self.w.extended_l2:
            ops, zskip, same = self._plan_fast(a, n, buf)
        else:
            ops, zskip, same = self._plan_slow(a, n, buf, bbuf)
        comp = None
        if self.compress:
            cs = self.cs
            todo = []
            for op in ops:
                if op[0] == OP_DATA:
                    off, length = op[2], op[3]
                    todo.extend(mv[off + lo : off + min(length, lo + cs)] for lo in range(0, length, cs))
            comp = _compress_all(self.ctype, cs, todo)
        return ops, comp, zskip, same

    # -- deciding what to store ------------------------------------------------
    def _plan_fast(self, a: int, n: int, buf: bytearray) -> tuple[list[tuple], int, int]:
        """No backing data here and no subclusters: skip zero clusters, leave zero blocks as holes."""
        cs = self.cs
        g0 = a // cs
        if not self.detect:
            return [(OP_DATA, g0, 0, n, None, None)], 0, 0
        h = self.h
        zb = _zero_blocks(buf, 0, n, h, self.zh)
        if not zb.count(1):
            return [(OP_DATA, g0, 0, n, None, None)], 0, 0
        bpc = cs // h
        nclus = -(-n // cs)
        if bpc == 1:
            cz = zb
        else:
            cz = bytearray(nclus)
            for j in range(nclus):
                if zb.find(0, j * bpc, (j + 1) * bpc) < 0:
                    cz[j] = 1
        ops: list[tuple] = []
        for j0, j1 in _runs(cz, 0):
            off = j0 * cs
            length = min(n, j1 * cs) - off
            segs = [(i * h - off, min(n, k * h) - i * h) for i, k in _runs(zb, 0, j0 * bpc, j1 * bpc)]
            if len(segs) == 1 and segs[0] == (0, length):
                ops.append((OP_DATA, g0 + j0, off, length, None, None))
            else:
                ops.append((OP_DATA, g0 + j0, off, length, segs, None))
        return ops, cz.count(1), 0

    def _plan_slow(
        self, a: int, n: int, buf: bytearray, bbuf: bytearray | None
    ) -> tuple[list[tuple], int, int]:
        """Per cluster: compare with the backing, and/or per subcluster."""
        cs = self.cs
        g0 = a // cs
        ops: list[tuple] = []
        run: list[Any] | None = None  # [g, off, length, bitmaps]
        zrun: list[Any] | None = None  # [g, count, bitmaps]
        zskip = same = 0
        for j in range(-(-n // cs)):
            off = j * cs
            ln = min(cs, n - off)
            state, bitmap = self._classify(buf, bbuf, off, ln)
            if state == OP_DATA:
                if zrun is not None:
                    ops.append((OP_ZERO, *zrun))
                    zrun = None
                if run is not None and run[1] + run[2] == off:
                    run[2] += ln
                    run[3].append(bitmap)
                else:
                    if run is not None:
                        ops.append(self._data_op(*run))
                    run = [g0 + j, off, ln, [bitmap]]
                continue
            if run is not None:
                ops.append(self._data_op(*run))
                run = None
            if state == OP_ZERO:
                if zrun is not None and zrun[0] + zrun[1] == g0 + j:
                    zrun[1] += 1
                    zrun[2].append(bitmap)
                else:
                    if zrun is not None:
                        ops.append((OP_ZERO, *zrun))
                    zrun = [g0 + j, 1, [bitmap]]
                continue
            if zrun is not None:
                ops.append((OP_ZERO, *zrun))
                zrun = None
            if state == "same":
                same += 1
            else:
                zskip += 1
        if run is not None:
            ops.append(self._data_op(*run))
        if zrun is not None:
            ops.append((OP_ZERO, *zrun))
        return ops, zskip, same

    def _data_op(self, g: int, off: int, length: int, bitmaps: list[int]) -> tuple:
        if not self.w.extended_l2:
            return (OP_DATA, g, off, length, None, None)
        # Write only allocated subclusters; the others stay holes.
        sub = self.sub
        cs = self.cs
        segs: list[tuple[int, int]] = []
        for k, bm in enumerate(bitmaps):
            alloc = bm & ALL_ALLOC
            i = 0
            while i < SUBCLUSTERS:
                if not (alloc >> i) & 1:
                    i += 1
                    continue
                j = i
                while j < SUBCLUSTERS and (alloc >> j) & 1:
                    j += 1
                s = k * cs + i * sub
                e = min(length, k * cs + j * sub)
                if s < e:
                    if segs and segs[-1][0] + segs[-1][1] == s:
                        segs[-1] = (segs[-1][0], e - segs[-1][0])
                    else:
                        segs.append((s, e - s))
                i = j
        return (OP_DATA, g, off, length, segs, bitmaps)

    def _classify(self, buf: bytearray, bbuf: bytearray | None, off: int, ln: int) -> tuple[Any, int]:
        """One cluster -> (OP_DATA | OP_ZERO | "same" | "zero", subcluster bitmap)."""
        if self.w.extended_l2:
            return self._classify_sub(buf, bbuf, off, ln)
        if bbuf is not None:
            if buf.startswith(memoryview(bbuf)[off : off + ln], off):
                return "same", 0
            if buf.startswith(self.zc[:ln], off):
                return OP_ZERO, 0
            return OP_DATA, 0
        if self.detect and buf.startswith(self.zc[:ln], off):
            return "zero", 0
        return OP_DATA, 0

    def _classify_sub(self, buf: bytearray, bbuf: bytearray | None, off: int, ln: int) -> tuple[Any, int]:
        sub = self.sub
        zsub = self.zsub
        alloc = zero = 0
        bmv = memoryview(bbuf) if bbuf is not None else None
        for i in range(SUBCLUSTERS):
            s = off + i * sub
            k = min(sub, off + ln - s)
            if k <= 0:
                break
            if bmv is not None:
                if buf.startswith(bmv[s : s + k], s):
                    continue  # same as backing: unallocated
                if buf.startswith(zsub[:k], s):
                    zero |= 1 << (SUBCLUSTERS + i)  # zeros over backing data
                    continue
                alloc |= 1 << i
            elif self.detect and buf.startswith(zsub[:k], s):
                continue  # zeros, no backing: unallocated
            else:
                alloc |= 1 << i
        if alloc:
            return OP_DATA, alloc | zero
        if zero:
            return OP_ZERO, zero
        return ("same" if bmv is not None else "zero"), 0

    # -- storing (main thread, guest order) --------------------------------------
    def apply(self, chunk: Chunk, slot: _Slot, prepared: tuple) -> None:
        ops, comp, zskip, same = prepared
        self.summary.zero_clusters_skipped += zskip
        self.summary.same_as_backing += same
        assert slot.buf is not None
        mv = memoryview(slot.buf)
        w = self.w
        cs = self.cs
        k = 0
        for op in ops:
            if op[0] == OP_ZERO:
                _, g, count, bitmaps = op
                w.write_zero(g, count, bitmaps if w.extended_l2 else None)
                continue
            _, g, off, length, segs, bitmaps = op
            if comp is None:
                w.write_clusters(g, mv[off : off + length], segs, bitmaps)
                continue
            for i in range(-(-length // cs)):
                payload = comp[k]
                k += 1
                if payload is not None:
                    w.write_compressed(g + i, payload)
                    continue
                lo = i * cs
                hi = min(length, lo + cs)
                csegs = None
                if segs is not None:
                    csegs = [
                        (max(s, lo) - lo, min(s + n, hi) - max(s, lo))
                        for s, n in segs
                        if s < hi and s + n > lo
                    ]
                w.write_clusters(
                    g + i, mv[off + lo : off + hi], csegs, [bitmaps[i]] if bitmaps is not None else None
                )


# -- the raw job -----------------------------------------------------------------


class _RawJob(_Job):
    def __init__(
        self,
        src: Chain,
        fd: int,
        path: str,
        opts: ConvertOptions,
        summary: Summary,
        progress: Progress | None,
    ) -> None:
        self.s = opts.sparse_size
        # Zeros are found in blocks of at most 4 KiB (a file system block):
        # like qemu-img, a run of zero blocks is skipped when it is at least
        # -S long, or when it starts or ends the data (next to a hole or a
        # chunk edge), whatever its length. Only shorter runs between data
        # are written, so that -S keeps the writes unfragmented.
        self.gran = min(self.s, DEFAULT_SPARSE_SIZE) if self.s else DEFAULT_SPARSE_SIZE
        self.min_run = -(-self.s // self.gran) if self.s else 0
        self.chunk_bytes = max(self.gran, CHUNK_BYTES - CHUNK_BYTES % self.gran)
        super().__init__(summary, progress)
        self.src = src
        self.fd = fd
        self.path = path
        self.zh = bytes(self.gran)
        # -S 0 from a plain raw file: the kernel may copy (or reflink) without us looking.
        self.cfr = (
            self.s == 0
            and len(src.layers) == 1
            and src.layers[0].format == "raw"
            and hasattr(os, "copy_file_range")
        )

    def run(self) -> None:
        self.io = _TargetIO(self.fd, self.path, self.write_threads)
        try:
            self.pipeline()
            self.io.drain()
        finally:
            self.io.close()
        try:
            os.ftruncate(self.fd, self.src.size)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None

    def chunks(self) -> Iterator[Chunk]:
        size = self.src.size
        return _chunks(_data_items(self.src, 0, size), self.gran, self.chunk_bytes, size, 1)

    def prepare(self, chunk: Chunk, slot: _Slot) -> tuple[list[tuple[int, int]], int, int]:
        """-> (writes as (buffer offset, length), zero blocks skipped, bytes copied by the kernel)."""
        a, b, (sp,) = chunk
        if self.cfr and self._copy_range(sp):
            return [], 0, sum(n for _, n, _ in sp)
        n = b - a
        if slot.buf is None:
            slot.buf = bytearray(self.chunk_bytes)
        buf = slot.buf
        _fill(self.src.layers, memoryview(buf)[:n], a, sp, self.zeros)
        if self.s == 0:
            return [(s - a, ln) for s, ln, _ in _coalesce_pieces(sp)], 0, 0
        g = self.gran
        zb = _zero_blocks(buf, 0, n, g, self.zh)
        if self.min_run > 1:
            self._keep_short_zero_runs(zb, a, n, sp)
        skipped = zb.count(1) * g // self.s
        return [(i * g, min(n, j * g) - i * g) for i, j in _runs(zb, 0)], skipped, 0

    def _keep_short_zero_runs(self, zb: bytearray, a: int, n: int, pieces: list[Piece]) -> None:
        """Clear (write) runs of zero blocks shorter than -S that lie between data.

        A run is skipped (stays 1 in ``zb``) if it is at least -S long, touches
        the chunk's edge, or touches a hole of the source (a gap between
        ``pieces``): qemu-img never writes those either.
        """
        g = self.gran
        nb = len(zb)
        hole = bytearray(nb)
        pos = 0
        for s, ln, _ in _coalesce_pieces(pieces):
            off = s - a
            if off > pos:
                hole[pos // g : -(-off // g)] = b"\x01" * (-(-off // g) - pos // g)
            pos = off + ln
        if pos < n:
            hole[pos // g : nb] = b"\x01" * (nb - pos // g)
        for i, j in list(_runs(zb, 1)):
            if j - i >= self.min_run or i == 0 or j == nb or hole.find(1, i, j) >= 0:
                continue
            zb[i:j] = bytes(j - i)

    def apply(self, chunk: Chunk, slot: _Slot, prepared: tuple) -> None:
        writes, zskip, copied = prepared
        self.summary.zero_clusters_skipped += zskip
        self.summary.bytes_written += copied
        a = chunk[0]
        assert self.io is not None
        if writes:
            assert slot.buf is not None
            mv = memoryview(slot.buf)
            for off, n in writes:
                self.io.write([mv[off : off + n]], a + off)
                self.summary.bytes_written += n

    def _copy_range(self, pieces: list[Piece]) -> bool:
        """Let the kernel copy raw data; False (and never again) if it cannot here."""
        layer = self.src.layers[0]
        for idx, (s, n, _) in enumerate(pieces):
            done = 0
            while done < n:
                try:
                    k = os.copy_file_range(layer.fd, self.fd, n - done, s + done, s + done)
                except OSError as exc:
                    if (
                        exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
                        and idx == 0
                        and done == 0
                    ):
                        self.cfr = False
                        return False
                    raise ImageIOError.from_oserror(self.path, exc, s + done) from None
                if k <= 0:
                    raise ImageIOError(layer.path, "short read: file ends early", s + done)
                done += k
        return True


def _coalesce_pieces(pieces: list[Piece]) -> Iterator[Piece]:
    cur: list[int] | None = None
    for s, n, _d in pieces:
        if cur is not None and cur[0] + cur[1] == s:
            cur[1] += n
            continue
        if cur is not None:
            yield cur[0], cur[1], 0
        cur = [s, n]
    if cur is not None:
        yield cur[0], cur[1], 0


# -- safety: temporary file, signals, refusing to clobber -------------------------------


def temp_prefix(dest: str) -> str:
    return f".{os.path.basename(dest)}{TMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(dest: str) -> list[str]:
    """Remove temporary files of earlier conversions to ``dest`` whose process is gone."""
    folder = os.path.dirname(dest) or "."
    prefix = temp_prefix(dest)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]+$")
    removed = []
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for name in entries:
        m = pattern.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ImageIOError.from_oserror(os.path.join(folder, name), exc) from None
    return removed


def destination(target: str | os.PathLike[str]) -> str:
    """The file a conversion to ``target`` really replaces (a symlink's target)."""
    target = os.fspath(target)
    if os.path.islink(target):
        return os.path.realpath(target)
    return os.path.abspath(target)


def check_target(target: str, dest: str, chains: Sequence[Chain], force: bool) -> None:
    """Refuse a TARGET that is part of a chain (even with force) or exists (without force)."""
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ImageIOError.from_oserror(target, exc) from None
    real = os.path.realpath(dest)
    for chain in chains:
        for host in chain.host_files():
            try:
                lst = os.fstat(host.fd)
            except OSError:
                lst = None
            same = st is not None and lst is not None and (st.st_dev, st.st_ino) == (lst.st_dev, lst.st_ino)
            if same or os.path.realpath(host.path) == real:
                raise ConvertError(
                    f"{target}: refusing to write over {host.path}, which is part of "
                    "the chain being read (even with --force)"
                )
    folder = os.path.dirname(dest)
    if not os.path.isdir(folder):
        raise ConvertError(f"{target}: folder {folder} does not exist")
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise ConvertError(f"{target}: exists and is not a regular file; refusing to replace it")
        if not force:
            raise ConvertError(f"{target}: already exists (use --force to overwrite)")


class _SignalGuard:
    """For the duration: SIGINT/SIGTERM/SIGHUP raise Interrupted (main thread only)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.old: dict[int, Any] = {}
        self.active = threading.current_thread() is threading.main_thread()
        self.finished = False

    def _raise(self, signum: int, frame: object) -> None:
        if not self.finished:
            raise Interrupted(signum, self.target)
        # TARGET is complete and in place: let the run end normally.

    def __enter__(self) -> _SignalGuard:
        if self.active:
            for s in _SIGNALS:
                self.old[s] = signal.signal(s, self._raise)
        return self

    def ignore(self) -> None:
        """While cleaning up, a second signal must not stop the cleanup."""
        if self.active:
            for s in _SIGNALS:
                signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _fsync_dir(folder: str) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# -- entry points ------------------------------------------------------------------


def _validate(opts: ConvertOptions) -> None:
    if opts.target_format not in ("qcow2", "raw"):
        raise ConvertError(f"unknown target format {opts.target_format!r}")
    if opts.sparse_size < 0 or opts.sparse_size % 512:
        raise ConvertError(f"--sparse-size must be 0 or a multiple of 512, not {opts.sparse_size}")
    if opts.target_format == "raw":
        for flag, given in (
            ("-c/--compress", opts.compress),
            ("-B/--backing", opts.backing),
            ("--extended-l2", opts.extended_l2),
            ("--compat", opts.compat),
            ("--cluster-size", opts.cluster_size),
            ("--compression-type", opts.compression_type),
        ):
            if given:
                raise ConvertError(f"{flag} needs a qcow2 target (-O qcow2)")
        return
    if opts.compat not in (None, "0.10", "1.1"):
        raise ConvertError(f"--compat must be 0.10 or 1.1, not {opts.compat!r}")
    cluster_bits_of(opts.cluster_size or DEFAULT_CLUSTER_SIZE)
    if opts.compression_type not in (None, "zlib", "zstd"):
        raise ConvertError(f"unknown compression type {opts.compression_type!r}")
    if opts.backing_format is not None and not opts.backing:
        raise ConvertError("-F/--backing-format needs -B/--backing")


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    options: ConvertOptions | None = None,
    open_options: OpenOptions | None = None,
    progress: bool = False,
) -> Summary:
    """Open SOURCE's chain (and BACKING's, relative to TARGET's folder) and convert."""
    options = options or ConvertOptions()
    open_options = open_options or OpenOptions()
    _validate(options)
    target = os.fspath(target)
    dest = destination(target)
    with open_chain(source, open_options) as chain:
        if not options.backing:
            return convert_chain(chain, target, options, progress=progress)
        bpath = options.backing
        if not os.path.isabs(bpath):
            bpath = os.path.join(os.path.dirname(dest), bpath)
        bopts = OpenOptions(
            format=options.backing_format,
            backing_dir=open_options.backing_dir,
            allow_probe_raw=open_options.allow_probe_raw,
            allow_special=open_options.allow_special,
            force_share=open_options.force_share,
            max_depth=open_options.max_depth,
        )
        try:
            bchain = open_chain(bpath, bopts)
        except ImageIOError as exc:
            if exc.errno == errno.ENOENT:
                raise ConvertError(
                    f"{target}: backing file {options.backing!r} not found "
                    f"(looked for {bpath}; it is resolved against TARGET's folder)"
                ) from None
            raise
        with bchain:
            return convert_chain(chain, target, options, backing=bchain, progress=progress)


def convert_chain(
    source: Chain,
    target: str | os.PathLike[str],
    options: ConvertOptions,
    backing: Chain | None = None,
    progress: bool | Progress = False,
) -> Summary:
    """Convert an open chain into TARGET, safely (temporary file, fsync, rename)."""
    _validate(options)
    target = os.fspath(target)
    dest = destination(target)
    t0 = time.monotonic()
    if options.backing and backing is None:
        raise ConvertError("-B/--backing given but no backing chain opened")
    check_target(target, dest, [source] + ([backing] if backing is not None else []), options.force)
    summary = Summary(
        source=source.path, target=target, target_format=options.target_format, virtual_size=source.size
    )
    summary.removed_stale = remove_stale_temps(dest)

    bar: Progress | None = None
    if isinstance(progress, Progress):
        bar = progress
    elif progress:
        total = sum(e.length for e in source.extents() if e.kind.must_read)
        if backing is not None:
            total += sum(e.length for e in backing.extents(0, source.size) if e.kind.must_read)
        bar = Progress(total)

    folder = os.path.dirname(dest)
    with _SignalGuard(target) as guard:
        tmp = os.path.join(folder, f"{temp_prefix(dest)}{os.getpid()}-{secrets.token_hex(4)}")
        fd = -1
        renamed = False
        try:
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ImageIOError.from_oserror(target, exc) from None
            if options.target_format == "raw":
                summary.granularity = options.sparse_size
                _RawJob(source, fd, target, options, summary, bar).run()
                summary.file_size = source.size
            else:
                _write_qcow2(source, backing, fd, target, options, summary, bar)
            try:
                os.close(fd)
            except OSError as exc:
                raise ImageIOError.from_oserror(target, exc) from None
            finally:
                fd = -1
            blocked = _block_signals()
            try:
                try:
                    os.rename(tmp, dest)
                except OSError as exc:
                    raise ImageIOError.from_oserror(target, exc) from None
                renamed = True
                guard.finished = True
            finally:
                _unblock_signals(blocked)
            _fsync_dir(folder)
        finally:
            if not renamed:
                guard.ignore()
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if bar is not None:
                bar.close()
    summary.seconds = time.monotonic() - t0
    return summary


def _block_signals() -> set | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(old: set | None) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_qcow2(
    source: Chain,
    backing: Chain | None,
    fd: int,
    target: str,
    options: ConvertOptions,
    summary: Summary,
    bar: Progress | None,
) -> None:
    version = 2 if options.compat == "0.10" else 3
    ctype = options.compression_type or "zlib"
    bfmt = None
    if options.backing:
        assert backing is not None
        bfmt = options.backing_format or backing.layers[0].format
    size = -(-source.size // 512) * 512
    writer = Qcow2Writer(
        fd,
        size,
        path=target,
        cluster_size=options.cluster_size or DEFAULT_CLUSTER_SIZE,
        version=version,
        backing_file=options.backing,
        backing_format=bfmt,
        extended_l2=options.extended_l2,
        compression_type=ctype,
    )
    summary.granularity = writer.cs
    _QcowJob(source, backing, writer, options, summary, bar, ctype).run()
    summary.bytes_written = writer.bytes_written
    summary.data_clusters = writer.data_clusters
    summary.compressed_clusters = writer.compressed_clusters
    summary.zero_clusters = writer.zero_clusters
    summary.file_size = writer.file_size


__all__ = [
    "ConvertOptions",
    "Summary",
    "Interrupted",
    "Progress",
    "convert",
    "convert_chain",
    "remove_stale_temps",
    "check_target",
    "destination",
    "FlatfsError",
]
