"""The VHDX layer: headers, log, regions and metadata at open; the BAT decoded in bulk on demand.

Block states follow MS-VHDX 2.5.1: NOT_PRESENT asks the parent (zeros
without one); UNDEFINED, ZERO and UNMAPPED read zeros, decided here;
FULLY_PRESENT reads the payload block; PARTIALLY_PRESENT (only in a
differencing disk) reads per logical sector through the chunk's sector
bitmap block: a set bit is this layer's data, a clear bit asks the parent.
"""

from __future__ import annotations

from array import array
from typing import Any

from ...errors import CorruptImage
from ...extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from ...hostio import data_runs, host_size, pread_exact
from ..api import HostFile, LayerBase, OpenContext, ParentRef
from ..common import NONZERO, LruCache, bit_runs, le_array, same_until
from . import spec as S
from .log import FileView

_NO_DATA = (S.PAYLOAD_NOT_PRESENT, S.PAYLOAD_UNDEFINED, S.PAYLOAD_ZERO, S.PAYLOAD_UNMAPPED)
WINDOW_ENTRIES = 8192  # BAT entries decoded per window (64 KiB), about
CACHE_WINDOWS = 64  # decoded BAT windows kept (at most ~64 x 256 KiB)
IDENTITY = "vhdx-data-write-guid"


