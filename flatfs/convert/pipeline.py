"""The prepare/apply driver: chunks read and planned ahead, stored in guest order.

A target's chunks are prepared (read, classified, compressed) by
``target.readers`` worker threads, a few chunks ahead; the main thread
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
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from ..readers import Chunk

if TYPE_CHECKING:
    from .options import Summary
    from .progress import Progress
    from .targets import Target

TEST_DELAY_ENV = "FLATFS_CONVERT_TEST_DELAY"
SLOTS_PER_READER = 2  # chunks in flight per worker (at least 3 in all)


class Slot:
    """The buffers of one chunk in flight (the source's bytes, the backing's) and its result."""

    __slots__ = ("buf", "bbuf", "done")

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.bbuf: bytearray | None = None
        self.done: SimpleQueue[tuple[bool, Any]] = SimpleQueue()


_STOP = None


def _worker(target: Target[Any], tasks: SimpleQueue[tuple[Chunk, Slot] | None]) -> None:
    while True:
        item = tasks.get()
        if item is _STOP:
            return
        chunk, slot = item
        try:
            slot.done.put((True, target.prepare(chunk, slot)))
        except BaseException as exc:  # handed to the main thread, raised there
            slot.done.put((False, exc))


def run(target: Target[Any], summary: Summary, progress: Progress | None) -> None:
    """Drive every chunk of ``target`` through prepare (workers) and apply (in order)."""
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if target.readers <= 0:
        slot = Slot()
        for chunk in target.chunks():
            target.apply(chunk, slot, target.prepare(chunk, slot))
            _account(chunk, summary, progress, delay)
        return
    depth = max(3, SLOTS_PER_READER * target.readers)
    free = deque(Slot() for _ in range(depth))
    ahead: deque[tuple[Chunk, Slot]] = deque()
    tasks: SimpleQueue[tuple[Chunk, Slot] | None] = SimpleQueue()
    workers = [
        threading.Thread(target=_worker, args=(target, tasks), name=f"flatfs-read-{i}", daemon=True)
        for i in range(target.readers)
    ]
    for w in workers:
        w.start()
    chunks = target.chunks()
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
            target.apply(chunk, slot, result)
            free.append(slot)
            _account(chunk, summary, progress, delay)
    finally:
        for _ in workers:
            tasks.put(_STOP)
        for w in workers:
            w.join()


def _account(chunk: Chunk, summary: Summary, progress: Progress | None, delay: float) -> None:
    done = chunk.data_bytes
    summary.data_read += done
    if progress is not None:
        progress.add(done)
    if delay:
        time.sleep(delay)
