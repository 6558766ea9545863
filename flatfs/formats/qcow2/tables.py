"""The qcow2 writer's tables, built from numbers alone: header, refcount blocks, layout sizes.

No I/O here: :mod:`.writer` decides where each table goes and writes it.
Facts from QEMU's docs/interop/qcow2.txt that this module relies on:

* all numbers are big-endian; version 2 headers are 72 bytes, version 3
  headers carry ``header_length`` (we write 112, with the compression-type
  byte at offset 104);
* the backing-format header extension is type 0xe2792aca; header extensions
  end with a type-0 extension; the backing file name follows them, all
  inside cluster 0;
* a refcount block holds ``cluster_size * 8 / 2**refcount_order`` entries;
  the refcount table, the blocks and every other cluster need refcounts, so
  their number is a fixed point.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from typing import NamedTuple

from ...errors import ConvertError
from .spec import (
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_END,
    HEADER_V2,
    HEADER_V3,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_FORMAT_NAME,
    MIN_CLUSTER_BITS,
    SUBCLUSTERS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
)

DEFAULT_CLUSTER_SIZE = 1 << 16
MIN_EXTL2_CLUSTER_BITS = 14  # QEMU refuses extended L2 below 16 KiB clusters
REFCOUNT_ORDER = 4  # 16-bit refcounts; the only width version 2 knows
MAX_REFCOUNT = (1 << (1 << REFCOUNT_ORDER)) - 1
COMPRESSION_TYPES = {name: code for code, name in COMPRESSION_NAMES.items()}
# The version 3 header written: through header_length, then the
# compression-type byte, padded to a multiple of 8.
WRITTEN_V3_LENGTH = V3_HEADER_LENGTH + 8

ALL_ALLOC = (1 << SUBCLUSTERS) - 1  # extended L2: every subcluster allocated
ALL_ZERO = ALL_ALLOC << SUBCLUSTERS  # extended L2: every subcluster reads as zeros

_BIG_ENDIAN = sys.byteorder == "big"


def be(a: array[int]) -> array[int]:
    """``a`` in big-endian byte order (in place)."""
    if not _BIG_ENDIAN:
        a.byteswap()
    return a


def cluster_bits_of(cluster_size: int) -> int:
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ConvertError(f"cluster size must be a power of two from 512 B to 2 MiB, not {cluster_size}")
    return bits


def entries_per_l2(cluster_size: int, extended_l2: bool) -> int:
    """Guest clusters one L2 table maps."""
    return cluster_size // (16 if extended_l2 else 8)


def check_options(
    cluster_size: int, version: int, extended_l2: bool, compression_type: str, path: str = "<target>"
) -> None:
    """Refuse a combination of options no qcow2 image can have (before any file is made)."""
    cb = cluster_bits_of(cluster_size)
    if compression_type not in COMPRESSION_TYPES:
        raise ConvertError(f"{path}: unknown compression type {compression_type!r}")
    if compression_type != "zlib" and version < 3:
        raise ConvertError(f"{path}: compression type {compression_type} needs compat 1.1 (version 3)")
    if extended_l2:
        if version < 3:
            raise ConvertError(f"{path}: extended L2 entries need compat 1.1 (version 3)")
        if cb < MIN_EXTL2_CLUSTER_BITS:
            raise ConvertError(
                f"{path}: extended L2 entries need a cluster size of at least "
                f"{1 << MIN_EXTL2_CLUSTER_BITS} bytes"
            )


def refcount_clusters(used: int, done_blocks: int, cluster_size: int) -> tuple[int, int]:
    """(refcount blocks still to write, refcount table clusters) once ``used`` clusters are in use and
    ``done_blocks`` blocks are written: the blocks and the table need refcounts too (a fixed point)."""
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    nblocks, rt_clusters = 0, 1
    while True:
        total = -(-(used + nblocks + rt_clusters) // per_block)
        want = (total - done_blocks, -(-total * 8 // cluster_size))
        if want == (nblocks, rt_clusters):
            return want
        nblocks, rt_clusters = want


def layout_bytes(size: int, cluster_size: int, extended_l2: bool, data_clusters: int, l2_tables: int) -> int:
    """The file size written for ``data_clusters`` data clusters mapped by ``l2_tables`` L2 tables.

    The layout is fixed: the header cluster, the data and L2 tables, the L1
    table, then refcount blocks and the refcount table sized for the whole
    file (the fixed point the writer's ``finish`` computes too).
    """
    nclusters = -(-size // cluster_size)
    l1_size = -(-nclusters // entries_per_l2(cluster_size, extended_l2))
    l1_clusters = -(-l1_size * 8 // cluster_size)
    base = 1 + data_clusters + l2_tables + l1_clusters
    blocks, rt = refcount_clusters(base, 0, cluster_size)
    return (base + blocks + rt) * cluster_size


def refblock(k: int, used_end: int, cluster_size: int, shared: dict[int, int], path: str) -> memoryview:
    """Refcount block k: 1 for clusters below ``used_end``, 0 after, and the ``shared`` clusters' counts."""
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    lo = k * per_block
    ones = max(0, min(per_block, used_end - lo))
    blk = array("H", [1]) * ones
    if ones < per_block:
        blk.extend(array("H", [0]) * (per_block - ones))
    for c, count in shared.items():
        if lo <= c < lo + per_block:
            if count > MAX_REFCOUNT:
                raise ConvertError(f"{path}: refcount overflow at host cluster {c}")
            blk[c - lo] = count
    return memoryview(be(blk)).cast("B")


class HeaderFields(NamedTuple):
    """What a written header says beyond the table offsets."""

    version: int
    cluster_bits: int
    size: int
    extended_l2: bool
    compression_type: str
    backing_file: str | None
    backing_format: str | None


def build_header(
    f: HeaderFields, l1_off: int, l1_size: int, rt_off: int, rt_clusters: int, path: str
) -> bytes:
    """Cluster 0's bytes: the header, its extensions and the backing file name."""
    cs = 1 << f.cluster_bits
    v3 = f.version >= 3
    incompat = 0
    ctype = COMPRESSION_TYPES[f.compression_type]
    if ctype:
        incompat |= INCOMPAT_COMPRESSION
    if f.extended_l2:
        incompat |= INCOMPAT_EXTL2
    hlen = WRITTEN_V3_LENGTH if v3 else V2_HEADER_LENGTH
    exts = b""
    name = b""
    if f.backing_file is not None:
        name = os.fsencode(f.backing_file)
        if not 0 < len(name) <= MAX_BACKING_NAME:
            raise ConvertError(f"{path}: backing file name must be 1 to {MAX_BACKING_NAME} bytes")
        if f.backing_format:
            fmt = f.backing_format.encode()
            if len(fmt) > MAX_FORMAT_NAME:
                raise ConvertError(f"{path}: backing format name {f.backing_format!r} is too long")
            exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt + bytes(-len(fmt) % 8)
    exts += struct.pack(">II", EXT_END, 0)
    name_off = hlen + len(exts) if name else 0
    if hlen + len(exts) + len(name) > cs:
        raise ConvertError(
            f"{path}: header and backing file name do not fit in one "
            f"{cs}-byte cluster; use a bigger cluster size"
        )
    head = HEADER_V2.pack(
        MAGIC,
        f.version,
        name_off,
        len(name),
        f.cluster_bits,
        f.size,
        0,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        0,
        0,
    )
    if v3:
        head += HEADER_V3.pack(incompat, 0, 0, REFCOUNT_ORDER, WRITTEN_V3_LENGTH)
        head += bytes([ctype]) + bytes(WRITTEN_V3_LENGTH - V3_HEADER_LENGTH - 1)
    return head + exts + name
