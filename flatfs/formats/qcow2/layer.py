"""The qcow2 layer: open and validate, then map guest ranges through L1/L2.

One mapping primitive (:meth:`Qcow2Layer._runs`) feeds both ``extents`` and
``readinto``. Decoded L2 tables live in a bounded LRU, so memory stays bounded
whatever the virtual size.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import CorruptImage, ImageIOError
from ...extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from ...hostio import data_runs, host_size, pread_exact, pread_padded
from ..api import HostFile, HostRun, LayerBase, OpenContext, ParentRef
from ..common import LruCache
from . import clusters as C
from . import snapshots as S
from .spec import (
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    OFFSET_MASK,
    Header,
    parse_header,
)

# QEMU's limits on a persistent dirty bitmap (block/qcow2-bitmap.c), checked at open
BITMAP_MAX_TABLE = 0x8000000
BITMAP_MAX_PHYS = 0x20000000
BITMAP_MAX_NAME = 1023
BITMAP_RESERVED_FLAGS = 0xFFFFFFFC
BITMAP_IN_USE = 1
BITMAP_TABLE_RESERVED = 0xFF000000000001FE
_BITMAP_ENTRY = struct.Struct(">QIIBBHI")

# Bound on what the L2 cache keeps (all tables together), in bytes: a read run
# costs about 100, a kind run 17, a kept raw table its size. Pathological
# subcluster patterns stay near 25 MiB; ordinary tables cost a few KiB.
CACHE_MAX_BYTES = 25 << 20
CACHE_MIN_TABLES = 4
RUN_COST = 100
KIND_COST = 17


class _L2:
    """One cached L2 table: its kind view (mapping) and, once a read needs it, its read runs."""

    __slots__ = ("kinds", "read", "raw", "l2_offset", "cost", "plain")

    def __init__(
        self, kinds: C.Kinds, read: C.Table | None, raw: bytes | None, l2_offset: int, plain: bool = False
    ) -> None:
        self.plain = plain  # the fast kind view accepted it: read runs are built in bulk too
        self.kinds = kinds
        self.read = read
        self.raw = raw  # kept while ``read`` is not built yet
        self.l2_offset = l2_offset
        self.cost = len(kinds) * KIND_COST + (len(raw) if raw else 0) + (len(read) * RUN_COST if read else 0)

    def keep_read(self, read: C.Table) -> None:
        """Keep the read runs built from the raw table (unless another thread did), and drop the raw table."""
        if self.read is None:
            self.read, self.raw = read, None
            self.cost = len(self.kinds) * KIND_COST + len(read) * RUN_COST


def _cost(t: _L2) -> int:
    return t.cost


_KIND = {C.ABSENT: K_ABSENT, C.ZERO: K_ZERO, C.DATA: K_DATA, C.COMPRESSED: K_DATA}


class Qcow2Layer(LayerBase):
    format = "qcow2"

    def __init__(self, path: str, fd: int, ctx: OpenContext) -> None:
        self.path = path
        self.fd = fd
        self.file_size = host_size(fd, path)
        # Read the header cluster and nothing past it: reading a data cluster
        # would put its pages in the page cache, and ext4 then reports the
        # unwritten extents under them as data, which changes the answer of
        # SEEK_DATA (and so of QEMU's block status) for everybody.
        try:
            head = os.pread(fd, 4096, 0) if self.file_size else b""
            if len(head) == 4096 and _claimed_cluster_size(head) > 4096:
                head += os.pread(fd, _claimed_cluster_size(head) - 4096, 4096)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc, 0) from None
        hdr = parse_header(path, head[: _first_cluster(head)], self.file_size)
        self.header: Header = hdr
        self.size = hdr.size // 512 * 512  # QEMU counts whole sectors, rounding down
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l1_span = hdr.l1_span
        self.parent = ParentRef((hdr.backing_file,), hdr.backing_format) if hdr.backing_file else None
        # QEMU reads the snapshot table and the bitmap directory at open, and
        # refuses the image if either is broken: so does flatfs
        snaps = self.snapshots()
        wanted = ctx.snapshot_for(path)
        self.snapshot = S.choose(path, snaps, wanted) if wanted is not None else None
        if hdr.bitmaps is not None:
            self._check_bitmaps()

        # the file holding guest clusters
        if hdr.has_data_file:
            assert hdr.data_file is not None
            self.data_path, self.data_fd = ctx.open_related(path, hdr.data_file, "data file", raw_at=0)
            self.data_size = host_size(self.data_fd, self.data_path)
        else:
            self.data_path, self.data_fd, self.data_size = path, fd, self.file_size

        # the active L1 table, or the chosen snapshot's (-l): the image as it was then
        self.l1_offset, l1_size = hdr.l1_table_offset, hdr.l1_size
        if self.snapshot is not None:
            S.check_l1(path, self.snapshot, self.cluster_size, self.file_size)
            self.l1_offset, l1_size = self.snapshot.l1_table_offset, self.snapshot.l1_size
        self._l1_raw = bytearray(l1_size * 8)
        if l1_size:
            pread_exact(fd, path, memoryview(self._l1_raw), self.l1_offset)
        self._l1 = C.decode(bytes(self._l1_raw))
        self._l1_used = C.allocated_l1(bytes(self._l1_raw))
        self._cache: LruCache[int, _L2] = LruCache(budget=CACHE_MAX_BYTES, cost=_cost, keep=CACHE_MIN_TABLES)
        self._decompress = _decompressor(hdr.compression_type, self.cluster_size)
        self._prealloc: bool | None = None

    # -- open-time checks ----------------------------------------------------
    def _read(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the image at ``offset``; past its end, zeros (as QEMU reads them)."""
        buf = bytearray(n)
        pread_padded(self.fd, self.path, memoryview(buf), offset, self.file_size)
        return bytes(buf)

    def snapshots(self) -> list[S.Snapshot]:
        """The internal snapshots, in table order (read again on each call: ``info`` and ``-l`` only)."""
        h = self.header
        return list(S.walk(self.path, self._read, h.nb_snapshots, h.snapshots_offset))

    def _check_bitmaps(self) -> None:
        """QEMU loads every persistent dirty bitmap at open, even read-only, and
        refuses the image if the bitmap directory or a bitmap table is broken."""
        assert self.header.bitmaps is not None
        nb, size, at = self.header.bitmaps
        cs = self.cluster_size
        if size == 0:
            raise CorruptImage(self.path, "bitmap directory size is zero", at)
        directory = self._read(at, size)
        pos = count = 0
        names: set[bytes] = set()
        while pos < size:
            where = at + pos
            if pos + _BITMAP_ENTRY.size > size:
                raise CorruptImage(self.path, "broken bitmap directory", where)
            count += 1
            if count > nb:
                raise CorruptImage(
                    self.path, "more bitmaps in the bitmap directory than the bitmaps extension says", where
                )
            t_off, t_size, flags, btype, gbits, name_size, extra = _BITMAP_ENTRY.unpack_from(directory, pos)
            entry_size = (_BITMAP_ENTRY.size + name_size + extra + 7) & ~7
            if pos + entry_size > size:
                raise CorruptImage(self.path, "broken bitmap directory", where)
            if extra:
                raise CorruptImage(self.path, "bitmap directory entry with extra data", where)
            name = directory[pos + _BITMAP_ENTRY.size : pos + _BITMAP_ENTRY.size + name_size]
            label = name.decode("utf-8", "replace")
            phys = t_size * cs
            if (
                t_size == 0
                or t_off == 0
                or t_off % cs
                or t_size > BITMAP_MAX_TABLE
                or not 9 <= gbits <= 31
                or flags & BITMAP_RESERVED_FLAGS
                or name_size > BITMAP_MAX_NAME
                or btype != 1
                or phys > BITMAP_MAX_PHYS
                or (not flags & BITMAP_IN_USE and self.size > (phys * 8) << gbits)
            ):
                raise CorruptImage(self.path, f"bitmap {label!r} does not satisfy the constraints", where)
            cname = name.split(b"\0", 1)[0]
            if cname in names:
                raise CorruptImage(self.path, f"bitmap {label!r} appears twice", where)
            names.add(cname)
            if not flags & BITMAP_IN_USE:
                self._check_bitmap_table(label, t_off, t_size, gbits)
            pos += entry_size
        if count != nb:
            raise CorruptImage(
                self.path, "fewer bitmaps in the bitmap directory than the bitmaps extension says", at
            )

    def _check_bitmap_table(self, label: str, offset: int, n: int, gbits: int) -> None:
        cs = self.cluster_size
        table = C.decode(self._read(offset, n * 8))
        for k, e in enumerate(table):
            data = e & OFFSET_MASK
            if e & BITMAP_TABLE_RESERVED or (data and (e & 1 or data % cs)):
                raise CorruptImage(
                    self.path, f"invalid entry in the table of bitmap {label!r}", offset + 8 * k
                )
        bits = -(-self.size >> gbits) if self.size else 0
        need = -(-(-(-bits // 64) * 8) // cs)
        if need != n:
            raise CorruptImage(
                self.path, f"bitmap {label!r} has a table of {n} clusters, its size needs {need}", offset
            )

    # -- mapping -------------------------------------------------------------
    def _table(self, l1_index: int) -> _L2 | None:
        """The cached L2 table under L1 entry ``l1_index`` (read and decoded on a miss), or None."""
        t = self._cache.get(l1_index)
        if t is not None:
            return t
        entry = self._l1[l1_index]
        l2_off = entry & OFFSET_MASK
        if not l2_off:
            return None
        at = self.l1_offset + 8 * l1_index
        if l2_off % self.cluster_size:
            raise CorruptImage(self.path, f"L2 table offset 0x{l2_off:x} is not cluster aligned", at)
        if l2_off + self.cluster_size > self.file_size:
            raise CorruptImage(self.path, f"L2 table at 0x{l2_off:x} lies past the end of the file", at)
        buf = bytearray(self.cluster_size)
        pread_exact(self.fd, self.path, memoryview(buf), l2_off)
        raw = bytes(buf)
        h = self.header
        fast = None
        if not h.extended_l2 and not h.has_data_file:
            fast = C.fast_kinds(C.decode(raw), self.cluster_bits, l1_index * self.l1_span, raw)
        if fast is not None:
            t = _L2(fast, None, raw, l2_off, plain=True)
        else:
            read = self._classify(raw, l1_index, l2_off)
            t = _L2(C.kinds_of(read, l1_index * self.l1_span), read, None, l2_off)
        self._cache.put(l1_index, t)
        return t

    def _classify(self, raw: bytes, l1_index: int, l2_off: int) -> C.Table:
        t = C.classify(
            raw,
            self.cluster_bits,
            extended=self.header.extended_l2,
            data_file=self.header.has_data_file,
            base=l1_index * self.l1_span,
            version=self.header.version,
        )
        t.l2_offset = l2_off
        return t

    def _read_table(self, l1_index: int) -> C.Table | None:
        """The read runs (hosts) of the L2 table under ``l1_index``, built on first use."""
        t = self._table(l1_index)
        if t is None:
            return None
        read = t.read
        if read is None:
            raw = t.raw
            assert raw is not None
            if t.plain:
                read = C.fast_table(t.kinds, self.cluster_bits, l1_index * self.l1_span, raw)
                read.l2_offset = t.l2_offset
            else:
                read = self._classify(raw, l1_index, t.l2_offset)
            self._cache.revise(l1_index, t, lambda t: t.keep_read(read))
        return read

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int, int, C.Table | None, int]]:
        """Yield (start, end, code, host, table, run index) over [start, end).

        For DATA, ``host`` is already adjusted to ``start``.
        """
        pos = start
        span = self.l1_span
        used = self._l1_used
        while pos < end:
            l1i = pos // span
            base = l1i * span
            t = self._read_table(l1i) if l1i < len(self._l1) else None
            if t is None:
                # jump straight to the next allocated L1 entry
                k = bisect_left(used, l1i + 1)
                nxt = used[k] * span if k < len(used) else end
                stop = min(max(nxt, base + span), end)
                yield pos, stop, C.ABSENT, 0, None, -1
                pos = stop
                continue
            tend = min(base + span, end)
            r = t.find(pos - base)
            while pos < tend:
                rs = base + t.starts[r]
                re_ = min(rs + t.lengths[r], tend)
                code = t.codes[r]
                host = t.hosts[r] + (pos - rs) if code == C.DATA else t.hosts[r]
                yield pos, re_, code, host, t, r
                pos = re_
                r += 1

    def _bad(self, t: C.Table, r: int) -> CorruptImage:
        entry_size = self.header.l2_entry_size
        at = t.l2_offset + t.hosts[r] * entry_size
        return CorruptImage(self.path, t.reasons.get(r, "invalid L2 entry"), at)

    def metadata_preallocated(self) -> bool:
        """Does this image look metadata-preallocated? QEMU's own heuristic.

        Only then does QEMU's block-status ask the host file whether an
        allocated cluster lies over a hole (and report it as zero). The test:
        at least max(real*10/9, real+2) clusters carry a non-zero refcount,
        where ``real`` is the number of clusters the host file really
        allocates. Any error reading refcounts means "no", as in QEMU.
        """
        if self._prealloc is None:
            try:
                self._prealloc = self._detect_prealloc()
            except (ImageIOError, CorruptImage, OSError):
                self._prealloc = False
        return self._prealloc

    def _detect_prealloc(self) -> bool:
        h = self.header
        cs = self.cluster_size
        real = os.fstat(self.fd).st_blocks * 512 // cs
        threshold = max(real * 10 // 9, real + 2)
        end_cluster = -(-self.file_size // cs)
        per_block = cs * 8 >> h.refcount_order
        table = bytearray(h.refcount_table_clusters * cs)
        pread_exact(self.fd, self.path, memoryview(table), h.refcount_table_offset)
        rt = C.decode(bytes(table))
        count = 0
        block = bytearray(cs)
        for i, entry in enumerate(rt):
            first = i * per_block
            if first >= end_cluster or count >= threshold:
                break
            off = entry & ~0x1FF
            if not off:
                continue
            if off % cs or off + cs > self.file_size:
                return False
            pread_exact(self.fd, self.path, memoryview(block), off)
            count += C.count_nonzero_refcounts(
                bytes(block), h.refcount_order, min(per_block, end_cluster - first)
            )
        return count >= threshold

    def runs(self, start: int, end: int) -> Runs:
        """At most one L2 table's worth (a run of unallocated L1 entries counts as one), sliced
        out of the table's kind view in bulk.

        A corrupt L2 entry ends the answer before it, so a caller that stops
        early (a SEEK_DATA) never trips on damage past its answer; asked
        again from there, it raises.
        """
        end = min(end, self.size)
        if self.metadata_preallocated():
            return self._runs_asking_the_host(start, end)
        span = self.l1_span
        l1i = start // span
        base = l1i * span
        t = self._table(l1i) if l1i < len(self._l1) else None
        if t is None:
            # straight to the next allocated L1 entry
            used = self._l1_used
            k = bisect_left(used, l1i + 1)
            nxt = used[k] * span if k < len(used) else end
            out = Runs()
            out.add(start, min(max(nxt, base + span), end), K_ABSENT)
            return out
        kv = t.kinds
        tend = min(base + span, end)
        i = bisect_right(kv.starts, start) - 1
        j = bisect_left(kv.starts, tend)
        kinds = kv.kinds[i:j]
        bad = kinds.find(C.K_BAD)
        if bad == 0:
            read = self._read_table(l1i)
            assert read is not None
            raise self._bad(read, read.find(start - base))
        if bad > 0:
            j = i + bad
            kinds = kinds[:bad]
        starts = kv.starts[i:j]
        ends = kv.ends[i:j]
        starts[0] = start
        if ends[-1] > tend:
            ends[-1] = tend
        return Runs(starts, ends, bytearray(kinds))

    def _runs_asking_the_host(self, start: int, end: int) -> Runs:
        """A metadata-preallocated image: QEMU asks the host file too, and allocated
        clusters over a hole read as zeros."""
        out = Runs()
        boundary = (start // self.l1_span + 1) * self.l1_span
        for s, e, code, host, t, r in self._runs(start, end):
            if s >= boundary and len(out):
                break
            if code == C.BAD:
                if len(out):
                    break
                raise self._bad(t, r)  # type: ignore[arg-type]
            if code != C.DATA:
                out.add(s, e, _KIND[code])
                continue
            for hs, he, is_data in data_runs(
                self.data_fd, self.data_path, host, host + (e - s), self.data_size
            ):
                out.add(s + (hs - host), s + (he - host), K_DATA if is_data else K_ALLOC_ZERO)
        return out

    def coarse_runs(self) -> Runs:
        """DATA over every guest range an allocated L1 entry (an L2 table) covers."""
        out = Runs()
        span = self.l1_span
        pos = 0
        for i in self._l1_used:
            s, e = i * span, min((i + 1) * span, self.size)
            if s >= self.size:
                break
            out.add(pos, s, K_ABSENT)
            out.add(s, e, K_DATA)
            pos = e
        out.add(pos, self.size, K_ABSENT)
        return out

    def host_files(self) -> tuple[HostFile, ...]:
        if self.data_fd != self.fd:
            return (HostFile(self.path, self.fd), HostFile(self.data_path, self.data_fd, "data file"))
        return (HostFile(self.path, self.fd),)

    def host_map(self, start: int, end: int) -> list[HostRun]:
        """Plain data clusters (in the image or its external data file) map to their host
        bytes, neighbours contiguous on the host joined; compressed clusters and bytes past the
        data file's end (read as zeros) do not."""
        out: list[HostRun] = []
        fd, limit = self.data_fd, self.data_size
        for s, e, code, host, t, r in self._runs(start, end):
            if code == C.BAD:
                raise self._bad(t, r)  # type: ignore[arg-type]
            n = e - s
            if code == C.DATA:
                inside = max(0, min(n, limit - host))
                if inside:
                    last = out[-1] if out else None
                    if (
                        last is not None
                        and last[2] == fd
                        and last[0] + last[1] == s
                        and last[3] + last[1] == host
                    ):
                        out[-1] = (last[0], last[1] + inside, fd, last[3])
                    else:
                        out.append((s, inside, fd, host))
                s += inside
                n -= inside
            if n:
                last = out[-1] if out else None
                if last is not None and last[2] < 0 and last[0] + last[1] == s:
                    out[-1] = (last[0], last[1] + n, -1, 0)
                else:
                    out.append((s, n, -1, 0))
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        for s, e, code, host, t, r in self._runs(offset, end):
            dst = buf[s - offset : e - offset]
            if code == C.DATA:
                # Past the end of the file as it was at open, QEMU reads zeros;
                # a file that shrank since then is an I/O error.
                pread_padded(self.data_fd, self.data_path, dst, host, self.data_size)
            elif code == C.COMPRESSED:
                cstart = s - (s % self.cluster_size)
                data = self._read_compressed(host, cstart)
                dst[:] = data[s - cstart : e - cstart]
            elif code == C.BAD:
                raise self._bad(t, r)  # type: ignore[arg-type]
            else:
                dst[:] = bytes(len(dst))

    def _read_compressed(self, entry: int, guest: int) -> bytes:
        coff, csize = C.compressed_location(entry, self.cluster_bits)
        buf = bytearray(csize)
        pread_padded(self.fd, self.path, memoryview(buf), coff, self.file_size)
        try:
            out = self._decompress(bytes(buf))
        except Exception as exc:  # zlib.error, zstandard.ZstdError
            raise CorruptImage(
                self.path, f"compressed cluster for guest offset 0x{guest:x} does not decompress: {exc}", coff
            ) from None
        if len(out) != self.cluster_size:
            raise CorruptImage(
                self.path,
                f"compressed cluster for guest offset 0x{guest:x} "
                f"decompresses to {len(out)} bytes, not {self.cluster_size}",
                coff,
            )
        return out

    # -- facts ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        h = self.header
        out: dict[str, Any] = {
            "cluster-size": h.cluster_size,
            "compat": h.compat,
            "features": h.features(),
            "compression-type": COMPRESSION_NAMES.get(h.compression_type, "?"),
            "refcount-bits": 1 << h.refcount_order,
        }
        if h.nb_snapshots:  # as qemu-img info: the list only when there is one
            out["snapshots"] = [s.info() for s in self.snapshots()]
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.info()
        if h.has_data_file:
            out["data-file"] = self.data_path
            out["data-file-name"] = h.data_file
        return out

    def close(self) -> None:
        self._cache.clear()


def _claimed_cluster_size(head: bytes) -> int:
    """The cluster size the header claims (cluster_bits read unvalidated, clamped to 512 B..2 MiB)."""
    bits = int.from_bytes(head[20:24], "big")
    return 1 << min(max(bits, 9), 21)


def _first_cluster(head: bytes) -> int:
    """How much of ``head`` is the first cluster."""
    return len(head) if len(head) < 24 else min(len(head), _claimed_cluster_size(head))


def _decompressor(ctype: int, cluster_size: int) -> Callable[[bytes], bytes]:
    if ctype == COMPRESSION_ZSTD:
        import zstandard

        # A ZstdDecompressor is not thread-safe, and reads come from many
        # threads at once (the FUSE workers, convert's readers): sharing one
        # garbles clusters or fails them as corrupt. One context per thread.
        local = threading.local()

        def zstd(data: bytes) -> bytes:
            dctx = getattr(local, "dctx", None)
            if dctx is None:
                dctx = local.dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
            with dctx.stream_reader(data, read_across_frames=True) as r:
                out = bytearray()
                while len(out) < cluster_size:
                    chunk = r.read(cluster_size - len(out))
                    if not chunk:
                        break
                    out += chunk
                return bytes(out)

        return zstd

    def deflate(data: bytes) -> bytes:
        return zlib.decompressobj(-12).decompress(data, cluster_size)

    return deflate
