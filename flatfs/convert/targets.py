"""The two targets, qcow2 and raw, behind one protocol the pipeline drives.

A :class:`Target` says how to cut the source into chunks, prepares a chunk
(read its data, plan what to store, compress) on any thread, applies the
plan to the file in guest order on the main thread, and finishes the file
(metadata, size, fsync). The qcow2 on-disk layout is the qcow2 format's own
writer, reached through the format table; a raw image is its guest bytes at
their own offsets, so the raw target writes them itself.

With copy offload (``-C``, or -S 0 from a plain raw file to raw) the data
runs are not read: each is copied by the kernel (``copy_file_range``) from
where the chain says it lies on the host (``Chain.host_data``) into TARGET,
which lets a file system that shares extents (XFS with reflink, btrfs) share
them instead of copying. Runs the chain cannot map (compressed clusters) are
read and written as usual.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from ..chain import Chain
from ..errors import ImageIOError
from ..formats.api import HostFile
from ..hostio import pread_exact, pwritev_all
from ..readers import Chunk, data_chunks, fill
from .capability import ClusterWriter, qcow2_writer
from .compress import compress_clusters
from .options import DEFAULT_SPARSE_SIZE, ConvertOptions, Summary
from .pipeline import Slot
from .plan import BlockPlanner, ClusterPlanner, DataOp, Op, Segment

# 2 MiB, qemu-img's request size: half the syscalls and hand-offs of 1 MiB chunks, and
# (measured on tmpfs, 2 cores, docs/bench.md) 3-8% less CPU than 1 MiB, the same as 4 MiB.
CHUNK_BYTES = 2 << 20  # read, classify and write this much at a time
COMPRESS_CHUNK_BYTES = 1 << 20  # compressed: one worker task
# One reader thread: reads (and zero detection) overlap the main thread's writes. Two
# readers measured no faster on a cold disk and cost more CPU on 2 cores; none (all on
# the main thread) is as cheap on tmpfs but gives up the overlap a cold disk needs.
READERS = 1
COPY_CHUNK_BYTES = 8 << 20  # copy offload: one chunk of runs to copy (nothing is buffered)
# copy_file_range refused between these two files: copy through a buffer instead
COPY_REFUSED = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.ENOTSUP)
COPY_BOUNCE = 1 << 20
MAX_COMPRESS_THREADS = 8
WRITEBACK_EVERY = 32 << 20  # start the kernel's writeback after this many bytes

if TYPE_CHECKING:
    from .inplace import InPlaceIO

P = TypeVar("P")


class Target(Protocol[P]):
    """One conversion target, as the pipeline drives it.

    ``readers`` threads prepare chunks; the main thread applies them in
    order. More writer threads would only contend on the target's inode
    lock, so every write is made by the main thread, in :meth:`apply`.
    """

    readers: int

    def chunks(self) -> Iterator[Chunk]:
        """The source's data, cut into aligned chunks, in guest order."""
        ...

    def prepare(self, chunk: Chunk, slot: Slot) -> P:
        """Read ``chunk`` into ``slot`` and decide what to store (any thread)."""
        ...

    def apply(self, chunk: Chunk, slot: Slot, prepared: P) -> None:
        """Store what :meth:`prepare` decided (main thread, guest order)."""
        ...

    def finish(self) -> None:
        """Complete the file and make it durable; fill in the summary."""
        ...


