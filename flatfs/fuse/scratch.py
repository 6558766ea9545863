"""A throwaway writable layer over the chain (``mount --writable``): no FUSE code here.

Writes land in a sparse scratch file, never in the chain: the chain's files
stay opened read-only. The scratch file lives in ``--scratch-dir`` (default
``$TMPDIR``) and has no name from the start (``O_TMPFILE``; where a file
system lacks it, a named file unlinked at once), so nothing is left behind,
even after ``kill -9``. A guest offset is the same offset in the scratch file.

What was written is kept in memory as a sorted map of runs, each either DATA
(the bytes are in the scratch file) or ZERO (written zeros, a discard, a
zeroed range: reads as zeros and is not data): its size grows with the number
of written runs, never with the disk. Reads compose the map over the chain;
SEEK_DATA/SEEK_HOLE answer for the composition.

Consistency: the map changes only once a write is complete, and a write
that overwrites some of our data while filling new ground reserves the new
ground first (``posix_fallocate``), so a full scratch file system fails the
write with ENOSPC before any acknowledged byte changes: what reads back is
what was acknowledged. Mutations are
serialised; reads take a copy of the map's runs under the lock and read
outside it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import threading
from bisect import bisect_left, bisect_right
from typing import Any

from ..chain import SEEK_DATA
from ..chain.dataindex import check_seek
from ..errors import MountError
from .view import Disk

DATA, ZERO = 1, 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def open_scratch(folder: str | None, size: int) -> int:
    """A nameless sparse file of ``size`` bytes in ``folder`` (``$TMPDIR`` when None)."""
    folder = folder or tempfile.gettempdir()
    try:
        fd = os.open(folder, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise MountError(f"{folder}: cannot make a scratch file there: {exc.strerror}") from None
        try:
            fd, name = tempfile.mkstemp(prefix=".flatfs-scratch-", dir=folder)
            os.unlink(name)
        except OSError as exc2:
            raise MountError(f"{folder}: cannot make a scratch file there: {exc2.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise MountError(f"{folder}: cannot size a scratch file of {size} bytes: {exc.strerror}") from None
    return fd


class Runs:
    """Disjoint sorted runs [start, end) with a kind each; neighbours of one kind merged."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.kinds: list[int] = []

    def __len__(self) -> int:
        return len(self.starts)

    def set(self, start: int, end: int, kind: int) -> None:
        """[start, end) becomes ``kind``, whatever it was."""
        if start >= end:
            return
        s, e, k = self.starts, self.ends, self.kinds
        i = bisect_right(e, start)  # first run that ends after start
        j = bisect_left(s, end)  # first run that starts at or after end
        new_s, new_e, new_k = [], [], []
        if i < j and s[i] < start:
            new_s.append(s[i])
            new_e.append(start)
            new_k.append(k[i])
        new_s.append(start)
        new_e.append(end)
        new_k.append(kind)
        if i < j and e[j - 1] > end:
            new_s.append(end)
            new_e.append(e[j - 1])
            new_k.append(k[j - 1])
        # merge with the neighbours outside [i, j) when of the same kind and touching
        if i > 0 and e[i - 1] == new_s[0] and k[i - 1] == new_k[0]:
            i -= 1
            new_s[0] = s[i]
        if j < len(s) and s[j] == new_e[-1] and k[j] == new_k[-1]:
            new_e[-1] = e[j]
            j += 1
        s[i:j], e[i:j], k[i:j] = new_s, new_e, new_k

    def covering(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(start, end, kind) of the runs overlapping [start, end), clipped to it."""
        i = bisect_right(self.ends, start)
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            out.append((max(self.starts[i], start), min(self.ends[i], end), self.kinds[i]))
            i += 1
        return out

    def at_or_after(self, pos: int) -> tuple[int, int, int] | None:
        """The run holding ``pos``, or the first one after it."""
        i = bisect_right(self.ends, pos)
        if i == len(self.starts):
            return None
        return self.starts[i], self.ends[i], self.kinds[i]


class Scratch:
    """The chain (any :class:`Disk`) with a writable scratch layer over it."""

    def __init__(self, base: Disk, folder: str | None) -> None:
        self.base = base
        self.size = base.size
        self.fd = open_scratch(folder, self.size)
        self.runs = Runs()
        self._lock = threading.Lock()
        self.generation = 0  # bumped by every change: cached data counts know when to recount
        self._counted: tuple[int, int] = (0, base.data_bytes())

    # -- reads ---------------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.size - offset))
        end = offset + n
        with self._lock:
            mine = self.runs.covering(offset, end)
        pos = offset
        for s, e, kind in mine:
            if pos < s:
                self.base.readinto(pos, buf[pos - offset : s - offset])
            part = buf[s - offset : e - offset]
            if kind == DATA:
                self._read_data(s, part)
            else:
                part[:] = bytes(len(part))
            pos = e
        if pos < end:
            self.base.readinto(pos, buf[pos - offset : n])
        return n

    def _read_data(self, offset: int, buf: memoryview) -> None:
        """Bytes of a DATA run of the map."""
        _pread_exact(self.fd, buf, offset)

    def seek(self, offset: int, whence: int) -> int:
        check_seek(self.size, offset, whence)
        with self._lock:
            return self._seek(offset, whence)

    def _seek(self, pos: int, whence: int) -> int:
        while pos < self.size:
            run = self.runs.at_or_after(pos)
            if run is not None and run[0] <= pos:  # inside a run of ours
                if (run[2] == DATA) == (whence == SEEK_DATA):
                    return pos
                pos = run[1]
                continue
            gap_end = run[0] if run is not None else self.size
            try:
                got = self.base.seek(pos, whence)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                got = self.size  # no data in the chain from pos on
            if got < gap_end:
                return got
            pos = gap_end
        if whence == SEEK_DATA:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return self.size

    def data_bytes(self) -> int:
        """Data bytes of the composition (for st_blocks), recounted only after a change."""
        from .view import window_data_bytes

        gen, count = self._counted
        if gen != self.generation:
            gen = self.generation
            count = window_data_bytes(self, 0, self.size)
            self._counted = (gen, count)
        return count

    # -- writes --------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset`` (clipped at the end: no growth); all zeros are a zero range."""
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        n = max(0, min(len(data), self.size - offset))
        if n == 0:
            if len(data):
                raise OSError(errno.ENOSPC, "write past the end of the disk")
            return 0
        if all_zero(data, n):
            self.zero(offset, n)
            return n
        with self._lock:
            self._reserve(offset, offset + n)
            mv = memoryview(data)[:n]
            done = 0
            while done < n:
                done += os.pwrite(self.fd, mv[done:], offset + done)
            self.runs.set(offset, offset + n, DATA)
            self.generation += 1
        return n

    def _reserve(self, start: int, end: int) -> None:
        """Before a write that overwrites some of our data and also fills new ground: allocate the
        new ground first, so that ENOSPC fails the write before any acknowledged byte changes.

        A write over our data alone needs no new blocks; a write over new ground alone that runs
        out of space changes nothing the map points at. Only the mix needs the reservation (and
        reserving always would cost a third of the sequential write speed on ext4)."""
        ours = [(s, e) for s, e, k in self.runs.covering(start, end) if k == DATA]
        if not ours or ours == [(start, end)]:
            return
        pos = start
        for s, e in [*ours, (end, end)]:
            if pos < s:
                os.posix_fallocate(self.fd, pos, s - pos)
            pos = max(pos, e)

    def zero(self, offset: int, length: int) -> None:
        """[offset, offset + length) reads as zeros and is not data (discard, zero range)."""
        end = min(self.size, offset + length)
        if offset < 0 or offset >= end:
            return
        with self._lock:
            self.runs.set(offset, end, ZERO)
            self.generation += 1
            # give the scratch blocks back; the map already says zeros, so a failure is harmless
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """FUSE fallocate: punch-hole and zero-range become zeros; plain allocation inside the disk
        is a no-op (the disk's size never changes)."""
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self.zero(offset, length)
            return
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode")
        if offset + length > self.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EFBIG, "the disk's size is fixed")

    def flush(self) -> None:
        """fsync of the view: a throwaway layer has nothing to make durable."""

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def all_zero(data: bytes | memoryview, n: int) -> bool:
    """Are the first ``n`` bytes all zeros? Data rarely starts and ends with zero bytes: most
    calls answer from two bytes; the others count the zeros (a copy of a memoryview first)."""
    if n <= 0:
        return True
    if data[0] or data[n - 1]:
        return False
    raw = data if isinstance(data, bytes) else bytes(data[:n])
    return raw.count(0, 0, n) == n


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            buf[done:] = bytes(len(buf) - done)  # the file is sized to the disk: never happens
            return
        done += got


