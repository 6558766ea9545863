"""Build VMDK chains with qemu-img/qemu-io, and compare flatfs with QEMU (and libvmdk) on them."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from flatfs import OpenOptions, open_chain

from .cli import flatfs
from .qemu import Qemu, flatfs_map, project_map

SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
SPARSE_SUBFORMATS = ("monolithicSparse", "twoGbMaxExtentSparse")  # the ones that take a backing file


def create(
    q: Qemu, path: Path, size: int | str, subformat: str, *, backing: Path | None = None, opts: str = ""
) -> Path:
    o = ",".join(filter(None, [f"subformat={subformat}", opts]))
    return q.create(
        path, size, fmt="vmdk", opts=o, backing=backing.name if backing else None, backing_fmt="vmdk"
    )


def checks_out(q: Qemu, image: Path, scratch: Path, *args: str) -> None:
    """flatfs agrees with QEMU on ``image``: the map, then both converts compared by qemu-img and checked."""
    with open_chain(image, OpenOptions(ignore_parent_id="--ignore-parent-id" in args)) as chain:
        ours = project_map(flatfs_map(chain))
        size = chain.size
    assert ours == project_map(q.map(image)), image
    raw = scratch / f"{image.stem}.out.raw"
    qc = scratch / f"{image.stem}.out.qcow2"
    flatfs("convert", "-O", "raw", *args, image, raw)
    assert raw.stat().st_size == size
    r = q.img("compare", "-f", "vmdk", "-F", "raw", image, raw, check=False, cwd=image.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    flatfs("convert", *args, image, qc)
    q.img("check", qc)
    r = q.img("compare", "-f", "vmdk", "-F", "qcow2", image, qc, check=False, cwd=image.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    raw.unlink()
    qc.unlink()


def libvmdk_reads(image: Path, offset: int, n: int) -> bytes:
    """What libvmdk (pyvmdk) reads at ``offset`` of the single image (no parent)."""
    import pyvmdk

    h = pyvmdk.handle()
    h.open(str(image))
    try:
        h.open_extent_data_files()
        return bytes(h.read_buffer_at_offset(n, offset))
    finally:
        h.close()


# -- a streamOptimized disk written as a stream (GD at the end, found through the footer) --------

SECTOR = 512
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")


def _header(capacity: int, grain: int, gd: int, desc_sectors: int, overhead: int) -> bytes:
    flags = 1 | 2 | (1 << 16) | (1 << 17)  # newline test, redundant GT, compressed, markers
    h = _HEADER.pack(
        b"KDMV", 3, flags, capacity, grain, 1, desc_sectors, 512, 0, gd, overhead, 0, b"\n \r\n", 1
    )
    return h.ljust(SECTOR, b"\0")


def _pad(b: bytes) -> bytes:
    return b + bytes(-len(b) % SECTOR)


def write_stream_vmdk(path: Path, size: int, grains: dict[int, bytes], *, grain_sectors: int = 128) -> None:
    """A streamOptimized VMDK as VMware's exporters write it: header with GD_AT_END,
    the descriptor, grains behind markers, each GT behind a GT marker, the GD behind a
    GD marker, then footer marker, footer and end-of-stream marker. ``grains``: grain
    index -> its bytes (at most one grain)."""
    g = grain_sectors * SECTOR
    capacity = -(-size // SECTOR)
    desc = (
        '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="streamOptimized"\n'
        f'RW {capacity} SPARSE "{path.name}"\nddb.adapterType = "lsilogic"\n'
    ).encode()
    dsec = 20
    overhead = 1 + dsec
    out = bytearray(_header(capacity, grain_sectors, 0xFFFFFFFFFFFFFFFF, dsec, overhead))
    out += desc.ljust(dsec * SECTOR, b"\0")
    ngt = -(-capacity // (512 * grain_sectors))
    gts = [[0] * 512 for _ in range(ngt)]
    for idx in sorted(grains):
        data = grains[idx].ljust(g, b"\0") if (idx + 1) * g <= capacity * SECTOR else grains[idx]
        comp = zlib.compress(data)
        gts[idx // 512][idx % 512] = len(out) // SECTOR
        out += _pad(struct.pack("<QI", idx * grain_sectors, len(comp)) + comp)
    gd = []
    for t in gts:
        if any(t):
            out += _MARKER.pack(4, 0, 1).ljust(SECTOR, b"\0")  # GT marker: 4 sectors follow
            gd.append(len(out) // SECTOR)
            out += struct.pack("<512I", *t)
        else:
            gd.append(0)
    out += _MARKER.pack(-(-len(gd) * 4 // SECTOR), 0, 2).ljust(SECTOR, b"\0")
    gd_at = len(out) // SECTOR
    out += _pad(struct.pack(f"<{len(gd)}I", *gd))
    out += _MARKER.pack(1, 0, 3).ljust(SECTOR, b"\0")
    out += _header(capacity, grain_sectors, gd_at, dsec, overhead)
    out += _MARKER.pack(0, 0, 0).ljust(SECTOR, b"\0")
    path.write_bytes(bytes(out))


# -- hand-breaking VMDKs ---------------------------------------------------------------------


def header_field(path: Path, name: str) -> tuple[int, str]:
    """(offset, struct format) of a KDMV header field."""
    fields = {
        "version": (4, "<I"),
        "flags": (8, "<I"),
        "capacity": (12, "<Q"),
        "grain": (20, "<Q"),
        "desc_offset": (28, "<Q"),
        "desc_size": (36, "<Q"),
        "gtes": (44, "<I"),
        "gd": (56, "<Q"),
        "overhead": (64, "<Q"),
        "nl": (73, "<4s"),
        "compress": (77, "<H"),
    }
    return fields[name]


def gd_entry_at(path: Path, i: int = 0) -> int:
    """File offset of grain directory entry ``i``."""
    with open(path, "rb") as f:
        f.seek(56)
        gd = struct.unpack("<Q", f.read(8))[0]
    return gd * SECTOR + 4 * i


def gt_entry_at(path: Path, grain: int) -> int:
    """File offset of the grain table entry of grain ``grain`` (default geometry: 512 per table)."""
    with open(path, "rb") as f:
        f.seek(gd_entry_at(path, grain // 512))
        gt = struct.unpack("<I", f.read(4))[0]
    assert gt, f"no grain table for grain {grain}"
    return gt * SECTOR + 4 * (grain % 512)


def set_parent_hint(img: Path, hint: str) -> None:
    """Rewrite the ``parentFileNameHint`` of a monolithicSparse delta's embedded descriptor
    (sector 1 on), in place: the CIDs stay as they are."""
    with open(img, "r+b") as f:
        f.seek(SECTOR)
        region = f.read(20 * SECTOR)
        text = region.split(b"\0", 1)[0].decode()
        lines = [
            f'parentFileNameHint="{hint}"' if ln.startswith("parentFileNameHint=") else ln
            for ln in text.split("\n")
        ]
        new = "\n".join(lines).encode()
        assert new != region.split(b"\0", 1)[0] and len(new) < len(region), text
        f.seek(SECTOR)
        f.write(new.ljust(len(region), b"\0"))
