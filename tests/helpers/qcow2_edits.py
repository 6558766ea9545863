"""Byte-level edits of qemu-made qcow2 images, and the broken images built with them.

The broken-image builders (``OPEN_CASES``, ``TABLE_CASES``, ``READ_CASES``)
are shared by the command-line tests (tests/hardening/test_malformed.py) and
the mount tests (tests/hardening/test_mount_faults.py). Each takes (qemu,
folder) and returns (image, words the one-line error must hold).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

from .images import peek, poke
from .qemu import Qemu

K = 1 << 10
M = 1 << 20
CS = 64 * K
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


# -- bytes of a qcow2 file -------------------------------------------------------


def cluster_bits(img: Path) -> int:
    return peek(img, 20, ">I")


def l1_offset(img: Path) -> int:
    return peek(img, 40, ">Q")


def l2_entry_at(img: Path, guest: int, entry_size: int = 8) -> int:
    """File offset of the L2 entry that maps guest offset ``guest``."""
    cs = 1 << cluster_bits(img)
    per_table = cs // entry_size
    l1i, l2i = divmod(guest // cs, per_table)
    l2 = peek(img, l1_offset(img) + 8 * l1i, ">Q") & OFFSET_MASK
    assert l2, f"no L2 table for guest offset {guest:#x}"
    return l2 + l2i * entry_size


def compressed_at(img: Path, guest: int) -> tuple[int, int, int]:
    """(L2 entry offset, host offset, sector-count field) of the compressed cluster at ``guest``."""
    at = l2_entry_at(img, guest)
    e = peek(img, at, ">Q")
    assert e & COMPRESSED, f"cluster at {guest:#x} is not compressed"
    shift = 62 - (cluster_bits(img) - 8)
    return at, e & ((1 << shift) - 1), (e >> shift) & ((1 << (cluster_bits(img) - 8)) - 1)


def set_compressed(img: Path, at: int, host: int, count_field: int) -> None:
    shift = 62 - (cluster_bits(img) - 8)
    poke(img, at, ">Q", COMPRESSED | (count_field << shift) | host)


# -- qemu-made images ------------------------------------------------------------


def plain_image(q: Qemu, d: Path, name: str = "img.qcow2", opts: str | None = None) -> Path:
    img = q.create(d / name, "4M", opts=opts)
    q.io(img, "write -P 0x11 0 1M", "write -P 0x12 2M 64k", "write -z 3M 64k")
    return img


def compressed_image(q: Qemu, d: Path, ctype: str = "zlib", name: str | None = None) -> Path:
    """A 4 MiB image of compressed clusters (0..2M, 3M..3M+64k) and one random,
    uncompressible one (2M..2M+64k, stored as plain data)."""
    src = d / f"src-{ctype}.raw"
    with open(src, "wb") as f:
        f.truncate(4 * M)
        f.write(bytes([0x41]) * M)
        f.write((b"flatfs reads hostile images " * 40000)[:M])
        f.write(os.urandom(CS))
        f.seek(3 * M)
        f.write(bytes([0x43]) * CS)
    img = d / (name or f"{ctype}.qcow2")
    q.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, img)
    src.unlink()
    return img


# Guest offset of the compressed cluster the read-time corruptions break; the
# first cluster stays intact (the mount reads it to check the view is live).
BROKEN = M + 4 * CS


def last_compressed(img: Path) -> int:
    """Guest offset of the compressed cluster stored last in the file."""
    best = (-1, 0)
    for guest in range(0, 4 * M, CS):
        e = peek(img, l2_entry_at(img, guest), ">Q")
        if e & COMPRESSED:
            best = max(best, (compressed_at(img, guest)[1], guest))
    return best[1]


# -- corruptions ---------------------------------------------------------------
# Each takes (qemu, folder) and returns (image, words the error line must hold).

Case = Callable[[Qemu, Path], tuple[Path, list[str]]]


def _header(
    offset: int, fmt: str, value: int | Callable[[Path], int], *words: str, opts: str | None = None
) -> Case:
    def make(q: Qemu, d: Path) -> tuple[Path, list[str]]:
        img = plain_image(q, d, opts=opts)
        poke(img, offset, fmt, value(img) if callable(value) else value)
        return img, ["img.qcow2", *words]

    return make


def _extension_overrun(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    img = plain_image(q, d)
    hlen = peek(img, 100, ">I")
    assert peek(img, hlen, ">I") != 0, "qemu-img wrote no header extension"
    poke(img, hlen + 4, ">I", CS)  # first extension claims the whole cluster
    return img, ["img.qcow2", "overruns the header area"]


def _l2_entry(
    mutate: Callable[[Path, int], int], *words: str, opts: str | None = None, entry_size: int = 8
) -> Case:
    def make(q: Qemu, d: Path) -> tuple[Path, list[str]]:
        img = plain_image(q, d, opts=opts)
        at = l2_entry_at(img, 64 * K, entry_size)
        if entry_size == 16:
            poke(img, at + 8, ">Q", mutate(img, peek(img, at + 8, ">Q")))
        else:
            poke(img, at, ">Q", mutate(img, peek(img, at, ">Q")))
        return img, ["img.qcow2", *words]

    return make


def _l1_entry(value: Callable[[Path, int], int], *words: str) -> Case:
    def make(q: Qemu, d: Path) -> tuple[Path, list[str]]:
        img = plain_image(q, d)
        at = l1_offset(img)
        poke(img, at, ">Q", value(img, peek(img, at, ">Q")))
        return img, ["img.qcow2", *words]

    return make


def _backing_directory(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    q.create(d / "base.qcow2", "4M")
    top = q.create(d / "top.qcow2", "4M", backing="base.qcow2")
    (d / "base.qcow2").unlink()
    (d / "base.qcow2").mkdir()
    return top, ["base.qcow2", "is a directory"]


def _backing_dangling_symlink(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    base = q.create(d / "real.qcow2", "4M")
    (d / "base.qcow2").symlink_to(base.name)
    top = q.create(d / "top.qcow2", "4M", backing="base.qcow2")
    base.unlink()
    return top, ["top.qcow2", "base.qcow2", "not found"]


def _data_file(kind: str) -> Case:
    def make(q: Qemu, d: Path) -> tuple[Path, list[str]]:
        img = plain_image(q, d, opts="data_file=img.data")
        (d / "img.data").unlink()
        if kind == "directory":
            (d / "img.data").mkdir()
            return img, ["img.data", "is a directory"]
        return img, ["img.qcow2", "img.data", "data file", "not found"]

    return make


def _loop(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    a = q.create(d / "a.qcow2", "4M")
    b = q.create(d / "b.qcow2", "4M", backing=a.name)
    q.img("rebase", "-u", "-b", b.name, "-F", "qcow2", a, cwd=d)
    return b, ["a.qcow2", "loop"]


def _self_loop(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    a = q.create(d / "a.qcow2", "4M")
    q.img("rebase", "-u", "-b", a.name, "-F", "qcow2", a, cwd=d)
    return a, ["a.qcow2", "loop"]


# Refused when the chain is opened: info, map, convert (and mount) all fail.
OPEN_CASES: dict[str, Case] = {
    "bad-magic": _header(0, ">I", 0x51464900, "bad magic"),  # with -f qcow2
    "version-1": _header(4, ">I", 1, "version 1"),
    "cluster-bits-8": _header(20, ">I", 8, "cluster_bits 8"),
    "cluster-bits-22": _header(20, ">I", 22, "cluster_bits 22"),
    "header-length-too-small": _header(100, ">I", 96, "header_length 96"),
    "header-length-past-cluster": _header(
        100, ">I", 1024, "exceeds the cluster size", opts="cluster_size=512"
    ),
    "extension-overrun": _extension_overrun,
    "unknown-incompatible-bit": _header(72, ">Q", 1 << 9, "incompatible feature", "bit 9"),
    "l1-unaligned": _header(40, ">Q", lambda img: l1_offset(img) + 512, "L1 table", "not cluster aligned"),
    "l1-past-eof": _header(40, ">Q", 1 << 40, "L1 table", "past the end"),
    "l1-size-absurd": _header(36, ">I", 1 << 31, "L1 table too large"),
    "l1-too-small-for-size": _header(24, ">Q", 1 << 40, "L1 table is too small"),
    "virtual-size-huge": _header(24, ">Q", 1 << 62, "virtual size", "too big"),  # 2^62 bytes
    "refcount-table-unaligned": _header(
        48, ">Q", lambda img: peek(img, 48, ">Q") + 512, "refcount table", "not cluster aligned"
    ),
    "refcount-table-past-eof": _header(48, ">Q", 1 << 40, "refcount table", "past the end"),
    "backing-is-a-directory": _backing_directory,
    "backing-dangling-symlink": _backing_dangling_symlink,
    "data-file-missing": _data_file("missing"),
    "data-file-is-a-directory": _data_file("directory"),
    "backing-loop": _loop,
    "backing-self": _self_loop,
}

# Found in the L1/L2 tables: `info` (like qemu-img info) does not look at them;
# map, convert and mount (which sizes st_blocks from the map) all fail.
TABLE_CASES: dict[str, Case] = {
    "l2-unaligned": _l1_entry(lambda img, e: e + 512, "L2 table offset", "not cluster aligned"),
    "l2-past-eof": _l1_entry(lambda img, e: COPIED | 1 << 40, "L2 table", "past the end"),
    "data-cluster-unaligned": _l2_entry(lambda img, e: e + 512, "data cluster offset", "not cluster aligned"),
    "subcluster-alloc-and-zero": _l2_entry(
        lambda img, bm: bm | (bm & 0xFFFFFFFF) << 32,
        "both allocated and zero",
        opts="extended_l2=on",
        entry_size=16,
    ),
}


def _garbage_compressed(ctype: str) -> Case:
    def make(q: Qemu, d: Path) -> tuple[Path, list[str]]:
        img = compressed_image(q, d, ctype, name="img.qcow2")
        q.to_raw(img, d / "ref.raw")  # the intact bytes, for the mount tests
        _, host, _ = compressed_at(img, BROKEN)
        poke(img, host, ">Q", (1 << 64) - 1)  # not a deflate block, not a zstd frame
        return img, ["img.qcow2", "compressed cluster", f"guest offset {BROKEN:#x}", "does not decompress"]

    return make


def _compressed_past_eof(q: Qemu, d: Path) -> tuple[Path, list[str]]:
    img = compressed_image(q, d, name="img.qcow2")
    q.to_raw(img, d / "ref.raw")
    at, _, count = compressed_at(img, BROKEN)
    set_compressed(img, at, os.path.getsize(img) + 8 * CS, count)  # reads as zeros: not deflate
    return img, ["img.qcow2", "compressed cluster", f"guest offset {BROKEN:#x}", "does not decompress"]


# Found only when the broken cluster's data is read: info and map succeed (and
# agree with qemu-img map), convert fails, and so does qemu-img convert. Each
# leaves the intact image's bytes in ref.raw beside it.
READ_CASES: dict[str, Case] = {
    "deflate-garbage": _garbage_compressed("zlib"),
    "zstd-garbage": _garbage_compressed("zstd"),
    "compressed-offset-past-eof": _compressed_past_eof,
}


def forget_backing_format(path: Path) -> None:
    """Turn the backing-format header extension into an unknown one, as in old images."""
    data = path.read_bytes()
    at = data.index(struct.pack(">I", 0xE2792ACA), 72)
    poke(path, at, ">I", 0x0BADF00D)
