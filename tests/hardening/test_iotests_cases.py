"""Malformed images made the way QEMU's own qemu-iotests make them (080, 060,
244, 261 and the bitmap tests) and the qcow2 spec describes them: a qemu-made
image with a few bytes poked in. The cases are recreated here, not copied.

Each case is checked against QEMU itself, through info, map and convert:

* QEMU refuses to open the image: every flatfs command fails with the same
  single line naming the file, at open (``OPEN``).
* QEMU opens it but fails to read it: ``info`` works, ``map`` and ``convert``
  fail with one line (``READ``).
* QEMU reads it: flatfs reads exactly the bytes ``qemu-img convert -O raw``
  writes (``SAME``).

A few go through a mount as well.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from flatfs.cli import main as flatfs_main

from ..helpers.cli import ONE_LINE, assert_words, error_line
from ..helpers.images import peek, poke
from ..helpers.mounts import Mounter, is_mounted
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.qemu

K = 1 << 10
M = 1 << 20
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77


# -- bytes of a qcow2 file -------------------------------------------------------


def l2_table(img: Path) -> int:
    """Offset of the first L2 table."""
    return peek(img, peek(img, 40, ">Q"), ">Q") & OFFSET_MASK


def find_extension(img: Path, etype: int) -> int:
    """Offset of the header extension ``etype`` (its type field)."""
    off = peek(img, 100, ">I")
    while True:
        t, n = peek(img, off, ">I"), peek(img, off + 4, ">I")
        if t == etype:
            return off
        assert t != 0, f"no extension {etype:#x}"
        off += 8 + ((n + 7) & ~7)


def write_extension(img: Path, etype: int, data: bytes) -> int:
    """Replace the header extensions with ``etype`` alone; return its offset."""
    at = peek(img, 100, ">I")
    raw = struct.pack(">II", etype, len(data)) + data
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(raw + bytes(-len(raw) % 8 + 8))
    return at


# -- qemu-made images -------------------------------------------------------------

Build = Callable[[Qemu, Path], Path]


def image(
    q: Qemu,
    d: Path,
    opts: str | None = None,
    name: str = "img.qcow2",
    writes: tuple[str, ...] = ("write -P 0x11 0 512", "write -P 0x22 1M 64k"),
) -> Path:
    """A 4 MiB image: header, refcount table, refcount block, L1 at 0x30000, one L2 table."""
    img = q.create(d / name, "4M", opts=opts)
    q.io(img, *writes)
    return img


def header(*pokes: tuple[int, str, int], opts: str | None = None) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d, opts)
        for off, fmt, value in pokes:
            poke(img, off, fmt, value)
        return img

    return make


def l2_entry(
    index: int,
    value: Callable[[Path, int], int],
    opts: str | None = None,
    writes: tuple[str, ...] | None = None,
    entry_size: int = 8,
) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d, opts) if writes is None else image(q, d, opts, writes=writes)
        at = l2_table(img) + index * entry_size
        poke(img, at, ">Q", value(img, peek(img, at, ">Q")))
        return img

    return make


def with_snapshot(*pokes: tuple[int, str, int], v2: bool = False) -> Build:
    """An image with one internal snapshot; pokes are relative to its table entry."""

    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d, "compat=0.10" if v2 else None)
        q.img("snapshot", "-c", "snap", img)
        q.io(img, "write -P 0x33 0 64k")
        entry = peek(img, 64, ">Q")
        for off, fmt, value in pokes:
            poke(img, entry + off, fmt, value)
        return img

    return make


def l1_size_zero_with_snapshot(q: Qemu, d: Path) -> Path:
    img = with_snapshot()(q, d)
    poke(img, 36, ">I", 0)
    return img


def snapshot_table_too_big(q: Qemu, d: Path) -> Path:
    """261: entries of 1 KiB extra data and 64 KiB names, past QEMU's 64 MiB table limit."""
    img = image(q, d, "compat=0.10")
    entry = 40 + 1024 + 2 * 0xFFFF
    count = (64 * M) // entry + 2
    off = table = 1 * M
    with open(img, "r+b") as f:
        for _ in range(count):
            off = (off + 7) & ~7
            f.seek(off)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024))
            off += entry
        f.truncate(off)
    poke(img, 60, ">IQ", count, table)
    return img


def snapshot_table_past_eof(q: Qemu, d: Path) -> Path:
    """080 (which uses 65536, the limit, and is slow in QEMU): many snapshots at
    16 MiB, far past the end of the file; QEMU reads them as zeros."""
    img = image(q, d)
    poke(img, 60, ">IQ", 4096, 16 * M)
    return img


