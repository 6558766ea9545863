"""The VMDK target writer (``convert -O vmdk``): monolithicSparse (default) and streamOptimized.

Facts from VMware's Virtual Disk Format 5.0 this module relies on: the
512-byte sparse extent header ("KDMV", little-endian: version, flags,
capacity and grain size in sectors, the embedded descriptor's offset and
size, GTEs per GT, the redundant and primary grain directory offsets, the
overhead, the four newline-detection characters, the compression
algorithm); 64 KiB grains, grain tables of 512 entries (32 MiB of guest
each) holding a grain's sector offset (0: not allocated, reads zeros in an
extent without a parent), a grain directory holding each GT's sector offset
(0: no table, every grain unallocated); the text descriptor (version,
encoding, CID, parentCID=ffffffff: no parent, createType, the extent line,
the ddb.* keys).

A stream-optimized extent (version 3, as ESXi requires; flags: newline test,
compressed grains, markers) holds, after the header and descriptor, each
grain deflated (zlib; a grain that would not shrink is stored, see
flatfs.deflate) behind its grain marker (its LBA and compressed size),
padded to a sector; a grain table behind a GT marker after its grains; then
the grain directory behind its marker, the footer (the header again, now
with the directory's offset; the header itself says "GD at end") behind its
marker, and the end-of-stream marker. Grains are compressed on every core
(zlib releases the GIL), in batches, and written in guest order.

Only grains holding data are stored, and only the grain tables that have
some: the cost follows the data, never the virtual size. The header (sparse:
with the directory written) is written last.
"""

from __future__ import annotations

import os
import random
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from ...deflate import zlib_deflate
from ...errors import ConvertError
from ..api import FileSink, ImageWriter, OptionValue, Sink, WriterOption, blocks_touched
from .sparse import (
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_TEST,
    GD_AT_END,
    GRAIN_MARKER,
    HEADER,
    MAGIC,
    MARKER,
    NL_CHECK,
    SECTOR,
)

GRAIN = 64 << 10
GRAIN_SECTORS = GRAIN // SECTOR
GTES = 512
GT_SPAN = GTES * GRAIN  # guest bytes one grain table covers
GT_BYTES = GTES * 4
DESC_OFFSET, DESC_SECTORS = 1, 20
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
DEFLATE = 1
ADAPTERS = ("lsilogic", "ide", "buslogic", "lsisas1068", "pvscsi", "legacyESX")
SUBFORMATS = ("monolithicSparse", "streamOptimized", "monolithicFlat")
BATCH_GRAINS = 16  # grains per compression task (1 MiB)
MAX_THREADS = 8

OPTIONS = (
    WriterOption(
        "subformat",
        "monolithicSparse (default), streamOptimized, monolithicFlat (+ NAME-flat.vmdk)",
        SUBFORMATS[0],
        SUBFORMATS,
    ),
    WriterOption("adapter_type", "ddb.adapterType (default lsilogic)", "lsilogic", ADAPTERS),
    WriterOption("hwversion", "ddb.virtualHWVersion, a number (default 4)", "4"),
)


class VmdkOptions(NamedTuple):
    subformat: str = SUBFORMATS[0]
    adapter_type: str = "lsilogic"
    hwversion: str = "4"

    @classmethod
    def of(cls, values: Mapping[str, OptionValue]) -> VmdkOptions:
        o = cls(
            subformat=str(values.get("subformat", SUBFORMATS[0])),
            adapter_type=str(values.get("adapter_type", "lsilogic")),
            hwversion=str(values.get("hwversion", "4")),
        )
        if not o.hwversion.isdigit() or not 0 < int(o.hwversion) < 1000:
            raise ConvertError(f"-o hwversion: {o.hwversion!r} is not a virtual hardware version (4, 21...)")
        return o


def check(values: Mapping[str, OptionValue]) -> None:
    VmdkOptions.of(values)


def flat_name(path: str) -> str:
    """The flat extent of a monolithicFlat TARGET: disk.vmdk -> disk-flat.vmdk (VMware's naming)."""
    stem, dot, ext = os.path.basename(path).rpartition(".")
    return f"{stem}-flat.{ext}" if dot and stem else f"{os.path.basename(path)}-flat.vmdk"


def descriptor(path: str, sectors: int, o: VmdkOptions, pad: bool = True) -> bytes:
    """The text descriptor, naming its one extent: TARGET's own file, or the flat extent."""
    heads = 16 if o.adapter_type == "ide" else 255
    cylinders = min(sectors // (heads * 63), 65535)
    cid = random.getrandbits(32) or 1
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        "parentCID=ffffffff",
        f'createType="{o.subformat}"',
        "",
        "# Extent description",
        (
            f'RW {sectors} FLAT "{flat_name(path)}" 0'
            if o.subformat == "monolithicFlat"
            else f'RW {sectors} SPARSE "{os.path.basename(path)}"'
        ),
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.virtualHWVersion = "{o.hwversion}"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{heads}"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{o.adapter_type}"',
        "",
    ]
    if any(c in os.path.basename(path) for c in '"\n\r'):
        raise ConvertError(f"{path}: a VMDK descriptor cannot name a file with quotes or line breaks")
    text = "\n".join(lines).encode()
    if not pad:
        return text
    if len(text) > DESC_SECTORS * SECTOR:
        raise ConvertError(f"{path}: the VMDK descriptor is too long (the file name?)")
    return text + bytes(DESC_SECTORS * SECTOR - len(text))


