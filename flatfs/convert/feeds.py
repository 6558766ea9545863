"""How the source's data reaches a writer: the feeds the pipeline drives, and the choice of one.

A feed reads (or, with copy offload, maps) the source's data chunks and
hands them to a writer in guest order; the writer (a format's, found in
FORMATS) decides the layout and writes it into a sink it was given, which
decides where the bytes land. A feed knows neither the layout nor the sink.

* :class:`BytesFeed`: the data read in 2 MiB chunks by one reader thread,
  the zero blocks of ``-S`` found by their heads (:class:`BlockPlanner`) and
  never handed over; every format's writer but qcow2's takes it.
* :class:`ClusterFeed`: qcow2's cluster operations (zero clusters, the
  backing compared, subclusters, compression on one thread per CPU).
* :class:`CopyFeed`: copy offload (``-C``, or ``-S 0`` from a plain raw
  file to raw): where each run lies on the host, copied by the sink in the
  kernel; nothing is read but what the chain cannot map.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NamedTuple

from .. import formats
from ..chain import Chain
from ..errors import ConvertError
from ..formats.api import (
    ClusterWriter,
    ClusterWriterClass,
    CopyRun,
    CopyWriter,
    FileSink,
    HostFile,
    ImageWriter,
)
from ..readers import Chunk, data_chunks, fill
from .archive import SparseTarGzWriter
from .compress import compress_clusters
from .options import DEFAULT_SPARSE_SIZE, ConvertOptions, writer_values
from .pipeline import Feed, Figures, Slot
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
MAX_COMPRESS_THREADS = 8


def open_feed(
    source: Chain, backing: Chain | None, options: ConvertOptions, sink: FileSink, target: str, size: int
) -> Feed[Any]:
    """The writer ``options`` ask for, over ``sink``, and the feed that hands it the data.

    ``size`` is the target's virtual size (the source's, rounded up as ``--for`` asks).
    """
    fmt = formats.lookup(options.target_format)
    if fmt is None:
        raise ConvertError(f"-O {options.target_format}: not a format flatfs writes")
    if options.package == "tar.gz":
        runs = [(e.start, e.start + e.length) for e in source.extents() if e.kind.must_read]
        return BytesFeed(source, SparseTarGzWriter(sink, size, runs), options.sparse_size)
    if fmt.target is not None:
        cls = fmt.target()
        w = _qcow2(cls, source, backing, options, sink, target)
        if options.copy_offload:
            return ClusterCopyFeed(source, w)
        return ClusterFeed(source, backing, w, cls, options)
    if fmt.writer is None:
        raise ConvertError(f"-O {options.target_format}: not a format flatfs writes")
    tw = fmt.writer()
    values = writer_values(options.target_format, tw, options.target_options)
    # -S 0 from a plain raw file: there is nothing to look at, so let the kernel copy
    plain = options.sparse_size == 0 and source.format == "raw" and len(source.layers) == 1
    if tw.copy is not None and (options.copy_offload or plain):
        gran = BlockPlanner(options.sparse_size, DEFAULT_SPARSE_SIZE).gran
        return CopyFeed(source, tw.copy(sink, size, values, target), gran, size, options.sparse_size)
    return BytesFeed(source, tw.open(sink, size, values, target), options.sparse_size)


def _qcow2(
    cls: ClusterWriterClass,
    source: Chain,
    backing: Chain | None,
    options: ConvertOptions,
    sink: FileSink,
    target: str,
) -> ClusterWriter:
    bfmt = None
    if options.backing:
        assert backing is not None
        bfmt = options.backing_format or backing.layers[0].format
    return cls(
        sink,
        -(-source.size // 512) * 512,
        path=target,
        cluster_size=options.cluster_size or cls.DEFAULT_CLUSTER_SIZE,
        version=2 if options.compat == "0.10" else 3,
        backing_file=options.backing,
        backing_format=bfmt,
        extended_l2=options.extended_l2,
        compression_type=options.compression_type or "zlib",
    )


# -- bytes ---------------------------------------------------------------------------


class Planned(NamedTuple):
    writes: list[Segment]  # (buffer offset, length)
    zero_skipped: int  # -S runs of zeros not written


class BytesFeed:
    """The source's data as bytes, in guest order, runs of zeros left out: any :class:`ImageWriter`."""

    def __init__(self, source: Chain, writer: ImageWriter, sparse_size: int) -> None:
        self.planner = BlockPlanner(sparse_size, DEFAULT_SPARSE_SIZE)
        gran = self.planner.gran
        self.chunk_bytes = max(gran, CHUNK_BYTES - CHUNK_BYTES % gran)
        self.zeros = bytes(self.chunk_bytes)
        self.readers = READERS
        self.source = source
        self.writer = writer
        self.granularity = sparse_size
        self.zero_skipped = 0

    def chunks(self) -> Iterator[Chunk]:
        size = self.source.size
        return data_chunks([(self.source, size)], self.planner.gran, self.chunk_bytes, size)

    def prepare(self, chunk: Chunk, slot: Slot) -> Planned:
        a, b, (pieces,) = chunk
        n = b - a
        if slot.buf is None:
            slot.buf = bytearray(self.chunk_bytes)
        buf = slot.buf
        fill(self.source, memoryview(buf)[:n], a, pieces, self.zeros)
        return Planned(*self.planner.plan(a, n, buf, pieces))

    def apply(self, chunk: Chunk, slot: Slot, prepared: Planned) -> None:
        writes, skipped = prepared
        self.zero_skipped += skipped
        if writes:
            assert slot.buf is not None
            mv = memoryview(slot.buf)
            a = chunk.start
            write = self.writer.write_data
            for off, n in writes:
                write(a + off, mv[off : off + n])

    def finish(self) -> Figures:
        return Figures(self.writer.finish(), self.granularity, self.zero_skipped)


