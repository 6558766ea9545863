"""The VMDK layer: a descriptor's extents, concatenated, each mapped on its own.

An extent is a range of a host file (FLAT, VMFS), zeros (ZERO) or a hosted
sparse file (SPARSE: ``KDMV``, plain or streamOptimized). A monolithicSparse
or streamOptimized disk is one sparse file whose embedded descriptor gives
the CIDs and the parent; a descriptor file names its extent files, which are
opened through the chain's policy (``OpenContext.open_related``).

A sparse extent maps a guest range through its grain directory to one grain
table at a time; decoded tables live in a bounded LRU, so memory stays
bounded whatever the capacity.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import compress
from typing import Any

from ...errors import CorruptImage, ImageIOError, UnsupportedImage
from ...extents import K_ABSENT, K_DATA, K_ZERO, Runs
from ...hostio import host_size, pread_exact, pread_padded
from ..api import HostFile, LayerBase, OpenContext, ParentRef
from ..common import LruCache
from .cowd import CowdExtent
from .descriptor import (
    DESCRIPTOR_HEAD,
    MAX_DESCRIPTOR,
    NO_PARENT,
    Descriptor,
    ExtentLine,
    not_a_descriptor,
    parse_descriptor,
    refuse_not_vmdk,
)
from .esxi import DESCRIPTOR_TYPES, REFUSED_TYPES, esxi_extent, unsupported_type
from .extent import Extent, FlatExtent, ZeroExtent
from .grains import ALL_ABSENT, GrainExtent, absent_until, used_tables
from .sesparse import SeSparseExtent, magic_matches
from .sparse import (
    COWD_MAGIC,
    GD_AT_END,
    GRAIN_MARKER,
    MAGIC,
    SECTOR,
    SparseHeader,
    check_gd,
    decode_u32,
    parse_footer,
    parse_header,
)

# An embedded descriptor is read from sector 1, at most this many sectors (as QEMU does)
EMBEDDED_SECTORS = 20
# A compressed grain larger than this is refused (VMware and QEMU write 64 KiB ones)
MAX_COMPRESSED_GRAIN = 1 << 20
# Decoded grain tables kept (all extents of a layer share nothing; per extent)
CACHE_TABLES = 512

# per-grain codes of a decoded grain table
_ABSENT, _ZERO, _DATA, _COMPRESSED, _BAD = range(5)
# grain code -> extent kind code; a damaged entry gets a kind of its own, never merged
_K_BAD = 255
_KIND_OF = bytes([K_ABSENT, K_ZERO, K_DATA, K_DATA, _K_BAD]) + bytes(251)
# A compressed grain is read with its marker in one pread of at most this much
# (deflate adds a few bytes per 16 KiB stored block; a larger one takes a second read).
GRAIN_READ_SLACK = 1024
GRAIN_READ_MAX = 1 << 20


# The stdlib's zlib inflates the grains (it releases the GIL, so convert's readers inflate in
# parallel); a faster inflate (ISA-L) was measured at 2.5x but is not worth a dependency.
_inflate = zlib
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,)


# Each thread keeps the last grain it inflated, one for all extents and layers: memory grows
# with threads x grain size (at most MAX_COMPRESSED_GRAIN), never with the number of extents
_LAST_GRAIN = threading.local()


@dataclass(slots=True)
class _Table:
    """One decoded grain table: per-grain codes and entries, and its kind view in bulk.

    ``starts``/``ends``/``kinds`` are the table's runs of extent kinds (guest
    bytes of the layer), neighbours always of different kinds; a damaged entry
    is a run of kind ``_K_BAD`` of its own.
    """

    entries: array[int]
    codes: bytes
    starts: array[int]
    ends: array[int]
    kinds: bytes
    gt_offset: int = 0


def _read_gd(
    path: str, fd: int, hdr: SparseHeader, file_size: int, ctx: OpenContext | None
) -> tuple[array[int], array[int]]:
    """The grain directory, read straight into its array, and the indexes of its allocated
    grain tables; refused when it points at more grain tables than the file can hold."""
    n = hdr.gd_entries
    if ctx is not None:
        ctx.charge(path, f"a grain directory of {n} entries", 8 * n)
    gd = decode_u32(b"")
    if not n:
        return gd, gd
    gd = array(gd.typecode, [0]) * n
    pread_exact(fd, path, memoryview(gd).cast("B"), hdr.gd_offset * SECTOR)
    if sys.byteorder == "big":  # pragma: no cover
        gd.byteswap()
    return gd, used_tables(path, gd, hdr.gtes_per_gt * 4, file_size, hdr.gd_offset * SECTOR)


class _SparseExtent(Extent):
    """A hosted sparse extent (KDMV): grain directory -> grain tables -> grains."""

    def __init__(self, path: str, fd: int, line: ExtentLine | None, ctx: OpenContext | None) -> None:
        self.path, self.fd, self.line = path, fd, line
        self.file_size = host_size(fd, path)
        head = bytearray(SECTOR)
        pread_padded(fd, path, memoryview(head), 0, self.file_size)
        if head[:4] == COWD_MAGIC:
            raise UnsupportedImage(path, "vmfsSparse (ESXi COWD) extents are not supported")
        hdr = parse_header(path, bytes(head), self.file_size)
        self.header_in_file = hdr
        if hdr.gd_offset == GD_AT_END:
            # streamOptimized written as a stream: the footer holds the real header
            at = self.file_size // SECTOR * SECTOR - 3 * SECTOR
            if at < SECTOR:
                raise CorruptImage(path, "file is too small for a streamOptimized footer", 0)
            raw = bytearray(3 * SECTOR)
            pread_exact(fd, path, memoryview(raw), at)
            hdr = parse_footer(path, bytes(raw), self.file_size, at)
            check_gd(path, hdr, self.file_size, at + SECTOR + 56)
        self.header: SparseHeader = hdr
        self.length = hdr.capacity * SECTOR
        self.grain = hdr.grain_size
        self.span = hdr.gt_span
        self.gt_bytes = hdr.gtes_per_gt * 4
        if hdr.compressed and self.grain > MAX_COMPRESSED_GRAIN:
            # each reader thread inflates a whole grain: memory would grow with threads x grain
            raise UnsupportedImage(
                path, f"compressed grains of {self.grain} bytes are larger than flatfs inflates (1 MiB)", 20
            )
        self.gd, self.used = _read_gd(path, fd, hdr, self.file_size, ctx)
        self.cache: LruCache[int, _Table] = LruCache(CACHE_TABLES)  # its limit shared out among extents

    # -- mapping -------------------------------------------------------------
    def _table(self, i: int) -> _Table | None:
        t = self.cache.get(i)
        if t is not None:
            return t
        sector = self.gd[i]
        if not sector:
            return None
        at = self.header.gd_offset * SECTOR + 4 * i
        gt = sector * SECTOR
        if gt + self.gt_bytes > self.file_size:
            raise CorruptImage(self.path, f"grain table at 0x{gt:x} lies past the end of the file", at)
        raw = bytearray(self.gt_bytes)
        pread_exact(self.fd, self.path, memoryview(raw), gt)
        t = self._classify(bytes(raw), i)
        t.gt_offset = gt
        self.cache.put(i, t)
        return t

    def _classify(self, raw: bytes, i: int) -> _Table:
        """Grain table ``i`` decoded in C-level passes: no Python work per entry (but for
        damaged entries, which only a hostile file has)."""
        g = self.grain
        tbase = self.start + i * self.span
        span = min(self.span, self.length - i * self.span)
        n = -(-span // g)
        entries = decode_u32(raw)[:n]
        data = _COMPRESSED if self.header.compressed else _DATA
        if not any(raw):  # all _ABSENT: one run (a preallocated, empty grain table)
            return _Table(entries, bytes(n), array("Q", [tbase]), array("Q", [tbase + span]), ALL_ABSENT)
        present = bytes(map(bool, entries))
        if self.header.zero_grain and entries.count(1):
            # 0 absent, 1 data, 2 zeroed grain (the entry 1)
            codes = bytes(map(operator.add, present, map((1).__eq__, entries))).translate(
                bytes([_ABSENT, data, _ZERO]) + bytes(253)
            )
        else:
            codes = present.translate(bytes([_ABSENT, data]) + bytes(254))
        limit = -(-self.file_size // SECTOR)  # an entry at or past it points past the end
        if max(entries) >= limit:
            marked = bytearray(codes)
            for k in compress(range(n), map(limit.__le__, entries)):
                if marked[k] != _ZERO:
                    marked[k] = _BAD
            codes = bytes(marked)
        kinds = codes.translate(_KIND_OF)
        if _K_BAD in kinds:
            # damaged entries: every one a run of its own
            changes = bytes(a != b or a == _K_BAD for a, b in zip(kinds[1:], kinds[:-1]))
        else:
            changes = bytes(map(operator.ne, kinds[1:], kinds[:-1]))
        cuts = array("Q", compress(range(tbase + g, tbase + n * g, g), changes))
        starts = array("Q", [tbase])
        starts.extend(cuts)
        cuts.append(tbase + span)
        return _Table(entries, codes, starts, cuts, kinds[:1] + bytes(compress(kinds[1:], changes)))

    def coarse(self, out: Runs) -> None:
        """DATA over what each allocated grain table covers (the grain directory alone)."""
        pos = self.start
        for i in self.used:
            s = self.start + i * self.span
            e = min(s + self.span, self.start + self.length)
            out.add(pos, s, K_ABSENT)
            out.add(s, e, K_DATA)
            pos = e
        out.add(pos, self.start + self.length, K_ABSENT)

    def _bad(self, t: _Table, k: int) -> CorruptImage:
        return CorruptImage(
            self.path, "grain table entry points past the end of the file", t.gt_offset + 4 * k
        )

    def runs(self, rel: int, end: int, out: Runs, base: int) -> None:
        """One grain table's kind view, sliced in bulk (``out`` is empty; ``base`` is
        this extent's start, which the view already includes).

        A damaged entry ends the answer before it; asked again from there, it raises.
        """
        i = rel // self.span
        tbase = i * self.span
        t = self._table(i)
        if t is None or t.kinds == ALL_ABSENT:
            out.add(base + rel, base + min(end, absent_until(self, i + 1, end)), K_ABSENT)
            return
        lo, hi = base + rel, base + min(end, tbase + self.span)
        a = bisect_right(t.starts, lo) - 1
        b = bisect_left(t.starts, hi)
        kinds = t.kinds[a:b]
        bad = kinds.find(_K_BAD)
        if bad == 0:
            raise self._bad(t, (lo - base - tbase) // self.grain)
        if bad > 0:
            b = a + bad
            kinds = kinds[:bad]
        out.starts.extend(t.starts[a:b])
        out.ends.extend(t.ends[a:b])
        out.kinds.extend(kinds)
        out.starts[0] = lo
        if out.ends[-1] > hi:
            out.ends[-1] = hi

    def readinto(self, rel: int, buf: memoryview) -> None:
        end = rel + len(buf)
        g = self.grain
        gsec = self.header.grain_sectors
        pos = rel
        while pos < end:
            i = pos // self.span
            tbase = i * self.span
            t = self._table(i)
            stop = min(end, tbase + self.span)
            if t is None:
                buf[pos - rel : stop - rel] = bytes(stop - pos)
                pos = stop
                continue
            codes, entries = t.codes, t.entries
            k = (pos - tbase) // g
            while pos < stop:
                code = codes[k]
                gs = tbase + k * g
                ge = min(gs + g, stop)
                k += 1
                if code == _DATA:
                    # one pread over grains that follow each other in the file too
                    host = entries[k - 1] * SECTOR + (pos - gs)
                    last = entries[k - 1]
                    while ge < stop and codes[k] == _DATA and entries[k] == last + gsec:
                        last = entries[k]
                        ge = min(ge + g, stop)
                        k += 1
                    pread_padded(self.fd, self.path, buf[pos - rel : ge - rel], host, self.file_size)
                elif code == _COMPRESSED:
                    grain = self._grain(entries[k - 1] * SECTOR, gs)
                    a = pos - gs
                    if ge - gs > len(grain):
                        raise CorruptImage(
                            self.path,
                            f"compressed grain for guest offset 0x{gs:x} holds only {len(grain)} bytes",
                            entries[k - 1] * SECTOR,
                        )
                    buf[pos - rel : ge - rel] = grain[a : a + (ge - pos)]
                elif code == _BAD:
                    raise self._bad(t, k - 1)
                else:
                    while ge < stop and codes[k] in (_ABSENT, _ZERO):
                        ge = min(ge + g, stop)
                        k += 1
                    buf[pos - rel : ge - rel] = bytes(ge - pos)
                pos = ge

    def _grain(self, host: int, guest: int) -> memoryview:
        """One grain, decompressed: the marker and the compressed bytes in one pread.

        Each thread keeps the last grain it decompressed, so a read that
        starts mid-grain (convert's second piece of a grain, a FUSE request
        of 4 KiB) does not decompress it again. The decompressor is made per
        call: many threads read at once.
        """
        tls = _LAST_GRAIN
        if getattr(tls, "owner", None) is self and tls.host == host:
            last: memoryview = tls.grain
            return last
        g = self.grain
        if self.header.markers:
            want = GRAIN_MARKER.size + min(g + GRAIN_READ_SLACK, GRAIN_READ_MAX)
            raw = self._pread(host, want)
            if len(raw) < GRAIN_MARKER.size:
                raw += bytes(GRAIN_MARKER.size - len(raw))
            _lba, csize = GRAIN_MARKER.unpack_from(raw)
            if not 0 < csize <= 2 * g:
                raise CorruptImage(
                    self.path, f"grain marker for guest offset 0x{guest:x} has a bad size ({csize})", host
                )
            need = GRAIN_MARKER.size + csize
            if len(raw) < need and len(raw) == want:
                raw += self._pread(host + want, need - want)
            if len(raw) < need:  # past the end of the file: zeros, as a padded read gives
                raw += bytes(need - len(raw))
            data = memoryview(raw)[GRAIN_MARKER.size : need]
        else:
            raw = self._pread(host, g)
            data = memoryview(raw + bytes(g - len(raw)))
        d = _inflate.decompressobj()
        try:
            out = d.decompress(data, g)
            if not d.eof and (d.decompress(d.unconsumed_tail, 1) or not d.eof):
                raise zlib.error("the stream does not end within one grain")
        except _INFLATE_ERRORS as exc:
            raise CorruptImage(
                self.path, f"compressed grain for guest offset 0x{guest:x} does not decompress: {exc}", host
            ) from None
        grain = memoryview(out)
        tls.owner, tls.host, tls.grain = self, host, grain
        return grain

    def _pread(self, at: int, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, at)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc, at) from None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.setdefault("type", "SPARSE")
        d["filename"] = self.path
        d["cluster-size"] = self.grain
        d["version"] = self.header.version
        d["flags"] = self.header.flag_names()
        if self.header.compressed:
            d["compressed"] = True
        return d

    def close(self) -> None:
        self.cache.clear()


class VmdkLayer(LayerBase):
    format = "vmdk"

    def __init__(self, path: str, fd: int, ctx: OpenContext) -> None:
        self.path, self.fd = path, fd
        self.file_size = host_size(fd, path)
        head = self._head(SECTOR)
        self.parts: list[Extent] = []
        self.descriptor: Descriptor | None = None
        self.create_type = ""
        try:
            if head[:4] == MAGIC:
                self.descriptor = self._open_sparse(ctx)
            elif head[:4] == COWD_MAGIC or magic_matches(head):  # an ESXi extent opened alone
                cowd = head[:4] == COWD_MAGIC
                alone = CowdExtent if cowd else SeSparseExtent
                self.parts.append(alone(path, fd, None, ctx))
                self.create_type = "vmfsSparse" if cowd else "seSparse"
            elif not_a_descriptor(head, self._head(DESCRIPTOR_HEAD)):
                # before any parsing: a text file that is not a descriptor may be any host
                # file an image names (/etc/shadow), and its lines must never reach a message
                raise refuse_not_vmdk(path, head)
            else:
                self.descriptor = self._open_descriptor(ctx)
        except BaseException:
            self.close()
            raise
        sparse = [e for e in self.parts if isinstance(e, (_SparseExtent, GrainExtent))]
        for e in sparse:  # the layer's cache stays one extent's, however many extents share it
            e.cache.limit = max(2, e.cache.limit // len(sparse))
        self.starts = [e.start for e in self.parts]
        self.size = sum(e.length for e in self.parts)
        d = self.descriptor
        self.cid = d.cid if d is not None else None
        self.parent_cid = d.parent_cid if d is not None else NO_PARENT
        self.parent = None
        if d is not None and d.parent_hint:
            self.parent = ParentRef(
                (d.parent_hint,), "vmdk", identity=("vmdk-cid", f"{d.parent_cid:08x}"), loose=True
            )

    def _head(self, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, 0)
        except OSError as exc:
            raise ImageIOError.from_oserror(self.path, exc, 0) from None

    def _open_sparse(self, ctx: OpenContext) -> Descriptor | None:
        ext = _SparseExtent(self.path, self.fd, None, ctx)
        self.parts.append(ext)
        hdr = ext.header_in_file
        d = None
        if hdr.desc_offset or hdr.desc_size:
            # Where QEMU looks for it, whatever the header says: the 20 sectors from sector 1
            n = min(hdr.desc_size or EMBEDDED_SECTORS, EMBEDDED_SECTORS) * SECTOR
            raw = bytearray(n)
            pread_padded(self.fd, self.path, memoryview(raw), SECTOR, self.file_size)
            d = parse_descriptor(self.path, bytes(raw), SECTOR)
        if d is not None and d.create_type in REFUSED_TYPES:
            raise UnsupportedImage(self.path, f"{REFUSED_TYPES[d.create_type]} is not supported")
        self.create_type = (
            d.create_type
            if d is not None
            else ("streamOptimized" if ext.header.compressed else "monolithicSparse")
        )
        return d

    def _open_descriptor(self, ctx: OpenContext) -> Descriptor:
        if self.file_size > MAX_DESCRIPTOR:
            raise CorruptImage(self.path, f"descriptor file is larger than {MAX_DESCRIPTOR} bytes")
        raw = bytearray(self.file_size)
        pread_exact(self.fd, self.path, memoryview(raw), 0)
        d = parse_descriptor(self.path, bytes(raw))
        ct = d.create_type
        if ct not in DESCRIPTOR_TYPES:
            raise unsupported_type(self.path, ct)
        self.create_type = ct
        if not d.extents:
            raise CorruptImage(self.path, "descriptor has no extents")
        pos = 0
        for line in d.extents:
            ext = self._open_extent(ctx, line)
            ext.start = pos
            pos += ext.length
            self.parts.append(ext)
        return d

    def _open_extent(self, ctx: OpenContext, line: ExtentLine) -> Extent:
        where = f"descriptor line {line.line}"
        if line.access == "NOACCESS":
            raise UnsupportedImage(self.path, f"{where}: NOACCESS extents are not supported")
        if line.type in REFUSED_TYPES:
            raise UnsupportedImage(
                self.path, f"{where}: {REFUSED_TYPES[line.type]} extents are not supported"
            )
        length = line.sectors * SECTOR
        if line.type == "ZERO":
            return ZeroExtent(length, line)
        assert line.filename is not None
        flat = line.type in ("FLAT", "VMFS")
        raw_at = line.offset * SECTOR if flat else None
        epath, efd = ctx.open_related(self.path, line.filename, "extent file", raw_at)
        if flat:
            return FlatExtent(epath, efd, line.offset * SECTOR, length, line, self.create_type == "vmfsThin")
        ext = esxi_extent(epath, efd, line, ctx) or _SparseExtent(epath, efd, line, ctx)
        if ext.length != length:
            raise CorruptImage(
                self.path,
                f"{where}: extent of {line.sectors} sectors, but {epath} holds {ext.length // SECTOR}",
            )
        return ext

    # -- mapping -------------------------------------------------------------
    def runs(self, start: int, end: int) -> Runs:
        """One extent's window: a grain table (or a run of empty ones), or a flat file's 256 MiB."""
        end = min(end, self.size)
        out = Runs()
        if start >= end:
            return out
        ext = self.parts[bisect_right(self.starts, start) - 1]
        ext.runs(start - ext.start, min(end, ext.start + ext.length) - ext.start, out, ext.start)
        return out

    def coarse_runs(self) -> Runs:
        out = Runs()
        for e in self.parts:
            e.coarse(out)
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        i = bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end:
            ext = self.parts[i]
            e = min(end, ext.start + ext.length)
            ext.readinto(pos - ext.start, buf[pos - offset : e - offset])
            pos = e
            i += 1

    # -- facts ---------------------------------------------------------------
    def host_files(self) -> tuple[HostFile, ...]:
        out = [HostFile(self.path, self.fd)]
        seen = {self.fd}
        for e in self.parts:
            if e.fd >= 0 and e.fd not in seen:
                seen.add(e.fd)
                out.append(HostFile(e.path, e.fd, "extent"))
        return tuple(out)

    def identity(self, kind: str) -> str | None:
        if kind == "vmdk-cid" and self.cid is not None:
            return f"{self.cid:08x}"
        return None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        grains = [e.grain for e in self.parts if isinstance(e, (_SparseExtent, GrainExtent))]
        if grains:
            out["cluster-size"] = grains[0]
        out["create-type"] = self.create_type
        if self.cid is not None:
            out["cid"] = f"{self.cid:08x}"
        out["parent-cid"] = f"{self.parent_cid:08x}"
        out["extents"] = [e.describe() for e in self.parts]
        return out

    def close(self) -> None:
        for e in self.parts:
            e.close()
