"""A qcow2 overlay that grows while a view is written (``flatfs mount --overlay FILE``).

Not the convert writer: that one writes a whole image once, in guest order.
This one takes writes in any order, a cluster at a time, and must be a valid
qcow2 after every :meth:`Overlay.flush` and after a ``kill -9`` at any moment.

* Created with ``O_EXCL``: version 3, 64 KiB clusters, 16-bit refcounts, the
  backing file's name and format recorded, its L1 table and refcount table
  preallocated for the whole disk (nothing in the header changes later).
  The empty image is made durable before the view goes live.
* A write to a cluster the overlay does not hold yet takes a new cluster at
  the end of the file, filled first with what the view shows around the write
  (copy on write, through ``fill``). Data goes to the file at once; the new
  cluster's refcount and its L2/L1 entries live in memory until a flush.
* A flush writes, in this order, with an fdatasync before and after: the
  refcount blocks (and the refcount table entries of new ones), then the L2
  tables, then the L1 table. Until then the file on disk is the image as of
  the last flush, plus unreferenced clusters past its end (which ``qemu-img
  check`` does not count) and new bytes in clusters it already held. Every
  entry written points at a cluster whose refcount is already on disk, so an
  image cut short between any two writes is still consistent.
* A zero write or discard that covers whole clusters makes them zero clusters
  (keeping an allocated one's offset, so no cluster leaks); a partial one
  writes zeros.

Facts from QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable

from ...errors import ImageIOError
from .spec import (
    EXT_BACKING_FORMAT,
    EXT_END,
    HEADER_V2,
    HEADER_V3,
    MAGIC,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
)

CLUSTER_BITS = 16
CS = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts
REFS_PER_BLOCK = CS * 8 >> REFCOUNT_ORDER
L2_ENTRIES = CS // 8
HEADER_LENGTH = 112  # version 3 header through the compression type, padded to 8

Fill = Callable[[int, memoryview], None]  # (guest offset, buffer): what the view shows there


class Overlay:
    """A new qcow2 file over ``backing`` (of ``backing_format``), ``size`` guest bytes."""

    def __init__(self, path: str, size: int, backing: str, backing_format: str) -> None:
        self.path = path
        self.size = size
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc) from None
        self._lock = threading.Lock()
        self.l1_size = -(-size // (CS * L2_ENTRIES))
        l1_clusters = max(1, -(-self.l1_size * 8 // CS))
        # the most clusters this file can ever hold: header, tables, every L2 and data cluster
        most = 1 + l1_clusters + self.l1_size + -(-size // CS)
        refblocks = -(-most // REFS_PER_BLOCK) + 1
        rt_clusters = -(-(-(-(most + refblocks) // REFS_PER_BLOCK) * 8) // CS) + 1
        self.rt_offset = CS
        self.l1_offset = CS * (1 + rt_clusters)
        self.next = 1 + rt_clusters + l1_clusters  # the next free cluster
        self.l1 = [0] * self.l1_size
        self.l2: dict[int, bytearray] = {}  # l1 index -> its L2 table, as it is now
        self.l2_host: dict[int, int] = {}  # l1 index -> the L2 table's cluster offset
        self.refblocks: dict[int, bytearray] = {}  # refcount table index -> block
        self.refblock_host: dict[int, int] = {}
        self.dirty_l2: set[int] = set()
        self.dirty_refs: set[int] = set()
        self.new_refblocks: set[int] = set()
        self.l1_dirty = False
        try:
            for c in range(self.next):
                self._ref(c)
            self._write(self._header(backing, backing_format, rt_clusters), 0)
            self._write(bytes(CS * (rt_clusters + l1_clusters)), CS)
            self.flush()
        except BaseException:
            os.close(self.fd)
            os.unlink(path)
            raise

    # -- the header ------------------------------------------------------------
    def _header(self, backing: str, backing_format: str, rt_clusters: int) -> bytes:
        fmt = backing_format.encode()
        exts = struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
        exts += struct.pack(">II", EXT_END, 0)
        name = os.fsencode(backing)
        name_off = HEADER_LENGTH + len(exts)
        if name_off + len(name) > CS or len(name) > 1023:
            raise ImageIOError(self.path, f"backing file name too long ({len(name)} bytes)")
        head = HEADER_V2.pack(
            MAGIC,
            3,
            name_off,
            len(name),
            CLUSTER_BITS,
            self.size,
            0,
            self.l1_size,
            self.l1_offset,
            self.rt_offset,
            rt_clusters,
            0,
            0,
        )
        head += HEADER_V3.pack(0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
        head += bytes(HEADER_LENGTH - len(head))
        return head + exts + name

    # -- clusters --------------------------------------------------------------
    def _ref(self, cluster: int) -> None:
        """Refcount 1 for ``cluster``, in memory (its refcount block made on demand)."""
        k, i = divmod(cluster, REFS_PER_BLOCK)
        block = self.refblocks.get(k)
        if block is None:
            block = self.refblocks[k] = bytearray(CS)
            host = self.next
            self.next += 1
            self.refblock_host[k] = host * CS
            self.new_refblocks.add(k)
            if host != cluster:
                self._ref(host)
        struct.pack_into(">H", block, i * 2, 1)
        self.dirty_refs.add(k)

    def _alloc(self, data: bytes | bytearray) -> int:
        """A new cluster holding ``data``; if the write fails, its refcount is dropped again."""
        c = self.next
        self.next += 1
        self._ref(c)
        try:
            self._write(data, c * CS)
        except ImageIOError:
            self._unref(c)
            raise
        return c * CS

    def _unref(self, cluster: int) -> None:
        """Refcount 0 again: an unreferenced cluster that nothing counts, not a leak."""
        k, i = divmod(cluster, REFS_PER_BLOCK)
        struct.pack_into(">H", self.refblocks[k], i * 2, 0)
        self.dirty_refs.add(k)

    def _table(self, l1i: int) -> bytearray:
        t = self.l2.get(l1i)
        if t is None:
            host = self._alloc(bytes(CS))
            t = self.l2[l1i] = bytearray(CS)
            self.l2_host[l1i] = host
            self.l1[l1i] = host | OFLAG_COPIED
            self.l1_dirty = True
        return t

    def _entry(self, guest_cluster: int) -> tuple[bytearray, int, int]:
        l1i, l2i = divmod(guest_cluster, L2_ENTRIES)
        t = self._table(l1i)
        return t, l2i * 8, struct.unpack_from(">Q", t, l2i * 8)[0]

    # -- writes ----------------------------------------------------------------
    def write(self, offset: int, data: bytes | memoryview, fill: Fill) -> None:
        """``data`` at guest ``offset``; ``fill`` supplies the rest of a cluster newly taken.

        All or nothing for what reads back: the clusters it needs anew are written first; if one
        fails (ENOSPC), those taken are given back and no entry or held cluster has changed."""
        mv = memoryview(data)
        with self._lock:
            plan: list[tuple[int, int, int, int]] = []  # (guest cluster, pos, end, entry)
            pos, end = offset, offset + len(mv)
            while pos < end:
                g = pos // CS
                c_end = min(end, (g + 1) * CS)
                plan.append((g, pos, c_end, self._entry(g)[2]))
                pos = c_end
            taken: dict[int, int] = {}  # guest cluster -> new host cluster
            try:
                for g, pos, c_end, entry in plan:
                    if _host(entry):
                        continue  # a cluster we hold (data or zeroed): written in place below
                    buf = bytearray(CS)
                    if (pos > g * CS or c_end < (g + 1) * CS) and not entry & OFLAG_ZERO:
                        fill(g * CS, memoryview(buf)[: min(CS, self.size - g * CS)])
                    buf[pos - g * CS : c_end - g * CS] = mv[pos - offset : c_end - offset]
                    taken[g] = self._alloc(buf)
            except ImageIOError:
                for host in taken.values():
                    self._unref(host // CS)
                raise
            for g, pos, c_end, entry in plan:
                t, at, _ = self._entry(g)
                host = taken.get(g) or _host(entry)
                if g not in taken and entry & OFLAG_ZERO:
                    buf = bytearray(CS)  # a zeroed cluster that kept its offset: zeros around the write
                    buf[pos - g * CS : c_end - g * CS] = mv[pos - offset : c_end - offset]
                    self._write(buf, host)
                elif g not in taken:
                    self._write(mv[pos - offset : c_end - offset], host + pos - g * CS)
                if entry != host | OFLAG_COPIED:
                    struct.pack_into(">Q", t, at, host | OFLAG_COPIED)
                    self.dirty_l2.add(g // L2_ENTRIES)

    def zero(self, offset: int, length: int, fill: Fill) -> None:
        """[offset, offset + length) reads as zeros: whole clusters become zero clusters."""
        end = min(self.size, offset + length)
        first = -(-offset // CS) * CS
        last = min(end // CS * CS, end)
        if self.size - last < CS and end == self.size:
            last = end  # the disk's last, short cluster counts as whole
        if first >= last:
            self.write(offset, bytes(end - offset), fill)
            return
        if offset < first:
            self.write(offset, bytes(first - offset), fill)
        if last < end:
            self.write(last, bytes(end - last), fill)
        with self._lock:
            for g in range(first // CS, -(-last // CS)):
                t, at, entry = self._entry(g)
                host = _host(entry)
                struct.pack_into(">Q", t, at, (host | OFLAG_COPIED if host else 0) | OFLAG_ZERO)
                self.dirty_l2.add(g // L2_ENTRIES)

    def read_held(self, offset: int, buf: memoryview) -> None:
        """Guest bytes at ``offset`` from clusters this overlay holds (what was written to it).

        A held cluster keeps its host offset for good, so this needs no lock; clusters that lie
        one after the other in the file are read in one call."""
        pos, end = offset, offset + len(buf)
        while pos < end:
            host = self._held(pos)
            run_end = min(end, (pos // CS + 1) * CS)
            while run_end < end and self._held(run_end) == host + run_end - pos:
                run_end = min(end, run_end + CS)
            part = buf[pos - offset : run_end - offset]
            done = 0
            try:
                while done < len(part):
                    got = os.preadv(self.fd, [part[done:]], host + done)
                    if got <= 0:
                        raise ImageIOError(self.path, "cluster cut short", host + done)
                    done += got
            except OSError as exc:
                raise ImageIOError.from_oserror(self.path, exc, host + done) from None
            pos = run_end

    def _held(self, pos: int) -> int:
        """The host offset of guest byte ``pos``, which must lie in a cluster this overlay holds."""
        l1i, l2i = divmod(pos // CS, L2_ENTRIES)
        t = self.l2.get(l1i)
        host = _host(struct.unpack_from(">Q", t, l2i * 8)[0]) if t is not None else 0
        if not host:
            raise ImageIOError(self.path, f"guest offset 0x{pos:x} is not held by the overlay")
        return host + pos % CS

    def flush(self) -> None:
        """Make the image as it is now durable and valid: refcounts, then L2 tables, then L1."""
        with self._lock:
            self._sync()
            for k in sorted(self.dirty_refs):
                self._write(self.refblocks[k], self.refblock_host[k])
            if self.new_refblocks:
                self._sync()
                for k in sorted(self.new_refblocks):
                    self._write(struct.pack(">Q", self.refblock_host[k]), self.rt_offset + 8 * k)
            self._sync()
            for l1i in sorted(self.dirty_l2):
                self._write(self.l2[l1i], self.l2_host[l1i])
            if self.l1_dirty:
                self._sync()
                self._write(struct.pack(f">{self.l1_size}Q", *self.l1), self.l1_offset)
            self._sync()
            self.dirty_refs.clear()
            self.new_refblocks.clear()
            self.dirty_l2.clear()
            self.l1_dirty = False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)

    # -- I/O -------------------------------------------------------------------
    def _write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data)
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc, offset) from None

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc) from None


def _host(entry: int) -> int:
    """The host offset of a standard L2 entry (bits 9-55)."""
    return entry & OFFSET_MASK