# -- copy offload --------------------------------------------------------------------


class CopyFeed:
    """The source's data by reference: where each run lies on the host (the runs the chain cannot
    map, such as compressed clusters, read into the chunk's buffer); no zero detection, as
    qemu-img -C. Everything runs on the main thread: there is nothing to read ahead."""

    readers = 0

    def __init__(self, source: Chain, writer: CopyWriter, granule: int, size: int, granularity: int) -> None:
        self.source = source
        self.writer = writer
        self.granule = granule
        self.size = size
        self.chunk_bytes = max(granule, COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % granule)
        self.files: dict[int, HostFile] = {f.fd: f for f in source.host_files()}
        self.granularity = granularity

    def chunks(self) -> Iterator[Chunk]:
        return data_chunks([(self.source, self.size)], self.granule, self.chunk_bytes, self.size)

    def prepare(self, chunk: Chunk, slot: Slot) -> list[CopyRun]:
        a = chunk.start
        out: list[CopyRun] = []
        chain = self.source
        for s, n, d in chunk.pieces[0]:
            for g, ln, fd, h in chain.host_data(d, s, n):
                if fd >= 0:
                    out.append(CopyRun(g - a, ln, self.files[fd], h))
                    continue
                if slot.buf is None:
                    slot.buf = bytearray(self.chunk_bytes)
                chain.read_data(d, g, memoryview(slot.buf)[g - a : g - a + ln])
                out.append(CopyRun(g - a, ln, None, 0))
        return out

    def apply(self, chunk: Chunk, slot: Slot, prepared: list[CopyRun]) -> None:
        buf = memoryview(slot.buf) if slot.buf is not None else None
        self.writer.copy_data(chunk.start, chunk.end - chunk.start, prepared, buf)

    def finish(self) -> Figures:
        return Figures(self.writer.finish(), self.granularity)


class ClusterCopyFeed(CopyFeed):
    """qcow2 with copy offload: whole data clusters, chunks cut at clusters, and qcow2's figures."""

    def __init__(self, source: Chain, writer: ClusterWriter) -> None:
        super().__init__(source, writer, writer.cs, writer.size, writer.cs)
        self.clusters = writer

    def finish(self) -> Figures:
        w = self.clusters
        return (
            super()
            .finish()
            ._replace(
                data_clusters=w.data_clusters,
                compressed_clusters=w.compressed_clusters,
                zero_clusters=w.zero_clusters,
            )
        )


# -- qcow2 ---------------------------------------------------------------------------


class ClusterOps(NamedTuple):
    ops: list[Op]
    compressed: list[bytes | None] | None  # per cluster of the data ops, when compressing
    zero_skipped: int
    same_as_backing: int


class ClusterFeed:
    """qcow2: each chunk planned into data, zero and compressed clusters, over a backing or not."""

    def __init__(
        self,
        source: Chain,
        backing: Chain | None,
        writer: ClusterWriter,
        cls: ClusterWriterClass,
        options: ConvertOptions,
    ) -> None:
        self.writer = writer
        cs = self.cs = writer.cs
        self.ctype = options.compression_type or "zlib"
        self.compress = options.compress
        self.readers = READERS
        if self.compress:
            self.readers = max(2, min(options.threads or os.cpu_count() or 1, MAX_COMPRESS_THREADS))
        chunk = max(cs, COMPRESS_CHUNK_BYTES if self.compress else CHUNK_BYTES)
        self.chunk_bytes = chunk - chunk % cs
        self.zeros = bytes(self.chunk_bytes)
        self.source = source
        self.backing = backing
        self.size = writer.size
        self.planner = ClusterPlanner(
            cs,
            options.sparse_size,
            backing is not None,
            writer.extended_l2,
            cls.SUBCLUSTERS,
            cls.ALL_ALLOCATED,
        )
        self.zero_skipped = 0
        self.same_as_backing = 0

    def chunks(self) -> Iterator[Chunk]:
        sides = [(self.source, self.size)]
        if self.backing is not None:
            sides.append((self.backing, min(self.backing.size, self.size)))
        return data_chunks(sides, self.cs, self.chunk_bytes, self.size)

    def prepare(self, chunk: Chunk, slot: Slot) -> ClusterOps:
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
        return ClusterOps(plan.ops, compressed, plan.zero_skipped, plan.same_as_backing)

    def apply(self, chunk: Chunk, slot: Slot, prepared: ClusterOps) -> None:
        ops, compressed, zskip, same = prepared
        self.zero_skipped += zskip
        self.same_as_backing += same
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

    def finish(self) -> Figures:
        w = self.writer
        size = w.finish()
        return Figures(
            size,
            self.cs,
            self.zero_skipped,
            self.same_as_backing,
            w.data_clusters,
            w.compressed_clusters,
            w.zero_clusters,
        )