class WritebackIO:
    """pwritev into the target, asking the kernel to write back every WRITEBACK_EVERY bytes.

    posix_fadvise DONTNEED starts asynchronous writeback of dirty pages and
    drops clean ones, so the fsync that makes TARGET durable before the
    rename has little left to do, and a big conversion does not flood the
    page cache.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._lo = -1
        self._hi = 0
        self._pending = 0
        self._refused: set[int] = set() if hasattr(os, "copy_file_range") else _ALL_FDS
        self._bounce: memoryview | None = None

    def write(self, bufs: list[memoryview], offset: int) -> None:
        self._account(offset, sum(len(b) for b in bufs))
        pwritev_all(self.fd, bufs, offset, self.path)

    def copy(self, src: HostFile, src_offset: int, n: int, offset: int) -> int:
        """Copy ``n`` bytes of ``src`` from ``src_offset`` to ``offset`` in the kernel.

        Returns how many the kernel copied (or shared); where it refuses
        copy_file_range between these files, the rest goes through a buffer.
        """
        self._account(offset, n)
        return self._copy(src, src_offset, n, offset)

    def _copy(self, src: HostFile, src_offset: int, n: int, offset: int) -> int:
        done = 0
        while done < n and src.fd not in self._refused:
            try:
                k = os.copy_file_range(src.fd, self.fd, n - done, src_offset + done, offset + done)
            except OSError as exc:
                if exc.errno in COPY_REFUSED and done == 0:
                    self._refused.add(src.fd)
                    break
                raise ImageIOError.from_oserror(self.path, exc, offset + done) from None
            if k <= 0:
                raise ImageIOError(src.path, "short read: file ends early", src_offset + done)
            done += k
        copied = done
        while done < n:
            if self._bounce is None:
                self._bounce = memoryview(bytearray(COPY_BOUNCE))
            k = min(n - done, COPY_BOUNCE)
            pread_exact(src.fd, src.path, self._bounce[:k], src_offset + done)
            pwritev_all(self.fd, [self._bounce[:k]], offset + done, self.path)
            done += k
        return copied

    def _account(self, offset: int, n: int) -> None:
        self._lo = offset if self._lo < 0 else min(self._lo, offset)
        self._hi = max(self._hi, offset + n)
        self._pending += n
        if self._pending >= WRITEBACK_EVERY:
            self._writeback()

    def _writeback(self) -> None:
        if self._lo >= 0 and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd, self._lo, self._hi - self._lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a hint
        self._lo, self._hi, self._pending = -1, 0, 0


class _AllFds(set[int]):
    def __contains__(self, fd: object) -> bool:
        return True


_ALL_FDS = _AllFds()  # no copy_file_range on this system: every copy goes through a buffer


class CopyRun(NamedTuple):
    """One run of a chunk to store: at ``offset`` in the chunk, ``length`` bytes, copied from
    ``src`` at ``host``; or, without ``src``, already read into the slot's buffer at ``offset``."""

    offset: int
    length: int
    src: HostFile | None
    host: int


def plan_copies(
    chain: Chain, files: dict[int, HostFile], chunk: Chunk, slot: Slot, size: int
) -> list[CopyRun]:
    """Where each data piece of ``chunk`` lies on the host; the pieces the chain cannot map
    (compressed clusters...) are read into ``slot.buf`` (of ``size`` bytes) here."""
    a = chunk.start
    out: list[CopyRun] = []
    for s, n, d in chunk.pieces[0]:
        for g, ln, fd, h in chain.host_data(d, s, n):
            if fd >= 0:
                out.append(CopyRun(g - a, ln, files[fd], h))
                continue
            if slot.buf is None:
                slot.buf = bytearray(size)
            chain.read_data(d, g, memoryview(slot.buf)[g - a : g - a + ln])
            out.append(CopyRun(g - a, ln, None, 0))
    return out


def host_files(chain: Chain) -> dict[int, HostFile]:
    return {f.fd: f for f in chain.host_files()}


def open_target(
    source: Chain,
    backing: Chain | None,
    fd: int,
    path: str,
    options: ConvertOptions,
    summary: Summary,
    in_place: InPlaceIO | None = None,
) -> Target[Any]:
    """The target ``options.target_format`` asks for, writing into ``fd``.

    ``fd`` is an empty file, or with ``in_place`` (``convert -n``) an existing
    file or device that keeps its size, written through ``in_place``.
    """
    if options.target_format == "raw":
        return RawTarget(source, fd, path, options, summary, in_place)
    return Qcow2Target(source, backing, fd, path, options, summary, in_place)


# -- qcow2 -------------------------------------------------------------------------


class Qcow2Prepared(NamedTuple):
    ops: list[Op]
    compressed: list[bytes | None] | None  # per cluster of the data ops, when compressing
    zero_skipped: int
    same_as_backing: int
    copies: list[CopyRun] | None = None  # copy offload: the runs to copy (no ops then)


