"""The VHD layer: a fixed disk is a raw range of its file; a dynamic or differencing
disk maps blocks through its BAT and sectors through each block's bitmap.

The BAT is decoded once, in bulk. A block's sector bitmap is decoded into runs
when first asked for and kept in a bounded LRU, so memory stays bounded
whatever the disk's size.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import CorruptImage
from ...extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from ...hostio import data_runs, host_size, pread_exact
from ..api import HostFile, LayerBase, OpenContext, ParentRef
from ..common import MSB_FIRST, LruCache, be_array, bit_runs
from . import spec as S

# At most this many decoded bitmaps (and runs in all of them) are cached
CACHE_BLOCKS = 4096
CACHE_RUNS = 256 * 1024
# A fixed disk answers at most this much per runs() call
FIXED_WINDOW = 1 << 30

_UNALLOCATED_RUN = re.compile(rb"(?:\xff\xff\xff\xff)+")

Block = tuple[tuple[int, int, int], ...]  # (start, end, kind code) in bytes, relative to the block


class VhdLayer(LayerBase):
    format = "vpc"

    def __init__(self, path: str, fd: int, ctx: OpenContext | None = None) -> None:
        self.path = path
        self.fd = fd
        self.file_size = host_size(fd, path)
        self.footer = self._footer()
        f = self.footer
        self.size = S.virtual_size(path, f)
        self.dyn: S.DynamicHeader | None = None
        self.locators: list[tuple[S.Locator, str]] = []
        self._cache: LruCache[int, Block] = LruCache(CACHE_BLOCKS, budget=CACHE_RUNS, cost=len, keep=1)
        if f.disk_type == S.FIXED:
            if self.size > self.file_size - S.FOOTER_SIZE:
                raise CorruptImage(
                    path,
                    f"fixed VHD of {self.size} bytes, but the file holds only "
                    f"{self.file_size - S.FOOTER_SIZE} bytes before its footer",
                    f.at + 48,
                )
            return
        if f.data_offset < S.FOOTER_SIZE or f.data_offset > self.file_size - S.HEADER_SIZE:
            raise CorruptImage(
                path, f"VHD dynamic disk header offset 0x{f.data_offset:x} lies outside the file", f.at + 16
            )
        raw = self._read(f.data_offset, S.HEADER_SIZE)
        dyn = S.parse_dynamic_header(path, raw, f.data_offset, f, self.size, self.file_size)
        self.dyn = dyn
        self.block_size = dyn.block_size
        self.bitmap_size = dyn.bitmap_size
        self.differencing = f.disk_type == S.DIFFERENCING
        self._hole = K_ABSENT if self.differencing else K_ZERO
        nblocks = -(-self.size // dyn.block_size)
        if ctx is not None:
            ctx.charge(path, f"a block table of {nblocks} entries", 8 * nblocks)
        self._bat_raw = self._read(dyn.table_offset, nblocks * 4)
        self._bat = be_array("I", self._bat_raw)
        self._check_bat()
        if self.differencing:
            self.parent = self._parent_ref()

    # -- open ------------------------------------------------------------------
    def _read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            pread_exact(self.fd, self.path, memoryview(buf), offset)
        return bytes(buf)

    def _footer(self) -> S.Footer:
        """The footer: its copy at offset 0 (dynamic and differencing disks), else the one at the end."""
        size = self.file_size
        if size < S.FOOTER_SIZE:
            raise CorruptImage(self.path, f"file of {size} bytes is too small for a VHD footer", 0)
        head = self._read(0, S.FOOTER_SIZE)
        tail = self._read(size - S.FOOTER_SIZE, S.FOOTER_SIZE)
        if head[:8] != S.COOKIE:
            return S.parse_footer(self.path, tail, size - S.FOOTER_SIZE)
        f = S.parse_footer(self.path, head, 0)
        if f.disk_type == S.FIXED:
            raise CorruptImage(
                self.path, "VHD footer at offset 0 says fixed disk, whose footer is only at its end", 60
            )
        if size >= 2 * S.FOOTER_SIZE and tail[:8] == S.COOKIE and tail != head:
            raise CorruptImage(
                self.path,
                "VHD footer at the end of the file differs from its copy at offset 0",
                size - S.FOOTER_SIZE,
            )
        return f

    def _check_bat(self) -> None:
        """Every allocated block (its bitmap and data) lies inside the file, after the footer copy."""
        assert self.dyn is not None
        bat = self._bat
        allocated = len(bat) - bat.count(S.UNALLOCATED)
        if not allocated:
            return
        # in C over the table, no set of its entries: a lying table may hold 16 Mi of them
        most = max(0, self.file_size - S.FOOTER_SIZE) // (self.bitmap_size + self.block_size)
        if allocated > most:
            raise CorruptImage(
                self.path,
                f"VHD block table claims {allocated} allocated blocks, more than the file can hold ({most})",
                self.dyn.table_offset,
            )
        for sector in (max(filter(S.UNALLOCATED.__ne__, bat)), min(filter(S.UNALLOCATED.__ne__, bat))):
            start = sector * S.SECTOR
            if start < S.FOOTER_SIZE or start + self.bitmap_size + self.block_size > self.file_size:
                i = bat.index(sector)
                raise CorruptImage(
                    self.path,
                    f"VHD block {i} at 0x{start:x} lies outside the file (is the image truncated?)",
                    self.dyn.table_offset + 4 * i,
                )

    def _parent_ref(self) -> ParentRef:
        assert self.dyn is not None
        by_code: dict[bytes, str] = {}
        for loc in self.dyn.locators:
            text = S.decode_locator(self.path, loc, self._read(loc.offset, loc.length))
            self.locators.append((loc, text))
            by_code.setdefault(loc.platform, text)
        names = [by_code.get(S.W2RU, ""), by_code.get(S.W2KU, ""), self.dyn.parent_name]
        candidates = tuple(dict.fromkeys(n for n in names if n))
        if not candidates:
            raise CorruptImage(
                self.path,
                "differencing VHD names no parent (no W2ru/W2ku locator, no name)",
                self.dyn.at + 64,
            )
        ident = None if not any(self.dyn.parent_id) else ("vhd-uuid", self.dyn.parent_uuid)
        return ParentRef(candidates, format="vpc", identity=ident, loose=True)

    # -- mapping ---------------------------------------------------------------
    def _block(self, i: int, host: int) -> Block:
        """Block ``i``'s map from its sector bitmap (cached)."""
        b = self._cache.get(i)
        if b is not None:
            return b
        sectors = self.block_size // S.SECTOR
        bitmap = self._read(host, -(-sectors // 8))
        hole = self._hole
        out: list[tuple[int, int, int]] = []

        def add(s: int, e: int, code: int) -> None:
            e = min(e, sectors)
            if s >= e:
                return
            if out and out[-1][2] == code:
                out[-1] = (out[-1][0], e * S.SECTOR, code)
            else:
                out.append((s * S.SECTOR, e * S.SECTOR, code))

        # the first sector is the first byte's most significant bit
        for a, z, present in bit_runs(bitmap.translate(MSB_FIRST), 0, sectors):
            add(a, z, K_DATA if present else hole)
        block = tuple(out)
        self._cache.put(i, block)
        return block

    def runs(self, start: int, end: int) -> Runs:
        """One block's map, or one run of unallocated blocks, or up to 1 GiB of a fixed disk."""
        end = min(end, self.size)
        out = Runs()
        if start >= end:
            return out
        if self.dyn is None:
            stop = min(end, start + FIXED_WINDOW)
            for s, e, is_data in data_runs(self.fd, self.path, start, stop, self.file_size):
                out.add(s, e, K_DATA if is_data else K_ALLOC_ZERO)
            return out
        bs = self.block_size
        i = start // bs
        entry = self._bat[i]
        if entry == S.UNALLOCATED:
            m = _UNALLOCATED_RUN.match(self._bat_raw, 4 * i)
            assert m is not None
            out.add(start, min(end, m.end() // 4 * bs), self._hole)
            return out
        base = i * bs
        stop = min(end, base + bs)
        for s, e, code in self._block(i, entry * S.SECTOR):
            out.add(max(base + s, start), min(base + e, stop), code)
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        if self.dyn is None:
            pread_exact(self.fd, self.path, buf, offset)
            return
        bs = self.block_size
        pos, end = offset, offset + len(buf)
        while pos < end:
            i = pos // bs
            stop = min(end, (i + 1) * bs)
            dst = buf[pos - offset : stop - offset]
            entry = self._bat[i] if i < len(self._bat) else S.UNALLOCATED
            if entry == S.UNALLOCATED:
                dst[:] = bytes(len(dst))
            else:
                host = entry * S.SECTOR + self.bitmap_size + (pos - i * bs)
                pread_exact(self.fd, self.path, dst, host)
            pos = stop

    # -- facts -----------------------------------------------------------------
    def host_files(self) -> tuple[HostFile, ...]:
        return (HostFile(self.path, self.fd),)

    def identity(self, kind: str) -> str | None:
        return self.footer.uuid if kind == "vhd-uuid" else None

    def info(self) -> dict[str, Any]:
        f = self.footer
        out: dict[str, Any] = {"disk-type": f.type_name}
        if self.dyn is not None:
            out["cluster-size"] = self.dyn.block_size  # qemu-img's name for it
            out["block-size"] = self.dyn.block_size
        out["creator"] = f.creator
        out["unique-id"] = f.uuid
        if f.saved_state:
            out["saved-state"] = True
        if self.dyn is not None and self.differencing:
            out["parent-id"] = self.dyn.parent_uuid
            out["parent-name"] = self.dyn.parent_name
            out["locators"] = [f"{loc.code}: {text}" for loc, text in self.locators]
        return out

    def close(self) -> None:
        self._cache.clear()
