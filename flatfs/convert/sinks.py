"""Where a writer's bytes land: sinks. A writer (formats/<fmt>/writer.py) never knows which.

:class:`FileSink` writes into one open file: it counts every byte (the
summary's ``bytes-written`` and ``copied`` are counted here and nowhere
else), starts the kernel's writeback as it goes, offloads copies to the
kernel (``copy_file_range``) and, on :meth:`FileSink.commit`, gives the file
its final size and makes it durable. For a new TARGET the file is the
temporary file that :mod:`.safety` renames into place; the files that go
with it (a VMDK's flat extent) are :class:`Companions`. The in-place sink
(``convert -n``: its zones, its zeroing, its first MiB last) is
:class:`.inplace.InPlaceSink`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ..chain import Chain
from ..errors import ConvertError, ImageIOError
from ..formats.api import HostFile
from ..hostio import pread_exact, pwritev_all
from .direct import DirectWriter
from .safety import create_temp, place, refuse_chain_member

# copy_file_range refused between these two files: copy through a buffer instead
COPY_REFUSED = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.ENOTSUP)
COPY_BOUNCE = 1 << 20
WRITEBACK_EVERY = 32 << 20  # start the kernel's writeback after this many bytes
CAN_OFFLOAD = hasattr(os, "copy_file_range")


class FileSink:
    """Writes into one open file: counted, written back as it goes, copies offloaded.

    posix_fadvise DONTNEED every WRITEBACK_EVERY bytes starts asynchronous
    writeback of dirty pages and drops clean ones, so the fsync that makes
    TARGET durable before the rename has little left to do, and a big
    conversion does not flood the page cache.
    """

    def __init__(
        self, fd: int, path: str, companions: Companions | None = None, direct: bool = False
    ) -> None:
        self.fd = fd
        self.path = path
        self.companions = companions
        self.counts = self  # whose figures this sink's bytes add to (a companion's: TARGET's)
        self.written = 0  # bytes written or copied, metadata included
        self.copied = 0  # of those, bytes the kernel copied (or shared)
        self._lo = -1
        self._hi = 0
        self._pending = 0
        self._refused: set[int] = set()  # source files copy_file_range refused
        self._bounce: memoryview | None = None
        self._children: list[FileSink] = []
        # direct: the data past the page cache (see .direct); convert asks for it with -t none
        self.direct = DirectWriter.open(fd, path) if direct else None

    def write(self, bufs: list[memoryview], offset: int) -> None:
        self.counts.written += sum(len(b) for b in bufs)
        if self.direct is not None and self.direct.take(bufs, offset):
            return
        self._store(bufs, offset)

    def copy(self, src: HostFile, src_offset: int, length: int, offset: int) -> int:
        self.counts.written += length
        self._drain()
        copied = self._copy(src, src_offset, length, offset)
        self.counts.copied += copied
        return copied

    def companion(self, name: str, size: int) -> FileSink:
        """A new file next to TARGET that appears with it (see :class:`Companions`)."""
        if self.companions is None:
            raise ConvertError(f"{self.path}: this target cannot make a second file ({name})")
        fd, path = self.companions.create(name, size)
        sink = FileSink(fd, path, direct=self.direct is not None)
        sink.counts = self.counts
        self._children.append(sink)
        return sink

    def commit(self, size: int) -> None:
        """The file is ``size`` bytes and durable (then its companions are, and are in place)."""
        for sink in (self, *self._children):
            sink._drain()
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None
        if self.companions is not None:
            self.companions.commit()

    def close(self) -> None:
        """Stop the direct writers (this file's, its companions') and release their buffers."""
        for sink in (self, *self._children):
            if sink.direct is not None:
                sink.direct.close()
                sink.direct = None

    # -- the bytes, uncounted ------------------------------------------------------------
    def _drain(self) -> None:
        """Every direct write complete (before a copy, the commit)."""
        if self.direct is not None:
            self.direct.flush()

    def _store(self, bufs: list[memoryview], offset: int) -> None:
        n = sum(len(b) for b in bufs)
        if self.direct is not None:
            self.direct.before_cached_write(offset, n)
        self._account(offset, n)
        pwritev_all(self.fd, bufs, offset, self.path)

    def _copy(self, src: HostFile, src_offset: int, n: int, offset: int) -> int:
        """Copy in the kernel where it agrees; where it refuses these two files, through a buffer."""
        self._account(offset, n)
        done = 0
        while done < n and CAN_OFFLOAD and src.fd not in self._refused:
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
