"""Reading a VMDK that flatfs wrote without flatfs: libvmdk, the descriptor's keys, and a walk of a
stream-optimized extent's markers from the bytes (VMware Virtual Disk Format 5.0)."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GRAIN = 64 * 1024  # flatfs maps a VMDK grain as a whole


def libvmdk(path: Path) -> bytes:
    import pyvmdk

    h = pyvmdk.handle()
    h.open(str(path))
    h.open_extent_data_files()
    try:
        return h.read_buffer_at_offset(h.get_media_size(), 0)
    finally:
        h.close()


def descriptor(raw: bytes) -> dict[str, str]:
    h = HEADER.unpack_from(raw)
    text = raw[h[5] * 512 : (h[5] + h[6]) * 512].rstrip(b"\0").decode()
    keys = dict(re.findall(r'^([\w.]+)\s*=\s*"?([^"\n]*)"?$', text, re.M))
    keys["extent"] = re.search(r"^RW \d+ SPARSE .*$", text, re.M).group(0)
    return keys


def walk_stream(raw: bytes, want: bytes) -> dict[str, int]:
    """Every marker of a stream-optimized extent, in order, checked against the guest's bytes."""
    magic, version, flags, capacity, grain, _d, _ds, gtes, _rgd, gd, overhead, _u, nl, algo = (
        HEADER.unpack_from(raw)
    )
    assert (magic, version, flags, algo, nl) == (b"KDMV", 3, 0x30001, 1, b"\n \r\n")
    assert gd == GD_AT_END and capacity * 512 == len(want) and grain == 128 and gtes == 512
    pos, grains, tables, seen_gd = overhead * 512, {}, {}, None
    while True:
        lba, size = struct.unpack_from("<QI", raw, pos)
        if size:  # a grain: its LBA, its deflated bytes
            assert seen_gd is None, "a grain after the grain directory"
            g = want[lba * 512 : lba * 512 + grain * 512]
            assert zlib.decompress(raw[pos + 12 : pos + 12 + size])[: len(g)] == g
            grains[lba // grain] = pos // 512
            pos += -(-(12 + size) // 512) * 512
            continue
        kind = struct.unpack_from("<I", raw, pos + 12)[0]
        if kind == 0:  # end of stream: the last sector of the file
            assert pos + 512 == len(raw) and raw[pos:] == bytes(512)
            break
        body = raw[pos + 512 : pos + 512 + lba * 512]
        if kind == 1:
            tables[pos // 512 + 1] = struct.unpack(f"<{gtes}I", body)
        elif kind == 2:
            seen_gd = pos // 512 + 1
            directory = struct.unpack_from(f"<{-(-capacity // (grain * gtes))}I", body)
        else:  # the footer: the header again, with the directory's offset, just before the EOS
            assert kind == 3 and pos == len(raw) - 1536
            footer = HEADER.unpack_from(body)
            assert footer[9] == seen_gd and footer[:9] == HEADER.unpack_from(raw)[:9]
        pos += 512 + lba * 512
    assert seen_gd is not None
    # the directory names the tables, the tables the grain markers: and nothing else
    for t, at in enumerate(directory):
        if at:
            for i, g in enumerate(tables[at]):
                if g:
                    assert grains[t * gtes + i] == g
    assert sum(1 for t in tables.values() for g in t if g) == len(grains)
    for g in range(-(-len(want) // (grain * 512))):
        if g not in grains:
            chunk = want[g * grain * 512 : (g + 1) * grain * 512]
            assert chunk.count(0) == len(chunk), g
    return {"grains": len(grains), "tables": len(tables)}