def extension(etype: int, data: bytes) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d)
        write_extension(img, etype, data)
        return img

    return make


def l1_entry(value: Callable[[int], int]) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d)
        at = peek(img, 40, ">Q")
        poke(img, at, ">Q", value(peek(img, at, ">Q")))
        return img

    return make


def bitmaps_extension(data: bytes, autoclear: bool = True) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d)
        write_extension(img, EXT_BITMAPS, data)
        if autoclear:
            poke(img, 88, ">Q", 1)
        return img

    return make


def bitmaps_ext(nb: int = 1, reserved: int = 0, size: int = 512, offset: int = 0x60000) -> bytes:
    return struct.pack(">IIQQ", nb, reserved, size, offset)


def with_bitmaps(
    mutate: Callable[[Path, int, int], None] | None = None, n: int = 1, granularity: int | None = None
) -> Build:
    """Persistent dirty bitmaps added by qemu-img; ``mutate(img, ext_at, dir_at)``."""

    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d)
        for k in range(n):
            q.img("bitmap", "--add", *(("-g", str(granularity)) if granularity else ()), img, f"bm{k}")
        q.io(img, "write -P 0x44 2M 64k")
        if mutate is not None:
            at = find_extension(img, EXT_BITMAPS)
            mutate(img, at, peek(img, at + 24, ">Q"))
        return img

    return make


def _valid_table(img: Path, entry: int) -> None:
    """Clear the in-use flag, so that QEMU loads the bitmap's table."""
    poke(img, entry + 12, ">I", peek(img, entry + 12, ">I") & ~1)


def _second_name(img: Path, entry: int) -> int:
    return entry + ((24 + peek(img, entry + 18, ">H") + 7) & ~7) + 24


def backing_name(mutate: Callable[[Path, int, int], None]) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        image(q, d, name="base.qcow2")
        img = q.create(d / "img.qcow2", "4M", backing="base.qcow2")
        mutate(img, peek(img, 8, ">Q"), peek(img, 16, ">I"))
        return img

    return make


def _nul_after_name(img: Path, at: int, n: int) -> None:
    poke(img, 16, ">I", n + 4)
    poke(img, at + n, ">4s", b"\0xyz")


def backing_format_file(q: Qemu, d: Path) -> Path:
    (d / "base.raw").write_bytes(bytes([0x5A]) * 65536 + bytes([0xA5]) * 1000)
    q.img("create", "-q", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "file", d / "img.qcow2", "1M", cwd=d)
    q.io(d / "img.qcow2", "write -P 0x66 4k 4k")
    return d / "img.qcow2"


def raw_odd_size(q: Qemu, d: Path) -> Path:
    img = d / "img.raw"
    img.write_bytes(bytes([0x55]) * 1000)
    return img


def truncated(at: int) -> Build:
    def make(q: Qemu, d: Path) -> Path:
        img = image(q, d)
        os.truncate(img, at)
        return img

    return make


DATA_FILE = "data_file=img.data"
XL2_DATA_FILE = "data_file=img.data,extended_l2=on"


