"""A streaming qcow2 writer: data in guest order, refcounts planned, header last.

The caller feeds guest clusters in strictly ascending guest order: runs of
data clusters (:meth:`Qcow2Writer.write_clusters`), single compressed
clusters (:meth:`write_compressed`) and zero clusters (:meth:`write_zero`).
Every host cluster is allocated exactly once, at the end of the file, so the
file is written front to back in one pass and never rewritten:

    cluster 0        the header, reserved up front and written last
    data ...         data clusters (and packed compressed clusters) in guest order,
                     with each completed L2 table and each completed refcount
                     block written in between, as soon as it is final
    L1 table         at finish()
    refcount blocks  the last few, sized for the final layout (a fixed point)
    refcount table   at finish()

Memory is bounded: one L2 table, the refcounts of host clusters not yet
covered by a written refcount block (compressed clusters only; everything
else has refcount 1), and 16 bytes per allocated L2 table. Nothing is ever
sized by the virtual disk size except the L1 table, which is written in
4 KiB pages from the sparse list of allocated L2 tables.

Nothing here knows where the bytes land: every byte goes through the
:class:`~flatfs.formats.api.Sink` it is given, which makes them durable
(a new file renamed into place, or an existing file or device written in
place with its first MiB last). The header is built last, once every table
it points to is placed. Its tables are built in :mod:`.tables`.

Facts from QEMU's docs/interop/qcow2.txt that this module relies on:

* L1 and L2 entries hold the host offset in bits 9-55; bit 63 (COPIED) is set
  when the refcount is exactly 1; bit 0 of a standard L2 entry marks a zero
  cluster (version 3); bit 62 marks a compressed cluster, whose descriptor
  holds a byte offset in bits 0..x-1 and the number of additional 512-byte
  sectors in bits x..61, with x = 62 - (cluster_bits - 8);
* compressed data may run into the next host cluster; each host cluster it
  touches gets one reference per compressed cluster;
* extended L2 entries are 128 bits: the standard entry, then a bitmap with
  bit i = "subcluster i allocated" and bit 32+i = "subcluster i reads as
  zeros" (32 subclusters; QEMU needs clusters of at least 16 KiB).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from ...errors import ConvertError
from ..api import CopyRun, Sink, copy_runs
from .spec import MAX_L1_BYTES, MAX_REFTABLE_BYTES, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS
from .tables import (
    ALL_ALLOC,
    ALL_ZERO,
    DEFAULT_CLUSTER_SIZE,
    REFCOUNT_ORDER,
    HeaderFields,
    be,
    build_header,
    check_options,
    cluster_bits_of,
    entries_per_l2,
    layout_bytes,
    refblock,
    refcount_clusters,
)

__all__ = ["ALL_ALLOC", "ALL_ZERO", "DEFAULT_CLUSTER_SIZE", "Qcow2Writer"]

MAX_HOST_OFFSET = 1 << 56  # offsets live in bits 9..55
_PAGE = 4096
_FLUSH_COMPRESSED = 4 << 20  # write packed compressed data in pieces this big
_PENDING_L2_BYTES = 4 << 20  # completed L2 tables kept before they are written


class Qcow2Writer:
    """Writes one qcow2 image through ``sink``, front to back.

    Clusters must be fed in ascending guest order; each guest cluster at most
    once. Call :meth:`finish` exactly once at the end; nothing before it makes
    the file a valid image.

    The class also answers the facts a caller plans with, without importing
    this module (convert reaches it as the qcow2 format's ``target``).
    """

    DEFAULT_CLUSTER_SIZE = DEFAULT_CLUSTER_SIZE
    SUBCLUSTERS = SUBCLUSTERS  # per cluster, with extended L2 entries
    ALL_ALLOCATED = ALL_ALLOC  # the extended L2 bitmap with every subcluster allocated
    check_cluster_size = staticmethod(cluster_bits_of)
    check_options = staticmethod(check_options)
    entries_per_l2 = staticmethod(entries_per_l2)
    layout_bytes = staticmethod(layout_bytes)

    def __init__(
        self,
        sink: Sink,
        size: int,
        *,
        path: str = "<target>",
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        version: int = 3,
        backing_file: str | None = None,
        backing_format: str | None = None,
        extended_l2: bool = False,
        compression_type: str = "zlib",
    ) -> None:
        self.sink = sink  # where the bytes go, synchronously (buffers are reused)
        self.path = path
        if size < 0 or size % 512:
            raise ConvertError(f"{path}: qcow2 virtual size must be a multiple of 512, not {size}")
        if version not in (2, 3):
            raise ConvertError(f"{path}: qcow2 version must be 2 or 3, not {version}")
        check_options(cluster_size, version, extended_l2, compression_type, path)
        self.cb = cluster_bits_of(cluster_size)
        self.cs = cluster_size
        self.size = size
        self.version = version
        self.compression_type = compression_type
        self.extended_l2 = extended_l2
        self.words = 2 if extended_l2 else 1  # 64-bit words per L2 entry
        self.l2_entries = cluster_size // (8 * self.words)
        self.nclusters = -(-size // cluster_size)
        self.l1_size = -(-self.nclusters // self.l2_entries)
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise ConvertError(
                f"{path}: virtual size {size} needs an L1 table larger than QEMU's "
                f"{MAX_L1_BYTES >> 20} MiB limit; use a bigger cluster size"
            )
        # Compressed descriptor layout.
        self._cshift = 62 - (self.cb - 8)
        self._csec_mask = (1 << (self.cb - 8)) - 1

        self._fields = HeaderFields(
            version, self.cb, size, extended_l2, compression_type, backing_file, backing_format
        )
        build_header(self._fields, 0, 0, 0, 0, path)  # refuses what does not fit in cluster 0

        # Host allocation: everything below ``next`` is in use; cluster 0 is the header.
        self.next = cluster_size
        # Current L2 table (guest-order streaming) and completed ones awaiting a write.
        self._l2_index = -1
        self._l2: array[int] | None = None
        self._pending_l2: list[tuple[int, array[int]]] = []
        self._l1_index = array("Q")  # sparse L1: indexes ...
        self._l1_value = array("Q")  # ... and entries
        # Refcounts: 1 for every cluster below ``next`` unless listed in _rc_extra
        # (clusters shared by packed compressed data). Blocks are written once final.
        self._rc_per_block = cluster_size * 8 >> REFCOUNT_ORDER
        self._rc_blocks = array("Q")  # host offset of refcount block k
        self._rc_extra: dict[int, int] = {}
        # Packed compressed data not yet written: starts at host offset _cbuf_off.
        self._cbuf = bytearray()
        self._cbuf_off = 0
        self._last_guest = -1
        self._finished = False
        # Statistics.
        self.data_clusters = 0
        self.compressed_clusters = 0
        self.zero_clusters = 0

    # -- feeding -----------------------------------------------------------
    def write_clusters(
        self,
        guest_cluster: int,
        data: memoryview | bytes | bytearray,
        segments: Iterable[tuple[int, int]] | None = None,
        bitmaps: Sequence[int] | None = None,
    ) -> None:
        """Store ``len(data)/cluster_size`` consecutive guest clusters as data.

        ``data`` covers whole clusters, except that the disk's last cluster may
        be short. They get consecutive host clusters. ``segments`` lists the
        (offset, length) pieces of ``data`` to write; the rest stays a hole in
        the host file (it reads as zeros). ``bitmaps`` (extended L2 only) gives
        each cluster's subcluster bitmap; the default marks all allocated.
        """
        mv = memoryview(data)
        n = -(-len(mv) // self.cs)
        if n == 0:
            return
        self._check_order(guest_cluster, n)
        host = self._alloc(n)
        if segments is None:
            self._pwrite(mv, host)
        else:
            for off, length in segments:
                self._pwrite(mv[off : off + length], host + off)
        self.data_clusters += n
        if self.extended_l2:
            if bitmaps is None:
                bitmaps = array("Q", [ALL_ALLOC]) * n
            elif len(bitmaps) != n:
                raise ValueError("one bitmap per cluster")
            self._set_entries(guest_cluster, n, host | OFLAG_COPIED, self.cs, bitmaps)
        else:
            self._set_entries(guest_cluster, n, host | OFLAG_COPIED, self.cs, None)
        self._flush_metadata()

    def copy_data(self, offset: int, length: int, runs: Sequence[CopyRun], buf: memoryview | None) -> None:
        """Store guest [offset, offset + length) (``offset`` cluster aligned) as data clusters whose
        bytes are ``runs``: copied by the sink from their source file where it can (copy offload),
        each to the same offset in its host cluster, so blocks stay aligned with the source's and
        can be shared; what no run covers stays a hole and reads as zeros."""
        g = offset // self.cs
        n = -(-length // self.cs)
        if n <= 0 or offset % self.cs:
            raise ValueError("copy at least one cluster, from a cluster boundary")
        self._check_order(g, n)
        host = self._alloc(n)
        copy_runs(self.sink, host, runs, buf)
        self.data_clusters += n
        bitmaps = array("Q", [ALL_ALLOC]) * n if self.extended_l2 else None
        self._set_entries(g, n, host | OFLAG_COPIED, self.cs, bitmaps)
        self._flush_metadata()

    def write_compressed(self, guest_cluster: int, payload: bytes | bytearray | memoryview) -> None:
        """Store one guest cluster as compressed data (already compressed by the caller)."""
        length = len(payload)
        if not 0 < length < self.cs:
            raise ValueError("compressed payload must be shorter than a cluster")
        self._check_order(guest_cluster, 1)
        start = self.next
        if not self._cbuf:
            self._cbuf_off = start
        self._cbuf += payload
        end = start + length
        extra = self._rc_extra
        for c in range(start >> self.cb, ((end - 1) >> self.cb) + 1):
            extra[c] = extra.get(c, 0) + 1
        self.next = end
        nsec = ((end - 1) >> 9) - (start >> 9)
        entry = OFLAG_COMPRESSED | (nsec << self._cshift) | start
        self._set_entries(guest_cluster, 1, entry, 0, array("Q", [0]) if self.extended_l2 else None)
        self.compressed_clusters += 1
        if len(self._cbuf) >= _FLUSH_COMPRESSED:
            self._flush_compressed()
        # Writing metadata ends the packed stream (it needs whole clusters),
        # so do it only when L2 tables pile up or a refcount block is final.
        if len(self._pending_l2) * self.cs >= _PENDING_L2_BYTES or (
            end >> self.cb
        ) // self._rc_per_block > len(self._rc_blocks):
            self._flush_metadata()

    def write_zero(self, guest_cluster: int, count: int = 1, bitmaps: Sequence[int] | None = None) -> None:
        """Mark ``count`` guest clusters as reading zeros without storing data.

        Needed only over a backing file (without one, an unallocated cluster
        already reads as zeros). Version 2 has no zero flag, so there the
        clusters are allocated and left as holes in the host file. With
        extended L2, ``bitmaps`` may give each cluster's zero bits (bits
        32..63) to leave some subclusters to the backing file; the default is
        all zero.
        """
        if count <= 0:
            return
        self._check_order(guest_cluster, count)
        if self.version < 3:
            host = self._alloc(count)
            self._set_entries(guest_cluster, count, host | OFLAG_COPIED, self.cs, None)
            self.data_clusters += count
            self._flush_metadata()
            return
        if self.extended_l2:
            if bitmaps is None:
                bitmaps = array("Q", [ALL_ZERO]) * count
            elif len(bitmaps) != count or any(b & ALL_ALLOC for b in bitmaps):
                raise ValueError("zero clusters take one zero-only bitmap each")
            self._set_entries(guest_cluster, count, 0, 0, bitmaps)
        else:
            self._set_entries(guest_cluster, count, OFLAG_ZERO, 0, None)
        self.zero_clusters += count

    # -- finishing -----------------------------------------------------------
    def finish(self) -> int:
        """Write the remaining L2 tables, the L1 table, refcounts, then the header; return the file size."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._close_l2()
        self._align()
        self._flush_metadata(force=True)
        cs = self.cs

        # L1 table: only pages that hold entries are written; the rest stay holes.
        l1_clusters = -(-self.l1_size * 8 // cs)
        l1_off = self._alloc(l1_clusters) if l1_clusters else 0
        per_page = _PAGE // 8
        i = 0
        n = len(self._l1_index)
        while i < n:
            page = self._l1_index[i] // per_page
            buf = array("Q", bytes(_PAGE))
            while i < n and self._l1_index[i] // per_page == page:
                buf[self._l1_index[i] % per_page] = self._l1_value[i]
                i += 1
            used = min(_PAGE, self.l1_size * 8 - page * _PAGE)
            self._pwrite(memoryview(be(buf)).cast("B")[:used], l1_off + page * _PAGE)

        # Refcount blocks for the rest of the file, and the refcount table:
        # their own clusters need refcounts too (a fixed point).
        done_blocks = len(self._rc_blocks)
        nblocks, rt_clusters = refcount_clusters(self.next >> self.cb, done_blocks, cs)
        if rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise ConvertError(
                f"{self.path}: image too large for QEMU's refcount table limit; use a bigger cluster size"
            )
        first = self._alloc(nblocks) if nblocks else self.next
        rt_off = self._alloc(rt_clusters)
        end = self.next >> self.cb
        bufs = [refblock(done_blocks + j, end, cs, self._rc_extra, self.path) for j in range(nblocks)]
        if bufs:
            self._pwritev(bufs, first)
        self._rc_blocks.extend(first + j * cs for j in range(nblocks))
        rt = array("Q", self._rc_blocks)
        rt.extend(array("Q", [0]) * (rt_clusters * cs // 8 - len(rt)))
        self._pwrite(memoryview(be(rt)).cast("B"), rt_off)
        # The header goes last, once everything it points to is placed (the sink
        # decides when each byte becomes durable).
        header = build_header(self._fields, l1_off, self.l1_size, rt_off, rt_clusters, self.path)
        self._pwrite(memoryview(header), 0)
        return self.next

    # -- internals -----------------------------------------------------------
    def _check_order(self, guest_cluster: int, n: int) -> None:
        if self._finished:
            raise RuntimeError("writer already finished")
        if guest_cluster <= self._last_guest or guest_cluster + n > self.nclusters:
            raise ValueError(f"guest cluster {guest_cluster} out of order or past the end")
        self._last_guest = guest_cluster + n - 1

    def _set_entries(self, g: int, n: int, first: int, step: int, bitmaps: Sequence[int] | None) -> None:
        """Set L2 entries for guest clusters g..g+n-1: first, first+step, ..."""
        per = self.l2_entries
        w = self.words
        done = 0
        while done < n:
            idx = (g + done) // per
            if idx != self._l2_index:
                self._close_l2()
                self._l2_index = idx
                self._l2 = array("Q", bytes(self.cs))
            slot = (g + done) % per
            k = min(n - done, per - slot)
            v0 = first + done * step
            vals = array("Q", range(v0, v0 + k * step, step)) if step else array("Q", [first]) * k
            l2 = self._l2
            assert l2 is not None
            if w == 1:
                l2[slot : slot + k] = vals
            else:
                l2[2 * slot : 2 * (slot + k) : 2] = vals
                assert bitmaps is not None
                l2[2 * slot + 1 : 2 * (slot + k) : 2] = array("Q", bitmaps[done : done + k])
            done += k

    def _close_l2(self) -> None:
        if self._l2 is not None:
            self._pending_l2.append((self._l2_index, self._l2))
            self._l2 = None
            self._l2_index = -1

    def _align(self) -> None:
        """End the packed compressed stream: the next allocation starts a fresh cluster."""
        self._flush_compressed()
        mask = self.cs - 1
        self.next = (self.next + mask) & ~mask

    def _alloc(self, n: int) -> int:
        self._align()
        host = self.next
        self.next += n * self.cs
        if self.next > MAX_HOST_OFFSET:
            raise ConvertError(f"{self.path}: image file would exceed the qcow2 host offset limit")
        return host

    def _flush_compressed(self) -> None:
        if self._cbuf:
            self._pwrite(memoryview(self._cbuf), self._cbuf_off)
            self._cbuf = bytearray()

    def _flush_metadata(self, force: bool = False) -> None:
        """Write completed L2 tables, then every refcount block that is final."""
        if self._pending_l2:
            tables = self._pending_l2
            self._pending_l2 = []
            host = self._alloc(len(tables))
            self._pwritev([memoryview(be(t)).cast("B") for _, t in tables], host)
            for j, (idx, _) in enumerate(tables):
                self._l1_index.append(idx)
                self._l1_value.append((host + j * self.cs) | OFLAG_COPIED)
        # A refcount block is final once the allocation pointer has passed its
        # range and no compressed stream is open inside it.
        per_block = self._rc_per_block
        frontier = self.next >> self.cb  # clusters below are final; an open
        # (partly packed) cluster is not
        ready = frontier // per_block - len(self._rc_blocks)
        if ready <= 0:
            return
        first = len(self._rc_blocks)
        host = self._alloc(ready)
        bufs = [refblock(first + j, frontier, self.cs, self._rc_extra, self.path) for j in range(ready)]
        self._pwritev(bufs, host)
        self._rc_blocks.extend(host + j * self.cs for j in range(ready))
        limit = (first + ready) * per_block
        extra = self._rc_extra
        for c in [c for c in extra if c < limit]:
            del extra[c]

    def _pwrite(self, mv: memoryview, offset: int) -> None:
        self._pwritev([mv], offset)

    def _pwritev(self, bufs: list[memoryview], offset: int) -> None:
        self.sink.write(bufs, offset)