def header(o: VmdkOptions, sectors: int, gd: int, overhead: int) -> bytes:
    stream = o.subformat == "streamOptimized"
    flags = FLAG_NL_TEST | (FLAG_COMPRESSED | FLAG_MARKERS if stream else 0)
    raw = HEADER.pack(
        MAGIC,
        3 if stream else 1,
        flags,
        sectors,
        GRAIN_SECTORS,
        DESC_OFFSET,
        DESC_SECTORS,
        GTES,
        0,
        gd,
        overhead,
        0,
        NL_CHECK,
        DEFLATE if stream else 0,
    )
    return raw + bytes(SECTOR - len(raw))


def _le(a: array[int]) -> memoryview:
    if sys.byteorder == "big":
        a = array("I", a)
        a.byteswap()
    return memoryview(a).cast("B")


class VmdkWriter:
    def __init__(self, sink: Sink, size: int, options: VmdkOptions, path: str) -> None:
        self.sink = sink
        self.o = options
        self.path = path
        self.sectors = -(-size // SECTOR)
        if not self.sectors:
            raise ConvertError(
                "the source is empty: flatfs writes no VMDK of 0 bytes (QEMU refuses to open one)"
            )
        self.stream = options.subformat == "streamOptimized"
        self.gd = array("I", [0]) * -(-self.sectors * SECTOR // GT_SPAN)
        gd_sectors = -(-len(self.gd) * 4 // SECTOR)
        self.gd_at = DESC_OFFSET + DESC_SECTORS  # (sparse) the directory, after the descriptor
        first = GRAIN_SECTORS if self.stream else self.gd_at + gd_sectors
        self.overhead = -(-first // GRAIN_SECTORS) * GRAIN_SECTORS
        self.next = self.overhead  # the next free sector
        self.desc = descriptor(path, self.sectors, options)
        self.gt_index = -1
        self.gt = array("I", [0]) * GTES
        # sparse: the grain being written; stream: the grain being assembled, and batches in flight
        self.grain = -1
        self.grain_host = 0
        self.buf = bytearray(GRAIN)
        self.batch: list[tuple[int, bytes]] = []
        self.pending: deque[Future[list[tuple[int, bytes]]]] = deque()
        self.pool: ThreadPoolExecutor | None = None
        if self.stream:
            self.threads = max(1, min(os.cpu_count() or 1, MAX_THREADS))
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="flatfs-deflate")

    # -- data ---------------------------------------------------------------------------

    def write_data(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        pos = offset
        while pos < end:
            g = pos // GRAIN
            stop = min(end, (g + 1) * GRAIN)
            piece = data[pos - offset : stop - offset]
            if self.stream:
                self._assemble(g, pos - g * GRAIN, piece)
            else:
                self._store_sparse(g, pos - g * GRAIN, piece)
            pos = stop

    def _store_sparse(self, g: int, within: int, piece: memoryview) -> None:
        if g != self.grain:
            self._enter_table(g)
            self.grain, self.grain_host = g, self.next
            self.gt[g % GTES] = self.next
            self.next += GRAIN_SECTORS
        self.sink.write([piece], self.grain_host * SECTOR + within)

    def _assemble(self, g: int, within: int, piece: memoryview) -> None:
        if g != self.grain:
            self._grain_done()
            self.grain = g
        self.buf[within : within + len(piece)] = piece

    def _grain_done(self) -> None:
        if self.grain < 0:
            return
        self.batch.append((self.grain, bytes(self.buf)))
        self.buf[:] = bytes(GRAIN)
        self.grain = -1
        if len(self.batch) >= BATCH_GRAINS:
            self._submit()

    def _submit(self) -> None:
        if not self.batch:
            return
        assert self.pool is not None
        self.pending.append(self.pool.submit(_deflate, self.batch))
        self.batch = []
        while len(self.pending) > 2 * self.threads:
            self._write_grains(self.pending.popleft().result())

    def _write_grains(self, grains: list[tuple[int, bytes]]) -> None:
        for g, payload in grains:
            self._enter_table(g)
            self.gt[g % GTES] = self.next
            lba = g * GRAIN_SECTORS
            head = GRAIN_MARKER.pack(lba, len(payload))
            n = len(head) + len(payload)
            pad = bytes(-n % SECTOR)
            self.sink.write([memoryview(head), memoryview(payload), memoryview(pad)], self.next * SECTOR)
            self.next += (n + len(pad)) // SECTOR

    # -- tables -------------------------------------------------------------------------

    def _enter_table(self, g: int) -> None:
        """Grain ``g`` is next: if it lies in another grain table, the current one is final."""
        t = g // GTES
        if t != self.gt_index:
            self._close_table()
            self.gt_index = t

    def _close_table(self) -> None:
        if self.gt_index < 0:
            return
        if self.stream:
            self._marker(GT_BYTES // SECTOR, MARKER_GT)
        self.gd[self.gt_index] = self.next
        self.sink.write([_le(self.gt)], self.next * SECTOR)
        self.next += GT_BYTES // SECTOR
        if not self.stream:
            self.next = -(-self.next // 8) * 8  # keep grains 4 KiB aligned
        self.gt = array("I", [0]) * GTES
        self.gt_index = -1

    def _marker(self, sectors: int, kind: int) -> None:
        raw = MARKER.pack(sectors, 0, kind)
        self.sink.write([memoryview(raw + bytes(SECTOR - len(raw)))], self.next * SECTOR)
        self.next += 1

    def finish(self) -> int:
        try:
            return self._finish()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self) -> int:
        if self.stream:
            self._grain_done()
            self._submit()
            while self.pending:
                self._write_grains(self.pending.popleft().result())
        self._close_table()
        gd_bytes = _le(self.gd)
        gd_sectors = -(-len(gd_bytes) // SECTOR)
        if not self.stream:
            self.sink.write([gd_bytes], self.gd_at * SECTOR)
            self.sink.write([memoryview(self.desc)], DESC_OFFSET * SECTOR)
            self.sink.write([memoryview(header(self.o, self.sectors, self.gd_at, self.overhead))], 0)
            return max(self.next, self.overhead) * SECTOR
        self._marker(gd_sectors, MARKER_GD)
        gd_at = self.next
        self.sink.write([gd_bytes, memoryview(bytes(-len(gd_bytes) % SECTOR))], gd_at * SECTOR)
        self.next += gd_sectors
        self._marker(1, MARKER_FOOTER)
        foot = header(self.o, self.sectors, gd_at, self.overhead)
        self.sink.write([memoryview(foot)], self.next * SECTOR)
        self.next += 1
        self._marker(0, MARKER_EOS)
        self.sink.write([memoryview(self.desc)], DESC_OFFSET * SECTOR)
        self.sink.write([memoryview(header(self.o, self.sectors, GD_AT_END, self.overhead))], 0)
        return self.next * SECTOR


class FlatWriter:
    """monolithicFlat: the guest's bytes at their own offsets in NAME-flat.vmdk (sparse), and
    TARGET, the descriptor naming it, written last."""

    def __init__(self, sink: FileSink, size: int, options: VmdkOptions, path: str) -> None:
        self.sink = sink
        self.sectors = -(-size // SECTOR)
        self.desc = descriptor(path, self.sectors, options, pad=False)
        self.extent = sink.companion(flat_name(path), self.sectors * SECTOR)

    def write_data(self, offset: int, data: memoryview) -> None:
        self.extent.write([data], offset)

    def finish(self) -> int:
        self.sink.write([memoryview(self.desc)], 0)
        return len(self.desc)


def _deflate(grains: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(g, zlib_deflate(data)) for g, data in grains]


def open_writer(sink: FileSink, size: int, values: Mapping[str, OptionValue], path: str) -> ImageWriter:
    o = VmdkOptions.of(values)
    if o.subformat == "monolithicFlat":
        return FlatWriter(sink, size, o, path)
    return VmdkWriter(sink, size, o, path)


def measure(
    size: int, data_runs: Iterable[tuple[int, int]], values: Mapping[str, OptionValue]
) -> tuple[int, int]:
    """(required, fully allocated): every grain touching data stored whole, with its tables.
    For streamOptimized, an upper bound: grains stored uncompressed, each with its marker."""
    o = VmdkOptions.of(values)
    sectors = -(-size // SECTOR)
    size = sectors * SECTOR
    if o.subformat == "monolithicFlat":  # the flat extent; the descriptor is a few hundred bytes
        return size + SECTOR, size + SECTOR
    runs = list(data_runs)
    grains = blocks_touched(runs, GRAIN, size)
    tables = blocks_touched(runs, GT_SPAN, size)
    all_grains, all_tables = -(-size // GRAIN), -(-size // GT_SPAN)
    gd = -(-all_tables * 4 // SECTOR) * SECTOR
    head = (DESC_OFFSET + DESC_SECTORS) * SECTOR + gd + GRAIN
    per_grain = GRAIN + (SECTOR if o.subformat == "streamOptimized" else 0)
    per_table = GT_BYTES + 2 * SECTOR
    tail = 4 * SECTOR

    def total(n_grains: int, n_tables: int) -> int:
        return head + n_grains * per_grain + n_tables * per_table + tail

    return total(grains, tables), total(all_grains, all_tables)