# Refused when the image is opened, by QEMU and by every flatfs command: case -> (build, words)
OPEN: dict[str, tuple[Build, list[str]]] = {
    # 080
    "080-header-length-huge": (header((100, ">I", 0xFFFFFFFF)), ["header_length"]),
    "080-unknown-extension-huge": (
        header((112, ">I", 0x12345678), (116, ">I", 0x7FFFFFFF)),
        ["0x12345678", "overruns"],
    ),
    "080-refcount-table-huge": (header((56, ">I", 0x20001)), ["refcount table too large"]),
    "080-refcount-table-misaligned": (header((48, ">Q", 0x1234567890ABCDEF)), ["not cluster aligned"]),
    "080-refcount-table-offset-huge": (
        header((48, ">Q", 0xFFFFFFFFFFFF0000), (56, ">I", 0x7F)),
        ["refcount table"],
    ),
    "080-snapshot-count-huge": (header((60, ">I", 0x7FFFFFFF)), ["too many snapshots"]),
    "080-snapshot-offset-huge": (
        header((64, ">Q", 0xFFFFFFFFFFFF0000), (60, ">I", 0xFFFF)),
        ["snapshot table"],
    ),
    "080-snapshot-offset-misaligned-no-snapshots": (
        header((64, ">Q", 0x1234567890ABCDEF)),
        ["snapshot table offset", "not cluster aligned"],
    ),
    "080-snapshot-offset-huge-no-snapshots": (header((64, ">Q", 0xFFFFFFFFFFFF0000)), ["snapshot table"]),
    "080-l1-size-huge": (header((36, ">I", 0x7FFFFFFF)), ["L1 table too large"]),
    "080-l1-offset-huge": (header((40, ">Q", 0x7FFFFFFFFFFF0000), (36, ">I", 0xFFFF)), ["L1 table"]),
    "080-l1-offset-misaligned": (header((40, ">Q", 0x1234567890ABCDEF)), ["not cluster aligned"]),
    "080-l1-offset-misaligned-empty-l1": (
        header((24, ">Q", 0), (36, ">I", 0), (40, ">Q", 0x30008)),
        ["L1 table offset", "not cluster aligned"],
    ),
    "080-l1-size-zero-with-snapshot": (l1_size_zero_with_snapshot, ["L1 table is too small"]),
    "080-backing-name-too-long": (
        header((8, ">Q", 0x1000), (16, ">I", 0xFFFFFFFF)),
        ["backing file name too long"],
    ),
    # 060
    "060-refcount-table-empty": (header((56, ">I", 0)), ["reference count table"]),
    # 261
    "261-snapshot-extra-data-too-large": (with_snapshot((36, ">I", 0x10000)), ["extra data"]),
    "261-snapshot-table-too-big": (snapshot_table_too_big, ["snapshot table is too big"]),
    "snapshot-entry-is-data": (header((64, ">Q", 0x50000), (60, ">I", 1)), ["extra data"]),
    # header extensions
    "crypto-extension-without-luks": (
        extension(EXT_CRYPTO, struct.pack(">QQ", 0x20000, 0x10000)),
        ["encryption header extension", "LUKS"],
    ),
    "bitmaps-extension-bad-length": (bitmaps_extension(b"\0" * 8, autoclear=False), ["bitmaps extension"]),
    "bitmaps-extension-zero-bitmaps": (bitmaps_extension(bitmaps_ext(nb=0)), ["zero bitmaps"]),
    "bitmaps-extension-reserved": (bitmaps_extension(bitmaps_ext(reserved=1)), ["reserved"]),
    "bitmaps-extension-too-many": (bitmaps_extension(bitmaps_ext(nb=70000)), ["70000 bitmaps"]),
    "bitmaps-extension-directory-huge": (
        bitmaps_extension(bitmaps_ext(size=1 << 40)),
        ["bitmap directory too large"],
    ),
    "bitmaps-extension-directory-misaligned": (
        bitmaps_extension(bitmaps_ext(offset=0x30008)),
        ["bitmap directory", "not cluster aligned"],
    ),
    "bitmaps-extension-directory-is-garbage": (
        bitmaps_extension(bitmaps_ext(offset=0x40000)),
        ["constraints"],
    ),
    "backing-format-too-long": (
        lambda q, d: extension(0xE2792ACA, b"qcow2" + bytes(11))(q, d),
        ["backing format name too long"],
    ),
    # bitmap directory and tables
    "bitmap-table-size-zero": (
        with_bitmaps(lambda img, at, e: poke(img, e + 8, ">I", 0)),
        ["'bm0'", "constraints"],
    ),
    "bitmap-table-too-long": (
        with_bitmaps(lambda img, at, e: (_valid_table(img, e), poke(img, e + 8, ">I", 2))),
        ["'bm0'", "table of 2 clusters"],
    ),
    "bitmap-granularity-too-small": (
        with_bitmaps(lambda img, at, e: poke(img, e + 17, ">B", 8)),
        ["constraints"],
    ),
    "bitmap-reserved-flag": (with_bitmaps(lambda img, at, e: poke(img, e + 12, ">I", 4)), ["constraints"]),
    "bitmap-extra-data": (
        with_bitmaps(lambda img, at, e: poke(img, e + 20, ">I", 8)),
        ["broken bitmap directory"],
    ),
    "bitmap-count-too-high": (with_bitmaps(lambda img, at, e: poke(img, at + 8, ">I", 2)), ["fewer bitmaps"]),
    "bitmap-count-too-low": (
        with_bitmaps(lambda img, at, e: poke(img, at + 8, ">I", 1), n=2),
        ["more bitmaps"],
    ),
    "bitmap-directory-size-zero": (
        with_bitmaps(lambda img, at, e: poke(img, at + 16, ">Q", 0)),
        ["bitmap directory size is zero"],
    ),
    "bitmap-directory-cut-short": (
        with_bitmaps(lambda img, at, e: poke(img, at + 16, ">Q", peek(img, at + 16, ">Q") - 8)),
        ["broken bitmap directory"],
    ),
    "bitmap-duplicate-name": (
        with_bitmaps(lambda img, at, e: poke(img, _second_name(img, e) + 2, ">B", ord("0")), n=2),
        ["'bm0'", "twice"],
    ),
    "bitmap-table-entry-reserved-bits": (
        with_bitmaps(lambda img, at, e: (_valid_table(img, e), poke(img, peek(img, e, ">Q"), ">Q", 2))),
        ["invalid entry", "'bm0'"],
    ),
    "bitmap-table-entry-misaligned": (
        with_bitmaps(lambda img, at, e: (_valid_table(img, e), poke(img, peek(img, e, ">Q"), ">Q", 0x50200))),
        ["invalid entry", "'bm0'"],
    ),
}


