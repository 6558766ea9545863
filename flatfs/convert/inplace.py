"""``convert -n``: a fresh image written from byte 0 into an existing file or block device.

Nothing is created, truncated or renamed. The order makes an interrupted run
harmless: first whatever image the target held is invalidated (its first
and last MiB zeroed and made durable, which covers the probes of qcow2, VHD
footers, VHDX, VDI, VMDK, LUKS and GPT backup headers), then the data and
tables are written front to back with every gap between them zeroed, and
last the bytes a probe looks at: the first and last MiB of the image being
written (a qcow2 header, a raw guest's partition tables), which the sink,
:class:`InPlaceSink`, keeps in memory until everything else is durable.
Until that last write the target reads as zeros where any prober looks. The
writer knows none of this: it writes its layout into the sink.

A device is opened with O_EXCL (the kernel refuses it while mounted or held
by device-mapper, md, or another O_EXCL opener); a file or device also gets
QEMU's writer locks, so a VM or another ``convert -n`` using it is refused.
Gaps are zeroed with BLKZEROOUT (devices) or fallocate ZERO_RANGE, then
PUNCH_HOLE (files); where neither works, zeros are written, and that is said
once, since the cost then grows with the target's size.

Test hook: ``FLATFS_CONVERT_TEST_NO_CHEAP_ZERO=1`` behaves as if the target
could not zero cheaply.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..chain import Chain
from ..errors import ConvertError, ImageIOError
from ..formats.api import HostFile
from ..hostio import host_size, lock_for_writing, pread_exact, pwritev_all
from .sinks import FileSink

HEAD_ZONE = 1 << 20  # zeroed first; the image's bytes here are written last
TAIL_ZONE = 1 << 20
SMALL_GAP = 256 << 10  # gaps up to this are written as zeros together with the data
ZERO_PIECE = 1 << 20
ALIGN = 4096  # BLKZEROOUT wants logical blocks; 4 KiB suits 512 and 4096-byte ones
NO_CHEAP_ZERO_ENV = "FLATFS_CONVERT_TEST_NO_CHEAP_ZERO"

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY, errno.ENODEV)

Warn = Callable[[str], None]
_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        # the C library this process already runs on: find_library("c") would run
        # `ldconfig -p` in a child process (measured 10-30 ms of every convert)
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
    if fn is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    if fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Zeroer:
    """Makes byte ranges of the target read as zeros, as cheaply as the target allows."""

    def __init__(self, fd: int, path: str, device: bool, warn: Warn) -> None:
        self.fd = fd
        self.path = path
        self.warn = warn
        self.warned = False
        self.method = "blkzeroout" if device else "zero-range"
        if os.environ.get(NO_CHEAP_ZERO_ENV):
            self.method = "write"
        elif device and not _device_zeroes_cheaply(fd):
            self.method = "blkzeroout"  # the kernel writes the zeros itself: still the cheapest way
            self._say_costly("the device cannot zero ranges cheaply; the kernel writes zeros")
        self.zeroed = 0

    def _say_costly(self, why: str) -> None:
        if not self.warned:
            self.warned = True
            self.warn(
                f"{self.path}: {why}, so the cost now grows with the target's size "
                "(use --target-is-zero if it already reads as zeros)"
            )

    def zero(self, start: int, end: int) -> None:
        if end <= start:
            return
        self.zeroed += end - start
        while True:
            try:
                if self.method == "blkzeroout":
                    self._blkzeroout(start, end)
                elif self.method == "zero-range":
                    _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, start, end - start)
                elif self.method == "punch":
                    _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start)
                else:
                    self._say_costly("cannot zero ranges cheaply here; writing zeros instead")
                    self._write_zeros(start, end)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise ImageIOError.from_oserror(self.path, exc, start) from None
                self.method = "punch" if self.method == "zero-range" else "write"

    def _blkzeroout(self, start: int, end: int) -> None:
        a = -(-start // ALIGN) * ALIGN
        b = end // ALIGN * ALIGN
        if a >= b:
            self._write_zeros(start, end)
            return
        fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("=QQ", a, b - a))
        self._write_zeros(start, a)
        self._write_zeros(b, end)

    def _write_zeros(self, start: int, end: int) -> None:
        zeros = memoryview(bytes(min(ZERO_PIECE, max(0, end - start))))
        pos = start
        while pos < end:
            n = min(ZERO_PIECE, end - pos)
            pwritev_all(self.fd, [zeros[:n]], pos, self.path)
            pos += n


def _device_zeroes_cheaply(fd: int) -> bool:
    """Whether the device offloads zeroing (write-zeroes), from sysfs; True when unknown."""
    try:
        rdev = os.fstat(fd).st_rdev
        base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        for q in (f"{base}/queue", f"{base}/../queue"):
            if os.path.isdir(q):
                with open(f"{q}/write_zeroes_max_bytes") as f:
                    return int(f.read().strip() or "0") > 0
    except (OSError, ValueError):
        pass
    return True


class InPlaceSink(FileSink):
    """The sink of ``convert -n``: an existing file or device that keeps its size.

    Writes are bounded by its size; whatever order they come in, every byte
    below ``pos`` has been written or zeroed (a write beyond ``pos`` zeroes
    the gap first; a small gap goes out as zeros in the same pwritev). The
    image's first and last MiB (``end`` is the image's expected end: its
    size, or the bound ``flatfs measure`` gives) are kept in memory and
    written by :meth:`commit` only once everything else is durable, the
    last MiB first, the first MiB (any header) last.
    """

    def __init__(self, fd: int, path: str, limit: int, zeroer: Zeroer | None, pos: int, end: int) -> None:
        super().__init__(fd, path)
        self.limit = limit
        self.zeroer = zeroer
        self.pos = pos
        self._zeros = memoryview(bytes(SMALL_GAP))
        end = min(end, limit)
        head = min(HEAD_ZONE, end)
        tail = max(head, end - TAIL_ZONE)
        self.zones: list[tuple[int, bytearray]] = [(0, bytearray(head))]
        if tail < end:
            self.zones.append((tail, bytearray(end - tail)))

    def write(self, bufs: list[memoryview], offset: int) -> None:
        n = sum(len(b) for b in bufs)
        self._check_room(offset + n)
        self.counts.written += n
        if not self._in_zones(offset, n):
            self._store(bufs, offset)
            return
        data = memoryview(b"".join(bufs)) if len(bufs) > 1 else bufs[0]
        for lo, hi, zone in self._pieces(offset, n):
            if zone is None:
                self._store([data[lo - offset : hi - offset]], lo)
            else:
                zone[:] = data[lo - offset : hi - offset]

    def copy(self, src: HostFile, src_offset: int, length: int, offset: int) -> int:
        """Offloaded like :meth:`FileSink.copy`, but what falls in a zone is read into it."""
        self._check_room(offset + length)
        self.counts.written += length
        copied = 0
        for lo, hi, zone in self._pieces(offset, length):
            at = src_offset + lo - offset
            if zone is not None:
                pread_exact(src.fd, src.path, zone, at)
                continue
            if lo > self.pos and self.zeroer is not None:
                self.zeroer.zero(self.pos, lo)
            copied += self._copy(src, at, hi - lo, lo)
            self.pos = max(self.pos, hi)
        self.counts.copied += copied
        return copied

    def _pieces(self, offset: int, n: int) -> Iterator[tuple[int, int, memoryview | None]]:
        """[offset, offset + n) cut at the zones: (start, end, the zone's bytes there, or None)."""
        pos = offset
        end = offset + n
        for zstart, zbuf in self.zones:
            zend = zstart + len(zbuf)
            if zend <= pos or zstart >= end:
                continue
            if zstart > pos:
                yield pos, zstart, None
                pos = zstart
            stop = min(end, zend)
            yield pos, stop, memoryview(zbuf)[pos - zstart : stop - zstart]
            pos = stop
        if pos < end:
            yield pos, end, None

    def commit(self, size: int) -> None:
        """Zero the rest of the image, make it durable, then its last MiB, then its first."""
        self.fill_to(size)
        try:
            os.fdatasync(self.fd)
            for zstart, zbuf in reversed(self.zones):
                part = memoryview(zbuf)[: max(0, size - zstart)]
                if part:
                    pwritev_all(self.fd, [part], zstart, self.path)
                    if zstart:
                        os.fdatasync(self.fd)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None

    def fill_to(self, end: int) -> None:
        """Zero what is left of [pos, end)."""
        if self.zeroer is not None and end > self.pos:
            self.zeroer.zero(self.pos, end)
        self.pos = max(self.pos, end)

    def _store(self, bufs: list[memoryview], offset: int) -> None:
        end = offset + sum(len(b) for b in bufs)
        gap = offset - self.pos
        if gap > 0 and self.zeroer is not None:
            if gap <= SMALL_GAP:
                bufs = [self._zeros[:gap], *bufs]
                offset = self.pos
            else:
                self.zeroer.zero(self.pos, offset)
        super()._store(bufs, offset)
        self.pos = max(self.pos, end)

    def _in_zones(self, start: int, n: int) -> bool:
        return any(z < start + n and start < z + len(buf) for z, buf in self.zones)

    def _check_room(self, end: int) -> None:
        if end > self.limit:
            raise ConvertError(
                f"{self.path}: too small: the image needs more than its {self.limit} bytes "
                "(flatfs measure tells the size needed)"
            )


class Existing:
    """TARGET opened for ``convert -n``: checked, locked, its size known."""

    def __init__(self, target: str, chains: Sequence[Chain]) -> None:
        self.path = target
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise ConvertError(
                f"{target}: does not exist (-n writes into an existing file or block device)"
            ) from None
        except OSError as exc:
            raise ImageIOError.from_oserror(target, exc) from None
        self.device = stat.S_ISBLK(st.st_mode)
        if not (self.device or stat.S_ISREG(st.st_mode)):
            raise ConvertError(f"{target}: is neither a regular file nor a block device")
        from .safety import refuse_chain_member

        refuse_chain_member(target, st, os.path.realpath(target), chains)
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY
        if self.device:
            flags |= os.O_EXCL
        try:
            self.fd = os.open(target, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise ConvertError(
                    f"{target}: device is in use (mounted, or held by another program); "
                    "refusing to write to it"
                ) from None
            raise ImageIOError.from_oserror(target, exc) from None
        try:
            fst = os.fstat(self.fd)
            if stat.S_ISBLK(fst.st_mode) != self.device or not (self.device or stat.S_ISREG(fst.st_mode)):
                raise ConvertError(f"{target}: changed while being opened")
            lock_for_writing(self.fd, target)
            self.size = host_size(self.fd, target)
        except BaseException:
            os.close(self.fd)
            raise

    def invalidate(self, zeroer: Zeroer) -> int:
        """Zero the first and last MiB (any old image's header, footer, backup headers); durable.

        Returns how many bytes from 0 are now zeros.
        """
        head = min(HEAD_ZONE, self.size)
        zeroer.zero(0, head)
        zeroer.zero(max(head, self.size - TAIL_ZONE), self.size)
        self.sync(data_only=True)
        return head

    def sync(self, data_only: bool = False) -> None:
        try:
            (os.fdatasync if data_only else os.fsync)(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Existing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