class Qcow2Target:
    def __init__(
        self,
        source: Chain,
        backing: Chain | None,
        fd: int,
        path: str,
        options: ConvertOptions,
        summary: Summary,
        in_place: InPlaceIO | None = None,
    ) -> None:
        writer_class = qcow2_writer()
        self.in_place = in_place
        self.io: WritebackIO = in_place if in_place is not None else WritebackIO(fd, path)
        ctype = options.compression_type or "zlib"
        bfmt = None
        if options.backing:
            assert backing is not None
            bfmt = options.backing_format or backing.layers[0].format
        self.writer: ClusterWriter = writer_class(
            fd,
            -(-source.size // 512) * 512,
            path=path,
            cluster_size=options.cluster_size or writer_class.DEFAULT_CLUSTER_SIZE,
            version=2 if options.compat == "0.10" else 3,
            backing_file=options.backing,
            backing_format=bfmt,
            extended_l2=options.extended_l2,
            compression_type=ctype,
            io=self.io,
            resize=in_place is None,
        )
        w = self.writer
        cs = self.cs = w.cs
        summary.granularity = cs
        self.summary = summary
        self.ctype = ctype
        self.compress = options.compress
        self.offload = options.copy_offload
        self.files = host_files(source) if self.offload else {}
        self.readers = READERS
        if self.compress:
            self.readers = max(2, min(options.threads or os.cpu_count() or 1, MAX_COMPRESS_THREADS))
        if self.offload:
            self.readers = 0  # nothing to read ahead: the main thread asks the kernel to copy
        chunk = max(cs, COMPRESS_CHUNK_BYTES if self.compress else CHUNK_BYTES)
        if self.offload:
            chunk = max(cs, COPY_CHUNK_BYTES)
        self.chunk_bytes = chunk - chunk % cs
        self.zeros = bytes(self.chunk_bytes)
        self.source = source
        self.backing = backing
        self.size = w.size
        self.planner = ClusterPlanner(
            cs,
            options.sparse_size,
            backing is not None,
            w.extended_l2,
            writer_class.SUBCLUSTERS,
            writer_class.ALL_ALLOCATED,
        )

    def chunks(self) -> Iterator[Chunk]:
        sides = [(self.source, self.size)]
        if self.backing is not None:
            sides.append((self.backing, min(self.backing.size, self.size)))
        return data_chunks(sides, self.cs, self.chunk_bytes, self.size)

    def prepare(self, chunk: Chunk, slot: Slot) -> Qcow2Prepared:
        if self.offload:
            return Qcow2Prepared(
                [], None, 0, 0, plan_copies(self.source, self.files, chunk, slot, self.chunk_bytes)
            )
        a, b, pieces = chunk
        n = b - a
        if slot.buf is None:
            slot.buf = bytearray(self.chunk_bytes)
        buf = slot.buf
        mv = memoryview(buf)[:n]
        fill(self.source, mv, a, pieces[0], self.zeros)
        bbuf = None
        if len(pieces) > 1 and pieces[1]:
            assert self.backing is not None
            if slot.bbuf is None:
                slot.bbuf = bytearray(self.chunk_bytes)
            bbuf = slot.bbuf
            fill(self.backing, memoryview(bbuf)[:n], a, pieces[1], self.zeros)
        plan = self.planner.plan(a, n, buf, bbuf)
        compressed = None
        if self.compress:
            cs = self.cs
            todo = [
                mv[op.offset + lo : op.offset + min(op.length, lo + cs)]
                for op in plan.ops
                if isinstance(op, DataOp)
                for lo in range(0, op.length, cs)
            ]
            compressed = compress_clusters(self.ctype, cs, todo)
        return Qcow2Prepared(plan.ops, compressed, plan.zero_skipped, plan.same_as_backing)

    def apply(self, chunk: Chunk, slot: Slot, prepared: Qcow2Prepared) -> None:
        ops, compressed, zskip, same, copies = prepared
        if copies is not None:
            self._store_copies(chunk, slot, copies)
            return
        self.summary.zero_clusters_skipped += zskip
        self.summary.same_as_backing += same
        assert slot.buf is not None
        mv = memoryview(slot.buf)
        w = self.writer
        payloads = iter(compressed) if compressed is not None else None
        for op in ops:
            if isinstance(op, DataOp):
                if payloads is None:
                    w.write_clusters(
                        op.cluster, mv[op.offset : op.offset + op.length], op.segments, op.bitmaps
                    )
                else:
                    self._store_compressed(op, mv, payloads)
            else:
                w.write_zero(op.cluster, op.nclusters, op.bitmaps if w.extended_l2 else None)

    def _store_copies(self, chunk: Chunk, slot: Slot, runs: list[CopyRun]) -> None:
        """Every cluster of the chunk becomes a data cluster (no zero detection, as qemu-img -C);
        each run is copied to the same offset in its target cluster, so blocks stay aligned
        with the source's and can be shared; what no run covers stays a hole."""
        a, b = chunk.start, chunk.end
        io = self.io
        summary = self.summary

        def fill(host: int) -> None:
            for off, n, src, h in runs:
                if src is not None:
                    copied = io.copy(src, h, n, host + off)
                    summary.copied += copied
                    summary.data_read -= copied  # counted by the pipeline as read
                else:
                    assert slot.buf is not None
                    io.write([memoryview(slot.buf)[off : off + n]], host + off)
                summary.bytes_written += n

        self.writer.place_clusters(a // self.cs, -(-(b - a) // self.cs), fill)

    def _store_compressed(self, op: DataOp, mv: memoryview, payloads: Iterator[bytes | None]) -> None:
        """Each cluster of ``op`` compressed, or as data where compressing did not pay."""
        w = self.writer
        cs = self.cs
        g, off, length, segs, bitmaps = op
        for i in range(-(-length // cs)):
            payload = next(payloads)
            if payload is not None:
                w.write_compressed(g + i, payload)
                continue
            lo = i * cs
            hi = min(length, lo + cs)
            csegs = None
            if segs is not None:
                csegs = [
                    (max(s, lo) - lo, min(s + n, hi) - max(s, lo)) for s, n in segs if s < hi and s + n > lo
                ]
            w.write_clusters(
                g + i, mv[off + lo : off + hi], csegs, [bitmaps[i]] if bitmaps is not None else None
            )

    def finish(self) -> None:
        w = self.writer
        w.finish()
        s = self.summary
        s.bytes_written += w.bytes_written
        s.data_clusters = w.data_clusters
        s.compressed_clusters = w.compressed_clusters
        s.zero_clusters = w.zero_clusters
        s.file_size = w.file_size
        if self.in_place is not None and self.in_place.pos < w.file_size:
            # (the writer's last write is its refcount table, at the end: never taken)
            self.in_place.fill_to(w.file_size)
            try:
                os.fsync(self.in_place.fd)
            except OSError as exc:
                raise ImageIOError.from_oserror(self.in_place.path, exc) from None


# -- raw -----------------------------------------------------------------------------


def guest_chunks(source: Chain, planner: BlockPlanner, chunk_bytes: int) -> Iterator[Chunk]:
    """The source's data in chunks of ``chunk_bytes``, cut at the planner's granule."""
    return data_chunks([(source, source.size)], planner.gran, chunk_bytes, source.size)


def read_and_plan(
    source: Chain, planner: BlockPlanner, chunk: Chunk, slot: Slot, chunk_bytes: int, zeros: bytes
) -> tuple[list[Segment], int]:
    """Read ``chunk`` into ``slot`` and find what to write: (buffer offset, length) ranges, and
    the -S runs of zeros skipped. Shared by the raw target and every format's writer."""
    a, b, (pieces,) = chunk
    n = b - a
    if slot.buf is None:
        slot.buf = bytearray(chunk_bytes)
    buf = slot.buf
    fill(source, memoryview(buf)[:n], a, pieces, zeros)
    return planner.plan(a, n, buf, pieces)


class RawPrepared(NamedTuple):
    writes: list[Segment]  # (buffer offset, length)
    zero_skipped: int  # -S runs of zeros not written
    copies: list[CopyRun] | None  # copy offload: the runs to copy (or write from the buffer)


class RawTarget:
    """Guest bytes at their own offsets.

    In place (``convert -n``), the guest's first and last MiB (where partition
    tables and image headers live) are kept in memory and written only once
    everything else is durable, so an interrupted run leaves nothing that
    looks like a disk.
    """

    def __init__(
        self,
        source: Chain,
        fd: int,
        path: str,
        options: ConvertOptions,
        summary: Summary,
        in_place: InPlaceIO | None = None,
    ) -> None:
        self.planner = BlockPlanner(options.sparse_size, DEFAULT_SPARSE_SIZE)
        gran = self.planner.gran
        # Copy offload: asked for (-C), or -S 0 from a plain raw file (nothing to look at).
        self.offload = options.copy_offload or (
            options.sparse_size == 0 and source.format == "raw" and len(source.layers) == 1
        )
        self.files = host_files(source) if self.offload else {}
        size = COPY_CHUNK_BYTES if self.offload else CHUNK_BYTES
        self.chunk_bytes = max(gran, size - size % gran)
        self.zeros = b"" if self.offload else bytes(self.chunk_bytes)
        self.readers = 0 if self.offload else READERS
        self.source = source
        self.fd = fd
        self.path = path
        self.io: WritebackIO = in_place if in_place is not None else WritebackIO(fd, path)
        self.in_place = in_place
        self.zones: list[tuple[int, bytearray]] = []
        if in_place is not None:
            from .inplace import HEAD_ZONE, TAIL_ZONE

            size = source.size
            head = min(HEAD_ZONE, size)
            tail = max(head, size - TAIL_ZONE)
            self.zones = [(0, bytearray(head))]
            if tail < size:
                self.zones.append((tail, bytearray(size - tail)))
        summary.granularity = options.sparse_size
        self.summary = summary

    def chunks(self) -> Iterator[Chunk]:
        return guest_chunks(self.source, self.planner, self.chunk_bytes)

    def prepare(self, chunk: Chunk, slot: Slot) -> RawPrepared:
        if self.offload:
            return RawPrepared([], 0, plan_copies(self.source, self.files, chunk, slot, self.chunk_bytes))
        writes, skipped = read_and_plan(self.source, self.planner, chunk, slot, self.chunk_bytes, self.zeros)
        return RawPrepared(writes, skipped, None)

    def apply(self, chunk: Chunk, slot: Slot, prepared: RawPrepared) -> None:
        writes, zskip, copies = prepared
        summary = self.summary
        summary.zero_clusters_skipped += zskip
        if copies is not None:
            self._store_copies(chunk.start, slot, copies)
        if writes:
            assert slot.buf is not None
            mv = memoryview(slot.buf)
            a = chunk.start
            for off, n in writes:
                if self.zones:
                    self._write_around_zones(mv[off : off + n], a + off)
                else:
                    self.io.write([mv[off : off + n]], a + off)
                summary.bytes_written += n

    def _store_copies(self, a: int, slot: Slot, runs: list[CopyRun]) -> None:
        """Each run at its own guest offset: copied by the kernel, or written from the buffer
        (runs the chain could not map, and in place, the parts kept for the end)."""
        summary = self.summary
        for off, n, src, h in runs:
            g = a + off
            if src is not None and not self._in_zones(g, n):
                copied = self.io.copy(src, h, n, g)
                summary.copied += copied
                summary.data_read -= copied  # counted by the pipeline as read
            else:
                if src is None:
                    assert slot.buf is not None
                    data = memoryview(slot.buf)[off : off + n]
                else:
                    data = memoryview(bytearray(n))
                    pread_exact(src.fd, src.path, data, h)
                if self.zones:
                    self._write_around_zones(data, g)
                else:
                    self.io.write([data], g)
            summary.bytes_written += n

    def _in_zones(self, start: int, n: int) -> bool:
        return any(z < start + n and start < z + len(buf) for z, buf in self.zones)

    def _write_around_zones(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``, keeping the parts inside the zones for the end."""
        end = offset + len(data)
        pos = offset
        for zstart, zbuf in self.zones:
            zend = zstart + len(zbuf)
            if zend <= pos or zstart >= end:
                continue
            if zstart > pos:
                self.io.write([data[pos - offset : zstart - offset]], pos)
                pos = zstart
            stop = min(end, zend)
            zbuf[pos - zstart : stop - zstart] = data[pos - offset : stop - offset]
            pos = stop
        if pos < end:
            self.io.write([data[pos - offset :]], pos)

    def finish(self) -> None:
        if self.in_place is not None:
            self._finish_in_place(self.in_place)
            return
        try:
            os.ftruncate(self.fd, self.source.size)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None
        self.summary.file_size = self.source.size

    def _finish_in_place(self, io: InPlaceIO) -> None:
        """Zero the rest of the image, make it durable, then the last MiB, then the first."""
        size = self.source.size
        io.fill_to(size)
        try:
            os.fdatasync(self.fd)
            for zstart, zbuf in reversed(self.zones):
                if zbuf:
                    pwritev_all(self.fd, [zbuf], zstart, self.path)
                    if zstart:
                        os.fdatasync(self.fd)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None
        self.summary.file_size = size
