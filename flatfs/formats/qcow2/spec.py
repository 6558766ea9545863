"""qcow2 on-disk constants and header parsing. Pure: no I/O.

Facts come from QEMU's docs/interop/qcow2.txt. Limits that are not in the
spec are QEMU's own, named here with their reason, so that flatfs accepts
exactly the images QEMU accepts and no hostile field can make it allocate
without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ...errors import CorruptImage, UnsupportedImage

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # through header_length; compression_type is at 104

MIN_CLUSTER_BITS = 9  # 512 B
MAX_CLUSTER_BITS = 21  # 2 MiB: QEMU refuses larger clusters
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE: bounds the L1 we load
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_BACKING_NAME = 1023  # spec: "must not be longer than 1023 bytes"
MAX_FORMAT_NAME = 15  # QEMU keeps the backing format in a 16-byte buffer
MAX_L1_INDEX = (1 << 31) - 1  # QEMU: "Image is too big" beyond INT_MAX L1 entries
MAX_TABLE_END = (1 << 63) - 1  # QEMU validates table offsets against INT64_MAX
MAX_SNAPSHOT_EXTRA = 1024  # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS_BYTES = 64 << 20  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE
SNAPSHOT_HEADER = 40  # fixed part of a snapshot table entry
MAX_BITMAPS = 65535  # QEMU's QCOW2_MAX_BITMAPS
MAX_BITMAP_DIRECTORY = MAX_BITMAPS * 1024  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# table entries
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55, for L1 and standard L2 entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32  # per cluster, with extended L2 entries
COMPRESSED_SECTOR = 512

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
HEADER_V3 = struct.Struct(">QQQII")  # version 3: offsets 72..103, through header_length


@dataclass(frozen=True)
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    # from the header extensions and the backing-name area
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    has_bitmaps: bool = False
    # the bitmaps extension, when the bitmaps autoclear bit says it is valid:
    # (nb_bitmaps, directory size, directory offset)
    bitmaps: tuple[int, int, int] | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_span(self) -> int:
        """Guest bytes covered by one L1 entry (one L2 table)."""
        return self.cluster_size * self.l2_entries

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    def features(self) -> list[str]:
        out = []
        if self.incompatible & INCOMPAT_DIRTY:
            out.append("dirty")
        if self.incompatible & INCOMPAT_CORRUPT:
            out.append("corrupt")
        if self.compatible & COMPAT_LAZY_REFCOUNTS:
            out.append("lazy-refcounts")
        if self.extended_l2:
            out.append("extended-l2")
        if self.compression_type != COMPRESSION_ZLIB:
            out.append(f"compression-type={COMPRESSION_NAMES.get(self.compression_type, '?')}")
        if self.has_data_file:
            out.append("data-file")
        if self.data_file_raw:
            out.append("data-file-raw")
        if self.has_bitmaps or self.autoclear & AUTOCLEAR_BITMAPS:
            out.append("bitmaps")
        if self.nb_snapshots:
            out.append(f"snapshots={self.nb_snapshots}")
        if self.refcount_order != 4:
            out.append(f"refcount-bits={1 << self.refcount_order}")
        return out


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_header(path: str, head: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``head`` (the first cluster, or less if
    the file is shorter). Raises CorruptImage / UnsupportedImage."""
    if len(head) < V2_HEADER_LENGTH:
        raise CorruptImage(path, f"file too short for a qcow2 header ({len(head)} bytes)")
    (
        magic,
        version,
        bf_off,
        bf_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = HEADER_V2.unpack_from(head)
    if magic != MAGIC:
        raise CorruptImage(path, "not a qcow2 image (bad magic)", 0)
    if version not in (2, 3):
        raise UnsupportedImage(path, f"unsupported qcow2 version {version}", 4)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            path, f"cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", 20
        )
    cs = 1 << cluster_bits
    fields: dict[str, Any] = dict(
        version=version,
        backing_file_offset=bf_off,
        backing_file_size=bf_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
    )
    if version == 3:
        if len(head) < V3_HEADER_LENGTH:
            raise CorruptImage(path, "file too short for a version 3 header")
        incompat, compat, autoclear, refcount_order, header_length = HEADER_V3.unpack_from(
            head, V2_HEADER_LENGTH
        )
        if header_length < V3_HEADER_LENGTH or header_length % 8:
            raise CorruptImage(path, f"invalid header_length {header_length}", 100)
        if header_length > cs:
            raise CorruptImage(path, f"header_length {header_length} exceeds the cluster size {cs}", 100)
        if header_length > len(head):
            raise CorruptImage(path, "file ends inside the header", len(head))
        if refcount_order > 6:
            raise CorruptImage(path, f"refcount_order {refcount_order} exceeds 6", 96)
        compression = head[104] if header_length > 104 else COMPRESSION_ZLIB
        fields.update(
            incompatible=incompat,
            compatible=compat,
            autoclear=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression,
        )
    else:
        incompat = 0
        header_length = V2_HEADER_LENGTH
        compression = COMPRESSION_ZLIB

    ext = _parse_extensions(path, head, header_length, bf_off, cs)
    names = ext.get("feature_names", {})

    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        bits = [i for i in range(64) if unknown >> i & 1]
        label = ", ".join(names.get((0, b), f"bit {b}") for b in bits)
        raise UnsupportedImage(path, f"unsupported incompatible feature(s): {label}", 72)
    if "crypto_at" in ext and crypt != CRYPT_LUKS:
        # QEMU refuses the open: the extension only belongs with LUKS
        raise CorruptImage(
            path, "full disk encryption header extension without LUKS encryption", ext["crypto_at"]
        )
    if crypt == CRYPT_AES:
        raise UnsupportedImage(path, "encrypted images are not supported (AES)", 32)
    if crypt == CRYPT_LUKS:
        raise UnsupportedImage(path, "encrypted images are not supported (LUKS)", 32)
    if crypt != CRYPT_NONE:
        raise UnsupportedImage(path, f"unknown encryption method {crypt}", 32)
    if incompat & INCOMPAT_COMPRESSION:
        if compression == COMPRESSION_ZLIB:
            raise CorruptImage(path, "compression type bit set but compression_type is zlib", 104)
    elif compression != COMPRESSION_ZLIB:
        raise CorruptImage(path, "compression_type set without the compression type bit", 104)
    if compression not in COMPRESSION_NAMES:
        raise UnsupportedImage(path, f"unknown compression type {compression}", 104)
    autoclear = fields.get("autoclear", 0)
    if autoclear & AUTOCLEAR_DATA_FILE_RAW and not incompat & INCOMPAT_DATA_FILE:
        raise CorruptImage(path, "data-file-raw is set without an external data file", 88)

    # -- tables --------------------------------------------------------------
    bitmaps = None
    if "bitmaps" in ext and autoclear & AUTOCLEAR_BITMAPS:
        bitmaps = _check_bitmaps_extension(path, ext["bitmaps_at"], ext["bitmaps"], cs)
    hdr = Header(
        **fields,
        backing_file=None,
        backing_format=ext.get("backing_format"),
        data_file=ext.get("data_file"),
        feature_names=names,
        has_bitmaps="bitmaps" in ext,
        bitmaps=bitmaps,
    )
    if hdr.extended_l2 and cluster_bits - 5 < MIN_CLUSTER_BITS:
        # QEMU at open: a subcluster (1/32 of a cluster) must be at least a sector
        raise UnsupportedImage(
            path,
            f"unsupported subcluster size {cs // SUBCLUSTERS} (extended L2 entries need clusters of "
            "16 KiB or more)",
            72,
        )
    l1_needed = -(-size // hdr.l1_span)
    if l1_needed > MAX_L1_INDEX:
        raise UnsupportedImage(path, f"virtual size {size} is too big for cluster size {cs}", 24)
    if l1_size > MAX_L1_BYTES // 8:
        raise UnsupportedImage(path, f"active L1 table too large ({l1_size} entries)", 36)
    if l1_size < l1_needed:
        raise CorruptImage(
            path, f"L1 table is too small: {l1_size} entries, the virtual size needs {l1_needed}", 36
        )
    # QEMU checks a table's offset (aligned, below INT64_MAX) even when the table is empty
    _check_table(path, "L1 table", l1_off, l1_size * 8, cs, file_size, 40)
    if rt_clusters > MAX_REFTABLE_BYTES // cs:
        raise CorruptImage(path, f"refcount table too large ({rt_clusters} clusters)", 56)
    if rt_clusters == 0:
        raise CorruptImage(path, "image does not contain a reference count table", 56)
    _check_table(path, "refcount table", rt_off, rt_clusters * cs, cs, file_size, 48)
    if nb_snap > MAX_SNAPSHOTS:
        raise CorruptImage(path, f"too many snapshots ({nb_snap})", 60)
    # The entries themselves are read at open (qcow2/layer.py); like QEMU, a
    # table past the end of the file reads as zeros, so only the offset is checked here.
    _check_offset(path, "snapshot table", snap_off, SNAPSHOT_HEADER * nb_snap, cs, 64)

    # -- backing file name -----------------------------------------------------
    backing = None
    if bf_off:
        if bf_off > cs:
            raise CorruptImage(path, f"backing file name offset 0x{bf_off:x} is outside the first cluster", 8)
        if bf_size > min(MAX_BACKING_NAME, cs - bf_off):
            raise CorruptImage(path, f"backing file name too long ({bf_size} bytes)", 16)
        if bf_off + bf_size > len(head):
            raise CorruptImage(path, "backing file name lies past the end of the file", bf_off)
        if bf_size:
            # QEMU keeps the name as a C string: it ends at the first NUL
            backing = _name(head[bf_off : bf_off + bf_size]).split("\0", 1)[0] or None
    if hdr.has_data_file and hdr.data_file is None:
        raise UnsupportedImage(
            path,
            "external data file is required but its name is not recorded (no data file name extension)",
            72,
        )
    return _replace(hdr, backing_file=backing)


def _replace(hdr: Header, **kw: Any) -> Header:
    from dataclasses import replace

    return replace(hdr, **kw)


def _check_offset(path: str, what: str, offset: int, length: int, cs: int, field_at: int) -> None:
    """QEMU's check of a table's place, made even when the table is empty."""
    if offset % cs:
        raise CorruptImage(path, f"{what} offset 0x{offset:x} is not cluster aligned", field_at)
    if offset > MAX_TABLE_END - length:
        raise CorruptImage(
            path, f"{what} at 0x{offset:x} (+{length} bytes) lies past the end of any possible file", field_at
        )


def _check_table(
    path: str, what: str, offset: int, length: int, cs: int, file_size: int, field_at: int
) -> None:
    _check_offset(path, what, offset, length, cs, field_at)
    if length == 0:
        return
    if offset == 0:
        raise CorruptImage(path, f"{what} overlaps the header", field_at)
    if offset + length > file_size:
        raise CorruptImage(
            path,
            f"{what} at 0x{offset:x} (+{length} bytes) lies past the end of the file ({file_size} bytes)",
            field_at,
        )


def _parse_extensions(path: str, head: bytes, start: int, bf_off: int, cs: int) -> dict[str, Any]:
    end = bf_off if bf_off and bf_off < cs else cs
    end = min(end, len(head))
    out: dict[str, Any] = {}
    seen: set[int] = set()
    off = start
    while off < end:
        if off + 8 > end:
            raise CorruptImage(path, "header extension overruns the header area", off)
        etype, elen = struct.unpack_from(">II", head, off)
        if etype == EXT_END:
            break
        data_at = off + 8
        if elen > end - data_at:
            raise CorruptImage(
                path, f"header extension 0x{etype:08x} ({elen} bytes) overruns the header area", off
            )
        data = head[data_at : data_at + elen]
        if etype in seen and etype in (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_BITMAPS, EXT_CRYPTO):
            raise CorruptImage(path, f"duplicate header extension 0x{etype:08x}", off)
        seen.add(etype)
        if etype == EXT_BACKING_FORMAT:
            if elen > MAX_FORMAT_NAME:
                raise CorruptImage(path, f"backing format name too long ({elen} bytes)", off)
            out["backing_format"] = _name(data).rstrip("\0") or None
        elif etype == EXT_DATA_FILE:
            # a C string in QEMU: the name ends at the first NUL
            out["data_file"] = _name(data).split("\0", 1)[0] or None
        elif etype == EXT_FEATURE_TABLE:
            names = {}
            for i in range(0, elen - elen % 48, 48):
                names[(data[i], data[i + 1])] = (
                    data[i + 2 : i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                )
            out["feature_names"] = names
        elif etype == EXT_BITMAPS:
            if elen != 24:
                raise CorruptImage(path, f"bitmaps extension has an invalid length ({elen} bytes)", off)
            out["bitmaps"] = struct.unpack_from(">IIQQ", data)
            out["bitmaps_at"] = off
        elif etype == EXT_CRYPTO:
            out["crypto_at"] = off
        off = data_at + ((elen + 7) & ~7)
    return out


def _check_bitmaps_extension(
    path: str, at: int, ext: tuple[int, int, int, int], cs: int
) -> tuple[int, int, int]:
    """QEMU's checks of a bitmaps extension that the autoclear bit declares valid."""
    nb, reserved, dir_size, dir_off = ext
    if reserved:
        raise CorruptImage(path, "bitmaps extension: reserved field is not zero", at)
    if nb == 0:
        raise CorruptImage(path, "bitmaps extension with zero bitmaps", at)
    if nb > MAX_BITMAPS:
        raise CorruptImage(path, f"bitmaps extension: {nb} bitmaps, more than {MAX_BITMAPS}", at)
    if dir_size > MAX_BITMAP_DIRECTORY:
        raise CorruptImage(path, f"bitmaps extension: bitmap directory too large ({dir_size} bytes)", at)
    _check_offset(path, "bitmap directory", dir_off, dir_size, cs, at)
    return nb, dir_size, dir_off
