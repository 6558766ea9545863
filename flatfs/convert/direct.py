"""Writing a new file's data past the page cache: gathered, aligned, written by a thread.

``convert -t none`` (qemu-img's spelling): a converted image is not read
back by the process that writes it, so its data need not evict what the
machine has cached. Not the default: on the bench's VM it won by far one
hour and lost the next (docs/design.md, "Writing past the page cache";
docs/bench.md, the writers runs of 2026-12-07).

:class:`DirectWriter` takes the writes a sink receives, in the order a writer
makes them. Writes that continue one another are gathered in page-aligned
buffers of :data:`STAGE_BYTES`; each full buffer's aligned part is written by
writer threads (two in flight) with ``O_DIRECT`` on a second descriptor of
the file while the caller goes on (so reading, applying and writing overlap). What cannot be
aligned goes through the page cache on the first descriptor: the bytes before
a run's first aligned offset, a run's unaligned tail, and small writes that
continue nothing (tables, headers, bitmaps). The kernel keeps the two paths
coherent page by page; what it cannot order is two writes of one page while
one of them is a direct write still in flight, so a write (direct or cached)
of a page that a direct write in flight covers waits for it first. A file
system that refuses direct writes (EINVAL) gets everything through the page
cache from then on.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections import deque
from queue import SimpleQueue

from ..errors import ImageIOError
from ..hostio import pwritev_all

STAGE_BYTES = 4 << 20  # one gathering buffer, and the largest direct write
STAGES = 4  # buffers: one being gathered, the others in flight or free (16 MiB in all)
WRITERS = 2  # direct writes in flight at once (a disk takes two at a time faster than one)
ALIGN = 4096  # a multiple of every logical block size in use
DIRECT_MIN = 64 << 10  # a write that continues nothing and is smaller: through the page cache
O_DIRECT = getattr(os, "O_DIRECT", 0)

_Job = tuple[int, int, int]  # (stage index, file offset, length)


class DirectWriter:
    """See the module docstring. Used from one thread (the sink's), plus its own writer threads."""

    def __init__(self, fd: int, dfd: int, path: str) -> None:
        self.fd = fd  # the file's own descriptor: the page cache path
        self.dfd = dfd  # O_DIRECT
        self.path = path
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._free: deque[int] = deque()
        self._cv = threading.Condition()
        self._inflight: dict[int, tuple[int, int]] = {}  # stage -> (start, end) being written
        self._error: BaseException | None = None
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._no_threads = False  # starting a thread failed: no more tries
        self.refused = False  # the file system refused a direct write: no more gathering
        self.cur = -1  # the stage being gathered, -1: none
        self.start = 0  # its file offset (aligned)
        self.used = 0

    @classmethod
    def open(cls, fd: int, path: str) -> DirectWriter | None:
        """A direct writer for the open file ``fd``, or None where there is no direct I/O."""
        if not O_DIRECT:
            return None
        try:
            dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return None  # no /proc, or no O_DIRECT on this file system
        return cls(fd, dfd, path)

    # -- the caller's side ---------------------------------------------------------------

    def take(self, bufs: list[memoryview], offset: int) -> bool:
        """Gather ``bufs`` (to be written at ``offset``); False: the caller writes them through the
        page cache itself, after :meth:`before_cached_write`."""
        if self.refused:
            return False
        views = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in bufs]
        pos = offset  # the file offset of the next byte to gather
        if self.cur < 0 or offset != self.start + self.used:  # not a continuation
            if sum(len(b) for b in views) < DIRECT_MIN:
                return False
            self.send()
            stage = self._stage()
            if stage < 0:  # no memory for even one buffer: the page cache, from now on
                self.refused = True
                return False
            head = -offset % ALIGN  # up to the first aligned offset: through the page cache
            if head:
                first, views = _split(views, head)
                self._cached(first, offset)
                pos += head
            self.cur, self.start, self.used = stage, pos, 0
        buf = self._views[self.cur]
        for b in views:
            while len(b):
                if self.used == STAGE_BYTES:
                    self._submit(keep_tail=True)
                    buf = self._views[self.cur]
                k = min(STAGE_BYTES - self.used, len(b))
                buf[self.used : self.used + k] = b[:k]
                self.used += k
                b = b[k:]
        return True

    def before_cached_write(self, offset: int, length: int) -> None:
        """A write of [offset, offset + length) is about to go through the page cache: send what is
        gathered if it shares a page with it, and wait for direct writes in flight that do."""
        lo = offset - offset % ALIGN
        if self.cur >= 0 and lo < self.start + self.used and self.start < offset + length:
            self.send()
        self._wait_clear(offset, offset + length)

    def send(self) -> None:
        """Write what is gathered (its aligned part directly, in the background)."""
        if self.cur >= 0:
            self._submit(keep_tail=False)

    def flush(self) -> None:
        """Everything taken is written (direct writes complete, not yet durable)."""
        self.send()
        with self._cv:
            while self._inflight:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        """Stop the writer thread (after what it holds) and release the buffers."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        # dropped, not closed: after a failure, a traceback may still hold views of them
        self._views, self._maps = [], []
        try:
            os.close(self.dfd)
        except OSError:
            pass

    # -- internals -----------------------------------------------------------------------

    def _stage(self) -> int:
        """A free stage (made on first need, up to :data:`STAGES`; then waited for); -1 where not
        even one could be made (no memory: the caller goes through the page cache)."""
        with self._cv:
            while not self._free:
                self._raise()
                if len(self._maps) < STAGES:
                    try:
                        m = mmap.mmap(-1, STAGE_BYTES)
                    except OSError:
                        if not self._maps:
                            return -1
                    else:
                        self._maps.append(m)
                        self._views.append(memoryview(m))
                        return len(self._maps) - 1
                if not self._inflight:  # nothing will come back: every stage is ours already
                    raise AssertionError("direct writer: no free stage and none in flight")
                self._cv.wait()
            self._raise()
            return self._free.popleft()

    def _submit(self, keep_tail: bool) -> None:
        """Hand the aligned part of the current stage to the writer threads; its unaligned tail is
        carried into a new stage (``keep_tail``: more will continue it) or written through the
        page cache (it shares no page with the aligned part)."""
        cur, start, used = self.cur, self.start, self.used
        aligned = used - used % ALIGN
        tail = bytes(self._views[cur][aligned:used])  # less than a page
        self.cur = -1
        if aligned:
            self._wait_clear(start, start + aligned)  # an older write of the same pages goes first
            with self._cv:
                self._inflight[cur] = (start, start + aligned)
            self._start_threads()
            if self._threads:
                self._jobs.put((cur, start, aligned))
            else:  # no thread could start (no memory for its stack): write it now
                self._job(cur, start, aligned)
        else:
            with self._cv:
                self._free.append(cur)
        if keep_tail:
            nxt = self._stage()  # never -1: at least one stage exists
            self._views[nxt][: len(tail)] = tail
            self.cur, self.start, self.used = nxt, start + aligned, len(tail)
        elif tail:
            self._cached([memoryview(tail)], start + aligned)

    def _cached(self, views: list[memoryview], offset: int) -> None:
        self._wait_clear(offset, offset + sum(len(v) for v in views))
        pwritev_all(self.fd, views, offset, self.path)

    def _wait_clear(self, start: int, end: int) -> None:
        """Wait until no direct write in flight shares a page with [start, end)."""
        lo = start - start % ALIGN
        with self._cv:
            while any(s < end and lo < e for s, e in self._inflight.values()):
                self._cv.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _start_threads(self) -> None:
        while len(self._threads) < WRITERS and not self._no_threads:
            t = threading.Thread(target=self._run, name=f"flatfs-direct-{len(self._threads)}", daemon=True)
            try:
                t.start()
            except RuntimeError:  # can't start new thread: the ones there are will do
                self._no_threads = True
                return
            self._threads.append(t)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._job(*job)

    def _job(self, stage: int, start: int, n: int) -> None:
        try:
            if self._error is None:
                self._write(self._views[stage][:n], start)
        except BaseException as exc:  # raised in the caller's thread
            self._error = exc
        with self._cv:
            del self._inflight[stage]
            self._free.append(stage)
            self._cv.notify_all()

    def _write(self, mv: memoryview, offset: int) -> None:
        done = 0
        while done < len(mv) and not self.refused:
            try:
                k = os.pwrite(self.dfd, mv[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise ImageIOError.from_oserror(self.path, exc, offset + done) from None
                self.refused = True  # this file system takes no direct writes after all
                break
            if k <= 0:
                raise ImageIOError(self.path, "write made no progress", offset + done)
            done += k
        if done < len(mv):
            pwritev_all(self.fd, [mv[done:]], offset + done, self.path)


def _split(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """``views`` cut after ``n`` bytes: (the first n bytes, the rest)."""
    first: list[memoryview] = []
    for i, v in enumerate(views):
        if n < len(v):
            return first + [v[:n]], [v[n:], *views[i + 1 :]]
        first.append(v)
        n -= len(v)
    return first, []
