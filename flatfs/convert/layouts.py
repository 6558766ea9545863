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
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from ..chain import Chain
from ..errors import ConvertError, ImageIOError
from ..formats.api import FileSink, ImageWriter
from ..readers import Chunk
from .options import DEFAULT_SPARSE_SIZE, Summary
from .pipeline import Slot
from .plan import BlockPlanner, Segment
from .safety import create_temp, place, refuse_chain_member
from .targets import CHUNK_BYTES, READERS, WritebackIO, guest_chunks, read_and_plan


class CountingSink:
    """A sink that counts what it writes: the summary's ``bytes-written`` (its companions' too)."""

    def __init__(self, io: WritebackIO, companions: Companions | None = None) -> None:
        self.io = io
        self.written = 0
        self.companions = companions

    def write(self, bufs: list[memoryview], offset: int) -> None:
        self.written += sum(len(b) for b in bufs)
        self.io.write(bufs, offset)

    def companion(self, name: str, size: int) -> CountingSink:
        if self.companions is None:
            raise ConvertError(f"{self.io.path}: this target cannot make a second file ({name})")
        fd, path = self.companions.create(name, size)
        sink = _Shared(WritebackIO(fd, path), self)
        return sink


class _Shared(CountingSink):
    """A companion's sink: its bytes counted with TARGET's."""

    def __init__(self, io: WritebackIO, main: CountingSink) -> None:
        super().__init__(io)
        self.main = main

    def write(self, bufs: list[memoryview], offset: int) -> None:
        self.main.written += sum(len(b) for b in bufs)
        self.io.write(bufs, offset)


class Companions:
    """Files that go with TARGET (a VMDK's flat extent): each a locked temporary file next to it,
    made durable and renamed into place (never replacing one without ``--force``) just before
    TARGET's own rename; all removed if TARGET does not appear."""

    def __init__(self, target: str, dest: str, replace: bool, chains: Sequence[Chain] = ()) -> None:
        self.target = target
        self.chains = chains
        self.folder = os.path.dirname(dest)
        self.replace = replace
        self.made: list[tuple[str, int, str]] = []  # (temporary path, fd, final path)
        self.placed: list[str] = []

    def create(self, name: str, size: int) -> tuple[int, str]:
        if os.sep in name or name in ("", ".", ".."):
            raise ConvertError(f"{self.target}: a companion file must be a bare name, not {name!r}")
        final = os.path.join(self.folder, name)
        try:
            st: os.stat_result | None = os.stat(final)
        except OSError:
            st = None
        refuse_chain_member(final, st, os.path.realpath(final), self.chains)
        if not self.replace and os.path.lexists(final):
            raise ConvertError(f"{final}: already exists (use --force to overwrite)")
        tmp, fd = create_temp(final, final)
        self.made.append((tmp, fd, final))
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise ImageIOError.from_oserror(final, exc) from None
        return fd, tmp

    def commit(self) -> None:
        """Durable, then in place: called once TARGET itself is durable, before its rename."""
        for tmp, fd, final in self.made:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise ImageIOError.from_oserror(final, exc) from None
            place(tmp, final, final, self.replace)
            self.placed.append(final)

    def close(self, ok: bool) -> None:
        """Close the files; unless TARGET appeared (``ok``), remove every one of them."""
        for tmp, fd, final in self.made:
            try:
                os.close(fd)
            except OSError:
                pass
            if not ok:
                for path in (tmp, final) if final in self.placed else (tmp,):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        self.made = []


class Prepared(NamedTuple):
    writes: list[Segment]  # (buffer offset, length)
    zero_skipped: int  # -S runs of zeros not written


class LayoutTarget:
    """Drives one format's :class:`ImageWriter` from the pipeline."""

    def __init__(
        self,
        source: Chain,
        open_writer: Callable[[FileSink], ImageWriter],
        fd: int,
        path: str,
        sparse_size: int,
        summary: Summary,
        companions: Companions | None = None,
    ) -> None:
        self.planner = BlockPlanner(sparse_size, DEFAULT_SPARSE_SIZE)
        gran = self.planner.gran
        self.chunk_bytes = max(gran, CHUNK_BYTES - CHUNK_BYTES % gran)
        self.zeros = bytes(self.chunk_bytes)
        self.readers = READERS
        self.source = source
        self.fd = fd
        self.path = path
        self.companions = companions
        self.sink = CountingSink(WritebackIO(fd, path), companions)
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
        if self.companions is not None:
            self.companions.commit()