# QEMU opens them and fails to read (EIO): info works; map and convert fail with one line.
READ: dict[str, tuple[Build, list[str]]] = {
    # 244: a cluster of an external data file must sit at its guest offset
    "244-data-file-offset-mismatch": (
        l2_entry(0, lambda img, e: COPIED | 0x100000, DATA_FILE),
        ["does not match the guest offset 0x0"],
    ),
    "244-data-file-zero-cluster-mismatch": (
        l2_entry(1, lambda img, e: COPIED | 0x200000 | 1, DATA_FILE),
        ["does not match the guest offset 0x10000"],
    ),
    "244-data-file-copied-at-offset-zero": (
        l2_entry(3, lambda img, e: COPIED, DATA_FILE),
        ["data file offset 0x0", "guest offset 0x30000"],
    ),
    "244-data-file-extended-l2-mismatch": (
        l2_entry(0, lambda img, e: COPIED | 0x20000, XL2_DATA_FILE, entry_size=16),
        ["does not match the guest offset 0x0"],
    ),
    "060-zero-cluster-misaligned": (
        l2_entry(0, lambda img, e: (e | 1) + 0x200),
        ["zero cluster offset", "not cluster aligned"],
    ),
}


# QEMU reads these: flatfs must read the very same bytes.
SAME: dict[str, Build] = {
    "080-snapshot-table-past-eof": snapshot_table_past_eof,
    "snapshot-table-at-header": header((64, ">Q", 0), (60, ">I", 1)),
    "snapshot-table-on-the-refcount-table": header((64, ">Q", 0x10000), (60, ">I", 2)),
    "261-snapshot-extra-data-at-limit": with_snapshot((36, ">I", 1024)),
    "261-snapshot-names-at-limit": with_snapshot((12, ">H", 0xFFFF), (14, ">H", 0xFFFF)),
    "261-snapshot-v3-entry-without-extra-data": with_snapshot((36, ">I", 0)),
    "261-snapshot-v2": with_snapshot(v2=True),
    "080-snapshot-l1-table-invalid": with_snapshot((0, ">Q", 0x40200), (8, ">I", 0x10000000)),
    "bitmaps-valid": with_bitmaps(n=3),
    "bitmaps-valid-granularity-512": with_bitmaps(granularity=512),
    "bitmaps-valid-not-in-use": with_bitmaps(lambda img, at, e: _valid_table(img, e)),
    "bitmap-table-past-eof": with_bitmaps(
        lambda img, at, e: (_valid_table(img, e), poke(img, e, ">Q", 256 * M))
    ),
    "bitmaps-extension-without-autoclear-bit": bitmaps_extension(bitmaps_ext(nb=0), autoclear=False),
    "bitmaps-autoclear-cleared": with_bitmaps(
        lambda img, at, e: (poke(img, 88, ">Q", 0), poke(img, e + 8, ">I", 0))
    ),
    "backing-name-ends-at-nul": backing_name(_nul_after_name),
    "backing-name-all-nul": header((8, ">Q", 0x1000), (16, ">I", 1023)),
    "backing-format-file": backing_format_file,
    "data-file-valid": lambda q, d: image(
        q, d, DATA_FILE, writes=("write -P 1 0 64k", "write -P 2 3M 64k", "write -z 1M 64k", "discard 3M 64k")
    ),
    "data-file-valid-extended-l2": lambda q, d: image(
        q,
        d,
        XL2_DATA_FILE,
        writes=("write -P 1 0 4k", "write -P 2 3M 64k", "write -z 1M 8k", "discard 3M 4k"),
    ),
    "l1-entry-copied-bit-only": l1_entry(lambda e: COPIED),
    "l1-entry-reserved-bits": l1_entry(lambda e: e | 0x7F000000000001FF),
    "l2-entry-reserved-bits": l2_entry(0, lambda img, e: e | 0x1FE | 0x3F << 56),
    "l2-entry-copied-bit-only": l2_entry(0, lambda img, e: COPIED),
    "l2-entry-data-on-the-l1-table": l2_entry(0, lambda img, e: COPIED | 0x30000),
    "l2-entry-data-past-eof": l2_entry(0, lambda img, e: COPIED | 0xFFFFFFFF0000),
    "truncated-inside-a-data-cluster": truncated(0x50100),
    "virtual-size-not-a-sector-multiple": header((24, ">Q", 4 * M - 1000)),
    "virtual-size-under-a-sector": header((24, ">Q", 1000)),
    "raw-size-not-a-sector-multiple": raw_odd_size,
}


