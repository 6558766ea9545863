"""Deciding what to store of a chunk of guest data: the zero blocks, the backing, the subclusters.

A chunk's buffer holds the source's flattened bytes (and, over a backing
file, the backing's bytes in a second buffer). :class:`ClusterPlanner`
turns it into qcow2 operations (:class:`DataOp`, :class:`ZeroOp`);
:class:`BlockPlanner` into the byte ranges a raw target writes. Both work on
whole buffers with ``bytes.find``/``startswith`` (C speed); per-cluster
Python work happens only over a backing file or with extended L2 entries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import NamedTuple

from ..readers import Span, coalesce_pieces

Segment = tuple[int, int]  # (offset, length) in a buffer


class Cluster(enum.Enum):
    """What one cluster of the source asks the target for."""

    DATA = "data"  # store its bytes
    ZERO = "zero"  # store a zero cluster: zeros over backing data
    SAME = "same"  # nothing: it reads the same as the backing
    HOLE = "hole"  # nothing: all zeros, nothing below


_DATA, _ZERO, _SAME, _HOLE = Cluster.DATA, Cluster.ZERO, Cluster.SAME, Cluster.HOLE


class DataOp(NamedTuple):
    """Store guest clusters ``cluster``.. from buffer[offset : offset + length]."""

    cluster: int
    offset: int
    length: int
    segments: list[Segment] | None  # the pieces to write (relative to offset); None: all
    bitmaps: list[int] | None  # extended L2: one subcluster bitmap per cluster


class ZeroOp(NamedTuple):
    """Mark ``nclusters`` guest clusters from ``cluster`` as reading zeros."""

    cluster: int
    nclusters: int
    bitmaps: list[int]  # extended L2: each cluster's zero bits


Op = DataOp | ZeroOp


class Plan(NamedTuple):
    ops: list[Op]
    zero_skipped: int  # clusters of zeros not stored
    same_as_backing: int  # clusters equal to the backing, not stored


def zero_blocks(buf: bytearray, start: int, end: int, h: int, zh: bytes) -> bytearray:
    """Mask of h-byte blocks of buf[start:end] (1 = all zeros); the last may be short.

    ``zh`` is h zero bytes. A block can only be all zeros if its first 8
    bytes are: those heads are gathered in one C-level pass (a strided view),
    and only the blocks whose head is zero are compared in full. Data without
    zero blocks costs one short search, not a pass over every byte (qemu-img
    likewise stops at a block's first non-zero word).
    """
    n = end - start
    full = n // h
    if full and not h % 8 and not start % 8:
        return _zero_blocks_by_heads(buf, start, n, full, h, zh)
    return _zero_blocks_by_search(buf, start, end, h, zh)


_Z8 = bytes(8)


def _zero_blocks_by_heads(buf: bytearray, start: int, n: int, full: int, h: int, zh: bytes) -> bytearray:
    nblocks = -(-n // h)
    mask = bytearray(nblocks)
    heads = memoryview(buf)[start : start + full * h].cast("Q")[:: h // 8].tobytes()
    i = heads.find(_Z8)
    while i >= 0:
        r = i % 8
        if r:  # a zero run across two heads: look again from the next head
            i = heads.find(_Z8, i + 8 - r)
            continue
        k = i >> 3
        if buf.startswith(zh, start + k * h):
            mask[k] = 1
        i = heads.find(_Z8, i + 8)
    tail = start + full * h
    if full < nblocks and buf.startswith(zh[: n - full * h], tail):
        mask[nblocks - 1] = 1
    return mask


def _zero_blocks_by_search(buf: bytearray, start: int, end: int, h: int, zh: bytes) -> bytearray:
    n = end - start
    nblocks = -(-n // h)
    mask = bytearray(nblocks)
    pos = start
    full_end = start + (n // h) * h
    while pos < full_end:
        p = buf.find(zh, pos, full_end)
        if p < 0:
            break
        q = start + -(-(p - start) // h) * h
        while q < full_end and buf.startswith(zh, q):
            mask[(q - start) // h] = 1
            q += h
        pos = max(q, p + 1)
    if full_end < end and buf.startswith(zh[: end - full_end], full_end):
        mask[nblocks - 1] = 1
    return mask


def runs(mask: bytearray, value: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, int]]:
    """[i, j) runs of ``value`` (0 or 1) in mask[lo:hi]."""
    hi = len(mask) if hi is None else hi
    other = 1 - value
    i = lo
    while i < hi:
        i = mask.find(value, i, hi)
        if i < 0:
            return
        j = mask.find(other, i, hi)
        if j < 0:
            j = hi
        yield i, j
        i = j


class ClusterPlanner:
    """qcow2: which clusters of a chunk to store as data, as zero clusters, or not at all."""

    def __init__(
        self,
        cluster_size: int,
        sparse_size: int,
        backing: bool,
        extended_l2: bool,
        subclusters: int,
        all_allocated: int,
    ) -> None:
        cs = self.cs = cluster_size
        # Zero detection granule inside a chunk: -S when it divides the cluster,
        # else the cluster (an all-zero cluster is never allocated either way).
        # Over a backing file, zeros where the backing reads zeros are "the
        # same as the backing" and never stored, whatever -S says.
        s = sparse_size
        self.detect = s > 0 or backing
        self.h = s if 0 < s <= cs and cs % s == 0 else cs
        self.zh = bytes(self.h)
        self.zc = bytes(cs)
        self.extended_l2 = extended_l2
        self.nsub = subclusters
        self.all_allocated = all_allocated
        self.sub = cs // subclusters if extended_l2 else 0
        self.zsub = bytes(self.sub)

    def plan(self, start: int, n: int, buf: bytearray, bbuf: bytearray | None) -> Plan:
        """The ops for guest [start, start + n) held in ``buf`` (``bbuf``: the backing's bytes)."""
        if bbuf is None and not self.extended_l2:
            return self._plan_fast(start, n, buf)
        return self._plan_per_cluster(start, n, buf, bbuf)

    def _plan_fast(self, a: int, n: int, buf: bytearray) -> Plan:
        """No backing data here and no subclusters: skip zero clusters, leave zero blocks as holes."""
        cs = self.cs
        g0 = a // cs
        if not self.detect:
            return Plan([DataOp(g0, 0, n, None, None)], 0, 0)
        h = self.h
        zb = zero_blocks(buf, 0, n, h, self.zh)
        if not zb.count(1):
            return Plan([DataOp(g0, 0, n, None, None)], 0, 0)
        bpc = cs // h
        nclus = -(-n // cs)
        if bpc == 1:
            cz = zb
        else:
            cz = bytearray(nclus)
            for j in range(nclus):
                if zb.find(0, j * bpc, (j + 1) * bpc) < 0:
                    cz[j] = 1
        ops: list[Op] = []
        for j0, j1 in runs(cz, 0):
            off = j0 * cs
            length = min(n, j1 * cs) - off
            segs = [(i * h - off, min(n, k * h) - i * h) for i, k in runs(zb, 0, j0 * bpc, j1 * bpc)]
            if len(segs) == 1 and segs[0] == (0, length):
                ops.append(DataOp(g0 + j0, off, length, None, None))
            else:
                ops.append(DataOp(g0 + j0, off, length, segs, None))
        return Plan(ops, cz.count(1), 0)

    def _plan_per_cluster(self, a: int, n: int, buf: bytearray, bbuf: bytearray | None) -> Plan:
        """Per cluster: compare with the backing, and/or per subcluster."""
        cs = self.cs
        g0 = a // cs
        ops: list[Op] = []
        # the data run and the zero run being built: first cluster, then
        # (buffer offset, length) or count, and the bitmaps
        run_g = run_off = run_len = -1
        run_maps: list[int] = []
        zrun_g = zrun_count = -1
        zrun_maps: list[int] = []
        zskip = same = 0
        for j in range(-(-n // cs)):
            off = j * cs
            ln = min(cs, n - off)
            state, bitmap = self._classify(buf, bbuf, off, ln)
            if state is _DATA:
                if zrun_g >= 0:
                    ops.append(ZeroOp(zrun_g, zrun_count, zrun_maps))
                    zrun_g = -1
                if run_g >= 0 and run_off + run_len == off:
                    run_len += ln
                    run_maps.append(bitmap)
                else:
                    if run_g >= 0:
                        ops.append(self._data_op(run_g, run_off, run_len, run_maps))
                    run_g, run_off, run_len, run_maps = g0 + j, off, ln, [bitmap]
                continue
            if run_g >= 0:
                ops.append(self._data_op(run_g, run_off, run_len, run_maps))
                run_g = -1
            if state is _ZERO:
                if zrun_g >= 0 and zrun_g + zrun_count == g0 + j:
                    zrun_count += 1
                    zrun_maps.append(bitmap)
                else:
                    if zrun_g >= 0:
                        ops.append(ZeroOp(zrun_g, zrun_count, zrun_maps))
                    zrun_g, zrun_count, zrun_maps = g0 + j, 1, [bitmap]
                continue
            if zrun_g >= 0:
                ops.append(ZeroOp(zrun_g, zrun_count, zrun_maps))
                zrun_g = -1
            if state is _SAME:
                same += 1
            else:
                zskip += 1
        if run_g >= 0:
            ops.append(self._data_op(run_g, run_off, run_len, run_maps))
        if zrun_g >= 0:
            ops.append(ZeroOp(zrun_g, zrun_count, zrun_maps))
        return Plan(ops, zskip, same)

    def _data_op(self, g: int, off: int, length: int, bitmaps: list[int]) -> DataOp:
        if not self.extended_l2:
            return DataOp(g, off, length, None, None)
        # Write only allocated subclusters; the others stay holes.
        sub = self.sub
        cs = self.cs
        nsub = self.nsub
        all_allocated = self.all_allocated
        segs: list[Segment] = []
        for k, bm in enumerate(bitmaps):
            alloc = bm & all_allocated
            i = 0
            while i < nsub:
                if not (alloc >> i) & 1:
                    i += 1
                    continue
                j = i
                while j < nsub and (alloc >> j) & 1:
                    j += 1
                s = k * cs + i * sub
                e = min(length, k * cs + j * sub)
                if s < e:
                    if segs and segs[-1][0] + segs[-1][1] == s:
                        segs[-1] = (segs[-1][0], e - segs[-1][0])
                    else:
                        segs.append((s, e - s))
                i = j
        return DataOp(g, off, length, segs, bitmaps)

    def _classify(self, buf: bytearray, bbuf: bytearray | None, off: int, ln: int) -> tuple[Cluster, int]:
        """One cluster -> (what to do with it, its subcluster bitmap)."""
        if self.extended_l2:
            return self._classify_sub(buf, bbuf, off, ln)
        if bbuf is not None:
            if buf.startswith(memoryview(bbuf)[off : off + ln], off):
                return _SAME, 0
            if buf.startswith(self.zc[:ln], off):
                return _ZERO, 0
            return _DATA, 0
        if self.detect and buf.startswith(self.zc[:ln], off):
            return _HOLE, 0
        return _DATA, 0

    def _classify_sub(self, buf: bytearray, bbuf: bytearray | None, off: int, ln: int) -> tuple[Cluster, int]:
        sub = self.sub
        zsub = self.zsub
        nsub = self.nsub
        alloc = zero = 0
        bmv = memoryview(bbuf) if bbuf is not None else None
        for i in range(nsub):
            s = off + i * sub
            k = min(sub, off + ln - s)
            if k <= 0:
                break
            if bmv is not None:
                if buf.startswith(bmv[s : s + k], s):
                    continue  # same as backing: unallocated
                if buf.startswith(zsub[:k], s):
                    zero |= 1 << (nsub + i)  # zeros over backing data
                    continue
                alloc |= 1 << i
            elif self.detect and buf.startswith(zsub[:k], s):
                continue  # zeros, no backing: unallocated
            else:
                alloc |= 1 << i
        if alloc:
            return _DATA, alloc | zero
        if zero:
            return _ZERO, zero
        return (_SAME if bmv is not None else _HOLE), 0


class BlockPlanner:
    """raw: which byte ranges of a chunk to write, honouring -S the way qemu-img does.

    Zeros are found in blocks of at most 4 KiB (a file system block): a run of
    zero blocks is skipped when it is at least -S long, or when it starts or
    ends the data (next to a hole or a chunk edge), whatever its length. Only
    shorter runs between data are written, so that -S keeps the writes
    unfragmented.
    """

    def __init__(self, sparse_size: int, block: int) -> None:
        self.s = sparse_size
        self.gran = min(sparse_size, block) if sparse_size else block
        self.min_run = -(-sparse_size // self.gran) if sparse_size else 0
        self.zh = bytes(self.gran)

    def plan(self, start: int, n: int, buf: bytearray, pieces: list[Span]) -> tuple[list[Segment], int]:
        """-> (writes as (buffer offset, length), zero blocks of -S skipped)."""
        if self.s == 0:
            return [(s - start, ln) for s, ln in coalesce_pieces(pieces)], 0
        g = self.gran
        zb = zero_blocks(buf, 0, n, g, self.zh)
        if self.min_run > 1:
            self._keep_short_zero_runs(zb, start, n, pieces)
        skipped = zb.count(1) * g // self.s
        return [(i * g, min(n, j * g) - i * g) for i, j in runs(zb, 0)], skipped

    def _keep_short_zero_runs(self, zb: bytearray, a: int, n: int, pieces: list[Span]) -> None:
        """Clear (write) runs of zero blocks shorter than -S that lie between data.

        A run is skipped (stays 1 in ``zb``) if it is at least -S long, touches
        the chunk's edge, or touches a hole of the source (a gap between
        ``pieces``): qemu-img never writes those either.
        """
        g = self.gran
        nb = len(zb)
        hole = bytearray(nb)
        pos = 0
        for s, ln in coalesce_pieces(pieces):
            off = s - a
            if off > pos:
                hole[pos // g : -(-off // g)] = b"\x01" * (-(-off // g) - pos // g)
            pos = off + ln
        if pos < n:
            hole[pos // g : nb] = b"\x01" * (nb - pos // g)
        for i, j in list(runs(zb, 1)):
            if j - i >= self.min_run or i == 0 or j == nb or hole.find(1, i, j) >= 0:
                continue
            zb[i:j] = bytes(j - i)
