"""The prepare/apply driver: chunks read and planned ahead, handed to the writer in guest order.

A :class:`Feed` is how the source's data reaches a writer (the feeds are in
:mod:`.feeds`): its chunks are prepared (read, classified, compressed) by
``feed.readers`` worker threads, a few chunks ahead; the main thread
applies them strictly in guest order (host allocation, L2 entries, the
writes). pread/pwrite, zlib and zstandard all release the GIL. Each chunk
owns a slot (its buffers); a slot is reused only once its chunk was applied,
so memory stays at (slots x chunk size) whatever the image size.

The hand-offs are two C-level queue operations per chunk and no more: a
worker takes (chunk, slot) from one shared queue and puts its result into
that slot's own queue, which the main thread waits on in guest order. With
``readers == 0`` everything runs on the main thread, with no hand-off at all.
(measured on tmpfs, 2 cores: a thread pool's futures cost about 16 futex
calls per chunk; see docs/bench.md.)

Test hook: ``FLATFS_CONVERT_TEST_DELAY=SECONDS`` sleeps that long after each
chunk, so tests can interrupt a conversion midway.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from ..readers import Chunk

if TYPE_CHECKING:
    from .progress import Progress

TEST_DELAY_ENV = "FLATFS_CONVERT_TEST_DELAY"
SLOTS_PER_READER = 2  # chunks in flight per worker (at least 3 in all)


class Slot:
    """The buffers of one chunk in flight (the source's bytes, the backing's) and its result."""

    __slots__ = ("buf", "bbuf", "done")

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.bbuf: bytearray | None = None
        self.done: SimpleQueue[tuple[bool, Any]] = SimpleQueue()


P = TypeVar("P")


class Figures(NamedTuple):
    """What a feed and its writer did, for the summary (filled in one place: ``convert.tally``)."""

    file_size: int
    granularity: int  # the size of a skipped granule (a cluster, or -S)
    zero_skipped: int = 0  # granules of data that were all zeros, not handed to the writer
    same_as_backing: int = 0  # clusters equal to the backing, not stored
    data_clusters: int = 0  # qcow2's own figures
    compressed_clusters: int = 0
    zero_clusters: int = 0


class Feed(Protocol[P]):
    """How the source's data reaches one writer: cut into chunks, prepared on any thread, applied
    (handed to the writer) on the main thread in guest order. It knows nothing of the sink.

    More writer threads would only contend on the target's inode lock, so
    every write is made by the main thread, in :meth:`apply`.
    """

    readers: int

    def chunks(self) -> Iterator[Chunk]:
        """The source's data, cut into aligned chunks, in guest order."""
        ...

    def prepare(self, chunk: Chunk, slot: Slot) -> P:
        """Read ``chunk`` into ``slot`` and decide what to store (any thread)."""
        ...

    def apply(self, chunk: Chunk, slot: Slot, prepared: P) -> None:
        """Hand what :meth:`prepare` decided to the writer (main thread, guest order)."""
        ...

    def finish(self) -> Figures:
        """Let the writer complete its layout; what was done."""
        ...


_STOP = None


def _worker(feed: Feed[Any], tasks: SimpleQueue[tuple[Chunk, Slot] | None]) -> None:
    while True:
        item = tasks.get()
        if item is _STOP:
            return
        chunk, slot = item
        try:
            slot.done.put((True, feed.prepare(chunk, slot)))
        except BaseException as exc:  # handed to the main thread, raised there
            slot.done.put((False, exc))


def run(feed: Feed[Any], progress: Progress | None) -> int:
    """Drive every chunk of ``feed`` through prepare (workers) and apply (in order).

    Returns the bytes of data the chunks held (read, or with copy offload passed by reference).
    """
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    handed = 0
    if feed.readers <= 0:
        slot = Slot()
        for chunk in feed.chunks():
            feed.apply(chunk, slot, feed.prepare(chunk, slot))
            handed += _account(chunk, progress, delay)
        return handed
    depth = max(3, SLOTS_PER_READER * feed.readers)
    free = deque(Slot() for _ in range(depth))
    ahead: deque[tuple[Chunk, Slot]] = deque()
    tasks: SimpleQueue[tuple[Chunk, Slot] | None] = SimpleQueue()
    workers = [
        threading.Thread(target=_worker, args=(feed, tasks), name=f"flatfs-read-{i}", daemon=True)
        for i in range(feed.readers)
    ]
    for w in workers:
        w.start()
    chunks = feed.chunks()
    more = True
    try:
        while True:
            while more and free:
                nxt = next(chunks, None)
                if nxt is None:
                    more = False
                    break
                slot = free.popleft()
                ahead.append((nxt, slot))
                tasks.put((nxt, slot))
            if not ahead:
                break
            chunk, slot = ahead.popleft()
            ok, result = slot.done.get()
            if not ok:
                raise result
            feed.apply(chunk, slot, result)
            free.append(slot)
            handed += _account(chunk, progress, delay)
    finally:
        for _ in workers:
            tasks.put(_STOP)
        for w in workers:
            w.join()
    return handed


def _account(chunk: Chunk, progress: Progress | None, delay: float) -> int:
    done = chunk.data_bytes
    if progress is not None:
        progress.add(done)
    if delay:
        time.sleep(delay)
    return done
