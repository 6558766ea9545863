"""Small spec-following writers for ESXi's delta extents (QEMU reads them but cannot make them).

vmfsSparse (COWD), from VMware's "Virtual Disk Format 5.0" and libvmdk's notes:
a 2048-byte header, a grain directory at sector 4, grain tables of 4096
32-bit sector numbers, grains. seSparse, from what QEMU accepts: a constant
header (version 2.1, grains of 8 sectors, tables of 64 sectors, the areas at
the places QEMU checks), a volatile header, a grain directory of
``0x1000000000000000 | table``, grain tables whose entries carry their type
in the top nibble.

Layouts are hand-made: the caller gives each grain's content (or ZERO /
UNMAPPED for seSparse) and the order in which grains and tables are placed in
the file, so grains out of guest order and tables far from their neighbours
are easy to make. Each writer returns the composition it intended: guest
grain index -> bytes (absent grains are not in it: the parent's data).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from pathlib import Path

SECTOR = 512
ZERO = b"ZERO"  # a seSparse zero grain (reads zeros, hides the parent)
UNMAPPED = b"UNMAPPED"  # a seSparse SCSI-unmapped grain (reads zeros too)

Grains = dict[int, bytes]


def _order(keys: Iterable[int], shuffle: int | None) -> list[int]:
    ks = sorted(keys)
    if shuffle is not None:
        random.Random(shuffle).shuffle(ks)
    return ks


def _grain(data: bytes, size: int) -> bytes:
    assert len(data) <= size
    return data.ljust(size, b"\0")


def write_cowd(
    path: Path,
    capacity: int,
    grains: Grains,
    *,
    grain_sectors: int = 8,
    shuffle: int | None = 1,
    parent_name: str = "",
    gap: int = 7,
) -> Grains:
    """A vmfsSparse extent of ``capacity`` bytes (a multiple of 512) holding ``grains``.

    Tables are laid out in a shuffled order with ``gap`` free sectors between
    any two (they share no sector); grains in a shuffled order too.
    """
    gsize = grain_sectors * SECTOR
    gtes = 4096
    span = gtes * gsize
    n_gd = -(-capacity // span)
    gd_sectors = -(-n_gd * 4 // SECTOR)
    tables = sorted({g // gtes for g in grains})
    pos = 4 + gd_sectors
    gt_at: dict[int, int] = {}
    for t in _order(tables, shuffle):
        pos += gap
        gt_at[t] = pos
        pos += gtes * 4 // SECTOR
    grain_at: dict[int, int] = {}
    for g in _order(grains, shuffle):
        grain_at[g] = pos
        pos += grain_sectors
    out = bytearray(pos * SECTOR)
    hdr = struct.pack("<4sIIIIIII", b"COWD", 1, 3, capacity // SECTOR, grain_sectors, 4, n_gd, pos)
    out[: len(hdr)] = hdr
    name = parent_name.encode()
    out[32 : 32 + len(name)] = name
    struct.pack_into("<I", out, 1060, 1)  # generation
    for t, at in gt_at.items():
        struct.pack_into("<I", out, 4 * SECTOR + 4 * t, at)
    for g, at in grain_at.items():
        struct.pack_into("<I", out, gt_at[g // gtes] * SECTOR + 4 * (g % gtes), at)
        out[at * SECTOR : (at + grain_sectors) * SECTOR] = _grain(grains[g], gsize)
    path.write_bytes(bytes(out))
    return {g: _grain(d, gsize) for g, d in grains.items()}


SE_GRAIN = 8 * SECTOR
SE_GTES = 4096
SE_SPAN = SE_GTES * SE_GRAIN  # 16 MiB per grain table


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def sesparse_layout(capacity: int) -> dict[str, tuple[int, int]]:
    """The areas (offset, size in sectors) of a seSparse extent, as QEMU checks them."""
    tables = capacity // SECTOR // (SE_GTES * 8)
    gd = _round(-(-tables * 8 // SECTOR), 2048)
    gts = _round(tables * 64, 2048)
    fb = _round(-(-tables // (8 * SECTOR)), 2048)
    a: dict[str, tuple[int, int]] = {
        "volatile": (1, 1),
        "journal header": (2, 2),
        "journal": (2048, 2048),
        "gd": (4096, gd),
    }
    a["gts"] = (4096 + gd, gts)
    a["free bitmap"] = (a["gts"][0] + gts, fb)
    a["back map"] = (a["free bitmap"][0] + fb, gts)
    a["grains"] = (a["back map"][0] + gts, 0)
    return a


def grain_entry(index: int) -> int:
    """An allocated seSparse grain table entry for grain number ``index`` of the grain area."""
    return 0x3000000000000000 | ((index & 0xFFF) << 48) | (index >> 12)


def write_sesparse(
    path: Path,
    capacity: int,
    grains: Grains,
    *,
    shuffle: int | None = 2,
    replay: bool = False,
    skip_slots: int = 3,
    first: int = 5,
) -> Grains:
    """A seSparse extent of ``capacity`` bytes (a multiple of 16 MiB, as QEMU's checks need).

    ``grains`` values are data, ZERO or UNMAPPED. Table slots are taken in a
    shuffled order, ``skip_slots`` apart; data grains are stored shuffled. The
    file is sparse (its reserved areas are holes). Data grains are numbered from ``first``
    in the grain area (past 4095, the entry's high bits are used).
    """
    assert capacity % SE_SPAN == 0
    a = sesparse_layout(capacity)
    tables = sorted({g // SE_GTES for g in grains})
    slot = {t: 1 + k * skip_slots for k, t in enumerate(_order(tables, shuffle))}
    assert all(s * 64 < a["gts"][1] for s in slot.values()), "too few table slots for skip_slots"
    data = [g for g in _order(grains, shuffle) if grains[g] not in (ZERO, UNMAPPED)]
    index = {g: k + first for k, g in enumerate(data)}  # the area's first grains stay unused
    hdr = struct.pack(
        "<26Q",
        0xCAFEBABE,
        0x0000000200000001,
        capacity // SECTOR,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        *(
            v
            for k in ("volatile", "journal header", "journal", "gd", "gts", "free bitmap", "back map")
            for v in a[k]
        ),
        a["grains"][0],
        (max(index.values(), default=0) + 1) * 8,
    )
    with open(path, "wb") as f:
        f.write(hdr.ljust(SECTOR, b"\0"))
        f.write(
            struct.pack("<4Q", 0xCAFECAFE, len(tables) * skip_slots + 1, 1, int(replay)).ljust(SECTOR, b"\0")
        )
        gd0, gt0, g0 = a["gd"][0] * SECTOR, a["gts"][0] * SECTOR, a["grains"][0] * SECTOR
        for t, s in slot.items():
            f.seek(gd0 + 8 * t)
            f.write(struct.pack("<Q", 0x1000000000000000 | s))
        for g, d in grains.items():
            e = (
                0x2000000000000000
                if d == ZERO
                else 0x1000000000000000
                if d == UNMAPPED
                else grain_entry(index[g])
            )
            f.seek(gt0 + slot[g // SE_GTES] * 64 * SECTOR + 8 * (g % SE_GTES))
            f.write(struct.pack("<Q", e))
        for g in data:
            f.seek(g0 + index[g] * SE_GRAIN)
            f.write(_grain(grains[g], SE_GRAIN))
        f.truncate(max(f.tell(), g0 + SE_GRAIN, (a["back map"][0] + 1) * SECTOR))
    return {g: (bytes(SE_GRAIN) if d in (ZERO, UNMAPPED) else _grain(d, SE_GRAIN)) for g, d in grains.items()}


def write_descriptor(
    path: Path,
    create_type: str,
    extents: list[tuple[int, str, str]],
    *,
    cid: int = 0x1234ABCD,
    parent_cid: int = 0xFFFFFFFF,
    parent_hint: str | None = None,
) -> Path:
    """An ESXi-style descriptor: ``extents`` are (sectors, TYPE, file name)."""
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        'isNativeSnapshot="no"',
        f'createType="{create_type}"',
    ]
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description"]
    lines += [f'RW {n} {t} "{name}"' for n, t, name in extents]
    lines += [
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.adapterType = "lsilogic"',
        'ddb.virtualHWVersion = "14"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def compose(size: int, layers: list[tuple[int, Grains]], base: bytes | None = None) -> bytes:
    """What a chain reads: the base's bytes, then each delta's (grain size, grains), bottom first."""
    out = bytearray(size)
    if base is not None:
        out[: len(base)] = base[:size]
    for grain, grains in layers:
        for g, d in grains.items():
            s = g * grain
            chunk = bytes(grain) if d in (ZERO, UNMAPPED) else d.ljust(grain, b"\0")
            out[s : min(size, s + grain)] = chunk[: max(0, min(grain, size - s))]
    return bytes(out)


DATASTORE = "/vmfs/volumes/datastore1/vm"  # where ESXi's absolute parent hints point


def write_thin_flat(path: Path, size: int, runs: dict[int, bytes], *, image: bool = True) -> bytes:
    """A thin ``-flat.vmdk`` as a copy off VMFS leaves it: a sparse file with data at ``runs``.

    Returns its bytes (b"" without ``image``: a large one)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at, d in runs.items():
            f.seek(at)
            f.write(d)
    if not image:
        return b""
    out = bytearray(size)
    for at, d in runs.items():
        out[at : at + len(d)] = d
    return bytes(out)


def esxi_chain(
    d: Path, size: int, delta_types: tuple[str, ...] = ("vmfsSparse", "seSparse"), *, twin: bool = True
) -> tuple[Path, bytes, Path | None]:
    """vm.vmdk (vmfsThin) + vm-flat.vmdk, then one snapshot per ``delta_types`` entry, as ESXi
    names and links them (absolute /vmfs/volumes parent hints, parentCID).

    Returns the top descriptor, the bytes the chain should read, and (``twin``) the top of
    a twin chain over the same extent files that QEMU can open: createType ``vmfs`` (QEMU
    refuses vmfsThin) and parent hints relative to the folder (QEMU cannot map /vmfs names).
    """
    M = 1 << 20
    base = write_thin_flat(
        d / "vm-flat.vmdk", size, {0: b"\xa1" * M, 20 * M: b"\xa2" * (M // 2), size - 4096: b"\xa3" * 4096}
    )
    sectors = size // SECTOR
    cid = 0xB0000001
    write_descriptor(d / "vm.vmdk", "vmfsThin", [(sectors, "VMFS", "vm-flat.vmdk")], cid=cid)
    if twin:
        write_descriptor(d / "vm-q.vmdk", "vmfs", [(sectors, "VMFS", "vm-flat.vmdk")], cid=cid)
    layers: list[tuple[int, Grains]] = []
    parent, parent_q = "vm.vmdk", "vm-q.vmdk"
    for n, kind in enumerate(delta_types, 1):
        name = f"vm-{n:06d}"
        # each snapshot writes its own pattern: some grains over the base's data, some over
        # its holes, grains that straddle nothing, a table of its own far up the disk
        fill = 0x10 * (n + 1)
        g0 = (n - 1) * 3
        if kind == "seSparse":
            grains: Grains = {
                g0: bytes([fill]) * 4096,
                255: ZERO,
                256: UNMAPPED,
                4096 * 2 + n: bytes([fill + 1]) * 4096,
            }
            grains[5120 + n] = bytes([fill + 2]) * 100
            ext = f"{name}-sesparse.vmdk"
            layers.append((SE_GRAIN, write_sesparse(d / ext, size, grains)))
            etype = "SESPARSE"
        else:
            grains = {
                g0: bytes([fill]) * 4096,
                4096 * 2 + 7 + n: bytes([fill + 1]) * 4096,
                5000 + n: bytes([fill + 2]) * 7,
            }
            ext = f"{name}-delta.vmdk"
            layers.append((4096, write_cowd(d / ext, size, grains, shuffle=n)))
            etype = "VMFSSPARSE"
        ext_line = [(sectors, etype, ext)]
        write_descriptor(
            d / f"{name}.vmdk",
            kind,
            ext_line,
            cid=cid + n,
            parent_cid=cid + n - 1,
            parent_hint=f"{DATASTORE}/{parent}",
        )
        if twin:
            write_descriptor(
                d / f"{name}-q.vmdk",
                kind,
                ext_line,
                cid=cid + n,
                parent_cid=cid + n - 1,
                parent_hint=parent_q,
            )
        parent, parent_q = f"{name}.vmdk", f"{name}-q.vmdk"
    top = d / parent
    return top, compose(size, layers, base), (d / parent_q if twin else None)