# -- checks ------------------------------------------------------------------------
# `info` and `map` run in-process (they only read); `convert` runs as a real
# command line (tests/helpers/cli.py: error_line).


def run(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a flatfs command run in this process."""
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1
    except TypeError:
        runner = CliRunner()  # click 8.2+: stderr is kept apart
    r = runner.invoke(flatfs_main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # not a FlatfsError: a bug, with its traceback
    return r.exit_code, r.stdout, r.stderr


def one_line(*args: str | os.PathLike[str]) -> str:
    code, _, err = run(*args)
    assert code == 1 and ONE_LINE(err), (args, code, err)
    return err.strip()


def qemu_convert(q: Qemu, img: Path) -> subprocess.CompletedProcess[str]:
    return q.img("convert", "-O", "raw", img, img.parent / "qemu.raw", check=False, cwd=img.parent)


@pytest.mark.parametrize("name", sorted(OPEN))
def test_refused_at_open_like_qemu(qemu: Qemu, tmp_path: Path, name: str) -> None:
    build, words = OPEN[name]
    img = build(qemu, tmp_path)
    assert qemu_convert(qemu, img).returncode != 0, "QEMU opens this image"
    line = one_line("info", img)
    assert_words(line, [img.name, *words])
    assert one_line("map", img) == line
    target = tmp_path / "out.raw"
    assert error_line("convert", "-O", "raw", img, target) == line
    assert not target.exists()


@pytest.mark.parametrize("name", sorted(READ))
def test_refused_when_read_like_qemu(qemu: Qemu, tmp_path: Path, name: str) -> None:
    build, words = READ[name]
    img = build(qemu, tmp_path)
    assert qemu_convert(qemu, img).returncode != 0, "QEMU reads this image"
    assert run("info", img)[0] == 0
    line = one_line("map", img)
    assert_words(line, [img.name, *words, "(at 0x"])
    target = tmp_path / "out.raw"
    assert error_line("convert", "-O", "raw", img, target) == line
    assert not target.exists()


@pytest.mark.parametrize("name", sorted(SAME))
def test_read_like_qemu(qemu: Qemu, tmp_path: Path, name: str) -> None:
    img = SAME[name](qemu, tmp_path)
    r = qemu_convert(qemu, img)
    assert r.returncode == 0, r.stderr
    want = tmp_path / "qemu.raw"
    got = tmp_path / "flatfs.raw"
    r = subprocess.run(
        [sys.executable, "-m", "flatfs", "convert", "-O", "raw", str(img), str(got)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert got.stat().st_size == want.stat().st_size
    assert got.read_bytes() == want.read_bytes()
    assert run("info", img)[0] == 0
    code, out, err = run("map", "--output=json", img)
    assert code == 0, err
    ours = json.loads(out)
    assert sum(e["length"] for e in ours) == want.stat().st_size


# -- through a mount ------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize(
    "name", ["crypto-extension-without-luks", "261-snapshot-extra-data-too-large", "bitmap-duplicate-name"]
)
def test_mount_refuses_like_qemu(qemu: Qemu, tmp_path: Path, mounter: Mounter, name: str) -> None:
    build, words = OPEN[name]
    img = build(qemu, tmp_path)
    mp = mounter.mountpoint()
    res = mounter.run(img, mp)
    assert res.returncode == 1 and ONE_LINE(res.stderr), res.stderr
    assert_words(res.stderr, words)
    assert not is_mounted(mp)


@pytest.mark.fuse
@pytest.mark.parametrize(
    "name", ["backing-format-file", "080-snapshot-table-past-eof", "bitmaps-valid-not-in-use"]
)
def test_mount_reads_like_qemu(qemu: Qemu, tmp_path: Path, mounter: Mounter, name: str) -> None:
    img = SAME[name](qemu, tmp_path)
    want = qemu.to_raw(img, tmp_path / "qemu.raw").read_bytes()
    assert mounter.mount(img).read_bytes() == want