class VhdxLayer(LayerBase):
    format = "vhdx"

    def __init__(self, path: str, fd: int, ctx: OpenContext | None = None) -> None:
        self.path, self.fd = path, fd
        self.file_size = host_size(fd, path)
        if self.file_size < S.REGION_TABLE_OFFSETS[1] + S.REGION_TABLE_SIZE:
            raise CorruptImage(path, f"file is too short for a VHDX ({self.file_size} bytes)", 0)
        sig = self._pread(0, 8)
        if sig != S.FILE_ID_SIGNATURE:
            raise CorruptImage(path, "no VHDX file type identifier", 0)
        first = self._pread(S.HEADER_OFFSETS[0], S.HEADER_SIZE)
        second = self._pread(S.HEADER_OFFSETS[1], S.HEADER_SIZE)
        self.header = S.current_header(path, first, second, self.file_size)
        # From here on every read sees the replayed log
        self.view = FileView(path, fd, self.file_size, self.header)
        try:
            self.regions = self._regions()
            r = self.regions
            table = self.view.read(r.metadata_offset, S.METADATA_TABLE_SIZE)
            items = S.parse_metadata_table(path, table, r.metadata_offset, r.metadata_length)
            self.meta = md = S.parse_metadata(
                path,
                items,
                lambda it: self.view.read(r.metadata_offset + it.offset, it.length),
                r.metadata_offset,
            )
        except CorruptImage as exc:
            if self.view.state != "empty":
                raise
            # The header names a log none of whose entries is valid: the file is read as it
            # is (as QEMU does); say so, since the damage may be the log's
            raise CorruptImage(
                path, f"{exc.reason} (the header names a log, but it holds no valid entry)", exc.offset
            ) from None
        if md.bat_entries * 8 > r.bat_length:
            raise CorruptImage(
                path,
                f"BAT region holds {r.bat_length // 8} entries, the disk needs {md.bat_entries}",
                r.bat_offset,
            )
        self.size = md.virtual_size
        self.block_size = md.block_size
        self.chunk_ratio = md.chunk_ratio
        self.nblocks = md.data_blocks
        self.sectors_per_block = md.block_size // md.logical_sector
        self.window_chunks = max(1, WINDOW_ENTRIES // (self.chunk_ratio + 1))
        self.window_blocks = self.window_chunks * self.chunk_ratio
        self._cache: LruCache[int, tuple[array[int], bytes]] = LruCache(CACHE_WINDOWS)
        self._templates: dict[int, memoryview] = {}  # no-data entry value -> that entry repeated
        self.parent: ParentRef | None = None
        if md.has_parent:
            loc = md.locator
            self.parent = ParentRef(
                candidates=tuple(loc[k] for k in S.PARENT_PATH_KEYS if loc.get(k)),
                format="vhdx",
                identity=(IDENTITY, S.linkage(loc["parent_linkage"])),
                loose=True,
            )

    # -- open ----------------------------------------------------------------
    def _pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(max(0, min(n, self.file_size - offset)))
        pread_exact(self.fd, self.path, memoryview(buf), offset)
        return bytes(buf)

    def _regions(self) -> S.Regions:
        """The first region table that is valid (both copies are written alike)."""
        log = (self.header.log_offset, self.header.log_length)
        error: Exception | None = None
        for at in S.REGION_TABLE_OFFSETS:
            buf = self.view.read(at, S.REGION_TABLE_SIZE)
            try:
                return S.parse_region_table(self.path, buf, at, self.view.size, log)
            except CorruptImage as exc:
                error = error or exc
        assert error is not None
        raise error

    # -- the BAT -------------------------------------------------------------
    def _window(self, w: int) -> tuple[array[int], bytes]:
        """BAT entries of window ``w`` (whole chunks: payload entries, then the bitmap entry)."""
        got = self._cache.get(w)
        if got is not None:
            return got
        first = w * self.window_chunks * (self.chunk_ratio + 1)
        count = min(self.window_chunks * (self.chunk_ratio + 1), self.meta.bat_entries - first)
        raw = self.view.read(self.regions.bat_offset + 8 * first, 8 * count)
        entries = le_array("Q", raw)
        self._cache.put(w, (entries, raw))
        return entries, raw

    def _entry_at(self, w: int, local: int) -> int:
        """Absolute file offset of BAT entry ``local`` of window ``w`` (for errors)."""
        first = w * self.window_chunks * (self.chunk_ratio + 1)
        return self.regions.bat_offset + 8 * (first + local)

    def _local(self, block: int) -> tuple[int, int]:
        """(window, index in the window) of a payload block's BAT entry."""
        w, rel = divmod(block, self.window_blocks)
        return w, rel + rel // self.chunk_ratio

    def _block_of(self, w: int, local: int) -> int:
        """The first payload block at or after window entry ``local``."""
        chunk, r = divmod(local, self.chunk_ratio + 1)
        return w * self.window_blocks + chunk * self.chunk_ratio + min(r, self.chunk_ratio)

    def _block_offset(self, entry: int, w: int, local: int, block: int) -> int:
        off = (entry >> S.OFFSET_SHIFT) << 20
        need = min(self.block_size, self.size - block * self.block_size)
        if off < S.MiB or off + need > self.view.size:
            raise CorruptImage(
                self.path,
                f"BAT entry for block {block} points to 0x{off:x}, outside the file",
                self._entry_at(w, local),
            )
        return off

    def _bitmap(self, w: int, local: int, block: int) -> bytes:
        """The sector bitmap bits of ``block`` (one bit per logical sector, least significant first)."""
        entries, _ = self._window(w)
        chunk_local = local // (self.chunk_ratio + 1)
        sb_local = chunk_local * (self.chunk_ratio + 1) + self.chunk_ratio
        at = self._entry_at(w, sb_local)
        if sb_local >= len(entries):
            raise CorruptImage(self.path, f"block {block} is partially present but has no sector bitmap", at)
        e = entries[sb_local]
        off = (e >> S.OFFSET_SHIFT) << 20
        if e & S.STATE_MASK != S.SB_PRESENT:
            raise CorruptImage(
                self.path, f"block {block} is partially present but its sector bitmap is not", at
            )
        if off < S.MiB or off + S.SECTOR_BITMAP_BLOCK > self.view.size:
            raise CorruptImage(self.path, f"sector bitmap block at 0x{off:x} lies outside the file", at)
        nbytes = self.sectors_per_block // 8
        return self.view.read(off + (block % self.chunk_ratio) * nbytes, nbytes)

    def runs(self, start: int, end: int) -> Runs:
        """At most one BAT window's worth. A corrupt entry ends the answer before it."""
        end = min(end, self.size)
        out = Runs()
        bs = self.block_size
        block = start // bs
        w = block // self.window_blocks
        wend = min((w + 1) * self.window_blocks, self.nblocks)
        entries, raw = self._window(w)
        pos = start
        try:
            while pos < end and block < wend:
                _, local = self._local(block)
                e = entries[local]
                state = e & S.STATE_MASK
                if e == 0 or (state in _NO_DATA and e >> S.OFFSET_SHIFT == 0):
                    # A run of blocks with the same entry and no data (QEMU's dynamic disks say
                    # ZERO for every block) is one piece: cost follows the data, not the size.
                    # Sector bitmap entries inside the run end it, unless they match too.
                    last = self._same_until(raw, local, e)
                    nxt = self._block_of(w, last) if last < len(entries) else wend
                    nxt = max(nxt, block + 1)
                    stop = min(nxt * bs, end)
                    out.add(pos, stop, K_ABSENT if state == S.PAYLOAD_NOT_PRESENT else K_ZERO)
                    pos, block = stop, nxt
                    continue
                stop = min((block + 1) * bs, end)
                self._classify(out, e, w, local, block, pos, stop)
                pos, block = stop, block + 1
        except CorruptImage:
            if len(out):
                return out
            raise
        return out

    def _same_until(self, raw: bytes, local: int, e: int) -> int:
        """The first window entry at or after ``local`` that differs from ``e`` (a no-data entry).

        Whole windows and whole chunks are compared with one memcmp against a
        template of ``e``; only a mixed chunk is searched entry by entry.
        """
        n = len(raw) // 8
        if e < 8:  # a bare state (no reserved bits): one of at most eight templates
            tmpl = self._templates.get(e)
            if tmpl is None:
                full = self.window_chunks * (self.chunk_ratio + 1)
                tmpl = self._templates[e] = memoryview(e.to_bytes(8, "little") * full)
            if raw.startswith(tmpl[: len(raw) - 8 * local], 8 * local):
                return n
            sb = (local // (self.chunk_ratio + 1)) * (self.chunk_ratio + 1) + self.chunk_ratio
            if sb > local and raw.startswith(tmpl[: 8 * (sb - local)], 8 * local):
                return sb
        if e == 0:
            m = NONZERO.search(raw, 8 * local)
            return m.start() // 8 if m else n
        return same_until(raw, local, 8)

    def _classify(self, out: Runs, e: int, w: int, local: int, block: int, pos: int, stop: int) -> None:
        state = e & S.STATE_MASK
        base = block * self.block_size
        if state == S.PAYLOAD_NOT_PRESENT:
            out.add(pos, stop, K_ABSENT)
        elif state in (S.PAYLOAD_UNDEFINED, S.PAYLOAD_ZERO, S.PAYLOAD_UNMAPPED):
            out.add(pos, stop, K_ZERO)
        elif state == S.PAYLOAD_FULLY_PRESENT:
            off = self._block_offset(e, w, local, block)
            host = off + (pos - base)
            if self.view.touches(host, host + (stop - pos)):
                out.add(pos, stop, K_DATA)
                return
            # A block over a hole of the host file reads zeros: allocated, but no data to read
            for hs, he, is_data in data_runs(self.fd, self.path, host, host + (stop - pos), self.file_size):
                out.add(pos + (hs - host), pos + (he - host), K_DATA if is_data else K_ALLOC_ZERO)
        elif state == S.PAYLOAD_PARTIALLY_PRESENT:
            if not self.meta.has_parent:
                raise CorruptImage(
                    self.path,
                    f"block {block} is partially present in a disk without a parent",
                    self._entry_at(w, local),
                )
            self._block_offset(e, w, local, block)
            bits = self._bitmap(w, local, block)
            ss = self.meta.logical_sector
            for a, b, present in bit_runs(bits, (pos - base) // ss, -(-(stop - base) // ss)):
                out.add(max(pos, base + a * ss), min(stop, base + b * ss), K_DATA if present else K_ABSENT)
        else:
            raise CorruptImage(
                self.path, f"BAT entry for block {block} has invalid state {state}", self._entry_at(w, local)
            )

    # -- reading -------------------------------------------------------------
    def readinto(self, offset: int, buf: memoryview) -> None:
        """Only called for DATA: the bytes are at the same place in this layer's payload block."""
        bs = self.block_size
        done = 0
        while done < len(buf):
            pos = offset + done
            block, rel = divmod(pos, bs)
            n = min(len(buf) - done, bs - rel)
            w, local = self._local(block)
            e = self._window(w)[0][local]
            if e & S.STATE_MASK not in (S.PAYLOAD_FULLY_PRESENT, S.PAYLOAD_PARTIALLY_PRESENT):
                raise CorruptImage(self.path, f"block {block} has no data to read", self._entry_at(w, local))
            off = self._block_offset(e, w, local, block)
            self.view.readinto(off + rel, buf[done : done + n])
            done += n

    # -- facts ---------------------------------------------------------------
    def identity(self, kind: str) -> str | None:
        if kind == IDENTITY:
            return S.linkage(str(self.header.data_write_guid))
        return None

    def host_files(self) -> tuple[HostFile, ...]:
        return (HostFile(self.path, self.fd),)

    def info(self) -> dict[str, Any]:
        md = self.meta
        kind = "differencing" if md.has_parent else "fixed" if md.leave_blocks_allocated else "dynamic"
        out: dict[str, Any] = {
            "disk-type": kind,
            "block-size": md.block_size,
            "logical-sector-size": md.logical_sector,
            "physical-sector-size": md.physical_sector,
            "data-write-guid": S.linkage(str(self.header.data_write_guid)),
        }
        out.update(self.view.info())
        if md.has_parent:
            out["parent-locator"] = dict(md.locator)
        return out

    def close(self) -> None:
        self._cache.clear()