class OverlayDisk(Scratch):
    """``--overlay FILE``: the map of the scratch layer over the chain, with the written bytes kept
    in a growing qcow2 overlay alone (a format capability: ``FORMATS``' qcow2 entry's ``overlay``),
    made valid by each fsync. DATA runs of the map are read back from the overlay's clusters (a
    held cluster never moves), so each write reaches the host once, not twice; the scratch file
    stays empty."""

    def __init__(self, base: Disk, folder: str | None, overlay: Any) -> None:
        super().__init__(base, folder)
        self.overlay = overlay
        self._order = threading.Lock()  # one write at a time: the overlay's copy-on-write reads the view

    def _fill(self, offset: int, buf: memoryview) -> None:
        self.readinto(offset, buf)

    def _read_data(self, offset: int, buf: memoryview) -> None:
        self.overlay.read_held(offset, buf)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        n = max(0, min(len(data), self.size - offset))
        if n == 0 or offset < 0:
            return super().write(offset, data)  # the errors of a write that writes nothing
        with self._order:
            if all_zero(data, n):
                self.overlay.zero(offset, n, self._fill)
                self.zero(offset, n)
                return n
            self.overlay.write(offset, memoryview(data)[:n], self._fill)  # all or nothing
            with self._lock:
                self.runs.set(offset, offset + n, DATA)
                self.generation += 1
            return n

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        with self._order:
            if (
                mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
                and 0 <= offset < self.size
                and length > 0
            ):
                self.overlay.zero(offset, min(length, self.size - offset), self._fill)
            super().fallocate(mode, offset, length)

    def flush(self) -> None:
        with self._order:
            self.overlay.flush()

    def close(self) -> None:
        try:
            with self._order:
                self.overlay.close()
        finally:
            super().close()
