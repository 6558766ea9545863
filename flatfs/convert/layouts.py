"""The target of every format written by its own writer (``-O vpc``...), over a sink.

The format's writer (``Format.writer``, in ``formats/<fmt>/writer.py``)
decides the layout; this target only feeds it the source's data, in guest
order, and knows nothing of the layout. The data is cut, read and
classified exactly as for a raw target (one reader thread, 2 MiB chunks,
zero blocks of ``-S`` found by their heads: :class:`BlockPlanner`): what is
not data, or is a run of zeros, is never handed to the writer, so it stays
unallocated in the image.

The sink is where the bytes land: here the new temporary file, through the
same :class:`WritebackIO` as the other targets; it counts every byte
written (data and metadata), so the summary's ``bytes-written`` is counted
in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ..chain import Chain
from ..errors import ImageIOError
from ..formats.api import ImageWriter, Sink
from ..readers import Chunk
from .options import DEFAULT_SPARSE_SIZE, Summary
from .pipeline import Slot
from .plan import BlockPlanner, Segment
from .targets import CHUNK_BYTES, READERS, WritebackIO, guest_chunks, read_and_plan


class CountingSink:
    """A sink that counts what it writes: the summary's ``bytes-written``."""

    def __init__(self, io: WritebackIO) -> None:
        self.io = io
        self.written = 0

    def write(self, bufs: list[memoryview], offset: int) -> None:
        self.written += sum(len(b) for b in bufs)
        self.io.write(bufs, offset)


class Prepared(NamedTuple):
    writes: list[Segment]  # (buffer offset, length)
    zero_skipped: int  # -S runs of zeros not written


class LayoutTarget:
    """Drives one format's :class:`ImageWriter` from the pipeline."""

    def __init__(
        self,
        source: Chain,
        open_writer: Callable[[Sink], ImageWriter],
        fd: int,
        path: str,
        sparse_size: int,
        summary: Summary,
    ) -> None:
        self.planner = BlockPlanner(sparse_size, DEFAULT_SPARSE_SIZE)
        gran = self.planner.gran
        self.chunk_bytes = max(gran, CHUNK_BYTES - CHUNK_BYTES % gran)
        self.zeros = bytes(self.chunk_bytes)
        self.readers = READERS
        self.source = source
        self.fd = fd
        self.path = path
        self.sink = CountingSink(WritebackIO(fd, path))
        self.writer = open_writer(self.sink)
        summary.granularity = sparse_size
        self.summary = summary

    def chunks(self) -> Iterator[Chunk]:
        return guest_chunks(self.source, self.planner, self.chunk_bytes)

    def prepare(self, chunk: Chunk, slot: Slot) -> Prepared:
        return Prepared(*read_and_plan(self.source, self.planner, chunk, slot, self.chunk_bytes, self.zeros))

    def apply(self, chunk: Chunk, slot: Slot, prepared: Prepared) -> None:
        writes, skipped = prepared
        self.summary.zero_clusters_skipped += skipped
        if writes:
            assert slot.buf is not None
            mv = memoryview(slot.buf)
            a = chunk.start
            for off, n in writes:
                self.writer.write_data(a + off, mv[off : off + n])

    def finish(self) -> None:
        size = self.writer.finish()
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None
        self.summary.file_size = size
        self.summary.bytes_written = self.sink.written
