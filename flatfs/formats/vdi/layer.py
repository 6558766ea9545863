"""The VDI layer: open and validate, then map guest ranges through the block map.

The block map is read and decoded one window at a time (64 KiB of map, 16 GiB
of guest), in bulk, into a bounded LRU: memory stays bounded whatever the
disk size. A differencing image names its parent only by UUID; the names
tried first come from the VM's ``.vbox`` media registry, if one is found.
"""

from __future__ import annotations

import os
from array import array
from typing import Any
from xml.parsers.expat import ExpatError

from ...errors import CorruptImage, ImageIOError
from ...extents import K_ABSENT, K_ALLOC_ZERO, K_DATA, K_ZERO, Runs
from ...hostio import data_runs, host_size, pread_exact, pread_padded
from ..api import HostFile, LayerBase, OpenContext, ParentRef
from ..common import LruCache, le_array
from . import registry
from .spec import (
    BLOCK_ZERO,
    HEAD_BYTES,
    NULL_UUID,
    Header,
    parse_header,
)

WINDOW = 16384  # block map entries decoded at a time (64 KiB of map)
CACHE_WINDOWS = 64  # decoded windows kept (4 MiB at most)
MAX_REGISTRIES = 8  # .vbox files looked at per folder


class VdiLayer(LayerBase):
    format = "vdi"

    def __init__(self, path: str, fd: int, ctx: OpenContext) -> None:
        self.path = path
        self.fd = fd
        self.file_size = host_size(fd, path)
        try:
            head = os.pread(fd, HEAD_BYTES, 0)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc, 0) from None
        hdr = parse_header(path, head, self.file_size)
        self.header: Header = hdr
        self.size = hdr.size
        self.block_size = hdr.block_size
        # an unallocated block: zeros at the bottom, the parent's bytes in a differencing image
        self._free = K_ABSENT if hdr.is_diff else K_ZERO
        self._cache: LruCache[int, array[int]] = LruCache(CACHE_WINDOWS)
        self.registry: str | None = None
        self.parent = None
        if hdr.is_diff:
            names = self._registry_names(ctx)
            identity = None
            if hdr.uuid_parent_modify != NULL_UUID:
                identity = ("vdi-uuid-modify", hdr.uuid_parent_modify)
            self.parent = ParentRef(
                names, "vdi", identity=identity, by_id=("vdi-uuid-create", hdr.uuid_linkage)
            )

    # -- the parent's name, from the VM's media registry ----------------------
    def _registry_names(self, ctx: OpenContext) -> tuple[str, ...]:
        """The parent's location as a ``.vbox`` registry in this folder or the one above records it."""
        want = self.header.uuid_linkage
        here = os.path.dirname(os.path.abspath(self.path))
        for rel in ("", ".."):
            folder = os.path.normpath(os.path.join(here, rel))
            try:
                with os.scandir(folder) as it:
                    names = sorted(e.name for e in it if e.name.lower().endswith(".vbox"))
            except OSError:
                continue
            for name in names[:MAX_REGISTRIES]:
                data = ctx.read_sidecar(self.path, os.path.join(rel, name), registry.MAX_REGISTRY_BYTES)
                if data is None:
                    continue
                try:
                    disks = registry.hard_disks(data)
                except (registry.RefusedXML, ExpatError, ValueError):
                    continue  # a hint only: the scan by UUID still finds the parent
                loc = disks.get(want)
                if not loc:
                    continue
                self.registry = os.path.join(folder, name)
                if os.path.isabs(loc):
                    return (loc,)
                return (os.path.normpath(os.path.join(rel, loc)),)
        return ()

    # -- the block map --------------------------------------------------------
    def _window(self, w: int) -> array[int]:
        t = self._cache.get(w)
        if t is not None:
            return t
        first = w * WINDOW
        n = min(WINDOW, self.header.blocks - first)
        raw = bytearray(n * 4)
        pread_exact(self.fd, self.path, memoryview(raw), self.header.offset_bmap + first * 4)
        t = le_array("I", raw)
        self._cache.put(w, t)
        return t

    def _bad(self, block: int, entry: int) -> CorruptImage:
        return CorruptImage(
            self.path,
            f"block map entry {block} points to block {entry}, past the {self.header.blocks} blocks",
            self.header.offset_bmap + 4 * block,
        )

    def _host(self, entry: int) -> int:
        return self.header.offset_data + entry * self.block_size

    def runs(self, start: int, end: int) -> Runs:
        """At most one window of the block map. A corrupt entry ends the answer before it."""
        end = min(end, self.size)
        bs = self.block_size
        w = start // bs // WINDOW
        end = min(end, (w + 1) * WINDOW * bs)
        table = self._window(w)
        base = w * WINDOW
        nblocks = self.header.blocks
        out = Runs()
        pos = start
        # a pending stretch of allocated blocks, contiguous in the file too: [gs, pos) at host hs
        gs = hs = -1
        while pos < end:
            b = pos // bs
            stop = min((b + 1) * bs, end)
            entry = table[b - base]
            if entry < BLOCK_ZERO:
                if entry >= nblocks:
                    if gs >= 0:
                        self._add_data(out, gs, pos, hs)
                    if len(out):
                        return out
                    raise self._bad(b, entry)
                host = self._host(entry) + (pos - b * bs)
                if gs >= 0 and hs + (pos - gs) != host:
                    self._add_data(out, gs, pos, hs)
                    gs = -1
                if gs < 0:
                    gs, hs = pos, host
            else:
                if gs >= 0:
                    self._add_data(out, gs, pos, hs)
                    gs = -1
                out.add(pos, stop, K_ZERO if entry == BLOCK_ZERO else self._free)
            pos = stop
        if gs >= 0:
            self._add_data(out, gs, pos, hs)
        return out

    def _add_data(self, out: Runs, start: int, end: int, host: int) -> None:
        # QEMU's block status asks the host file too: an allocated block over
        # a hole (a static image is created sparse) reads as zeros.
        for s, e, is_data in data_runs(self.fd, self.path, host, host + (end - start), self.file_size):
            out.add(start + (s - host), start + (e - host), K_DATA if is_data else K_ALLOC_ZERO)

    def readinto(self, offset: int, buf: memoryview) -> None:
        bs = self.block_size
        end = offset + len(buf)
        pos = offset
        nblocks = self.header.blocks
        while pos < end:
            b = pos // bs
            stop = min((b + 1) * bs, end)
            entry = self._window(b // WINDOW)[b % WINDOW]
            dst = buf[pos - offset : stop - offset]
            if entry < BLOCK_ZERO:
                if entry >= nblocks:
                    raise self._bad(b, entry)
                # past the end of the file as it was at open, QEMU reads zeros
                pread_padded(self.fd, self.path, dst, self._host(entry) + (pos - b * bs), self.file_size)
            else:
                dst[:] = bytes(len(dst))
            pos = stop

    # -- facts ------------------------------------------------------------------
    def host_files(self) -> tuple[HostFile, ...]:
        return (HostFile(self.path, self.fd),)

    def identity(self, kind: str) -> str | None:
        if kind == "vdi-uuid-create":
            return self.header.uuid_create
        if kind == "vdi-uuid-modify":
            return self.header.uuid_modify
        return None

    def info(self) -> dict[str, Any]:
        h = self.header
        out: dict[str, Any] = {
            "vdi-type": h.type_name,
            "block-size": h.block_size,
            "vdi-uuid-create": h.uuid_create,
            "vdi-uuid-modify": h.uuid_modify,
        }
        if h.flags:
            out["vdi-flags"] = h.flags
        if h.is_diff:
            out["vdi-uuid-linkage"] = h.uuid_linkage
            out["vdi-uuid-parent-modify"] = h.uuid_parent_modify
            out["vdi-registry"] = self.registry
        return out

    def close(self) -> None:
        self._cache.clear()
