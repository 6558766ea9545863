"""The prepare/apply driver: chunks read and planned ahead on a pool, stored in guest order.

A target's chunks are prepared (read, classified, compressed) on a small
thread pool, a few ahead; the main thread applies them strictly in guest
order (host allocation, L2 entries, the writes) while each chunk is still in
the CPU cache. pread/pwrite, zlib and zstandard all release the GIL. Each
chunk owns a slot (its buffers); a slot is reused only once its chunk was
applied, so memory stays at (slots x chunk size) whatever the image size.

Test hook: ``FLATFS_CONVERT_TEST_DELAY=SECONDS`` sleeps that long after each
chunk, so tests can interrupt a conversion midway.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..readers import Chunk

if TYPE_CHECKING:
    from .options import Summary
    from .progress import Progress
    from .targets import Target

TEST_DELAY_ENV = "FLATFS_CONVERT_TEST_DELAY"


class Slot:
    """The buffers of one chunk in flight: the source's bytes, and the backing's."""

    __slots__ = ("buf", "bbuf")

    def __init__(self) -> None:
        self.buf: bytearray | None = None
        self.bbuf: bytearray | None = None


def run(target: Target[Any], summary: Summary, progress: Progress | None) -> None:
    """Drive every chunk of ``target`` through prepare (pool, any order) and apply (in order)."""
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    depth = 2 * target.readers
    free = deque(Slot() for _ in range(depth))
    ahead: deque[tuple[Chunk, Slot, Future[Any]]] = deque()
    pool = ThreadPoolExecutor(target.readers, thread_name_prefix="flatfs-read")
    chunks = target.chunks()
    more = True
    try:
        while True:
            while more and len(ahead) < depth and free:
                chunk = next(chunks, None)
                if chunk is None:
                    more = False
                    break
                slot = free.popleft()
                ahead.append((chunk, slot, pool.submit(target.prepare, chunk, slot)))
            if not ahead:
                break
            chunk, slot, fut = ahead.popleft()
            target.apply(chunk, slot, fut.result())
            free.append(slot)
            done = chunk.data_bytes
            summary.data_read += done
            if progress is not None:
                progress.add(done)
            if delay:
                time.sleep(delay)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
