"""The streaming qcow2 writer, checked without QEMU: header fields, a refcount
audit (every cluster counted exactly as referenced: no leaks, no errors), and
reading the result back through flatfs's own reader."""

from __future__ import annotations

import os
import random
import struct
import zlib
from array import array
from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.convert.sinks import FileSink
from flatfs.errors import ConvertError
from flatfs.formats.api import CopyRun, HostFile
from flatfs.formats.qcow2.spec import parse_header
from flatfs.formats.qcow2.writer import ALL_ALLOC, Qcow2Writer

K = 1024
M = 1 << 20


def audit(path: Path) -> None:
    """What `qemu-img check` checks: refcounts equal references; COPIED iff refcount 1."""
    data = path.read_bytes()
    hdr = parse_header(str(path), data[: 2 * M], len(data))
    cs = hdr.cluster_size
    nclusters = -(-len(data) // cs)
    refs = [0] * nclusters
    copied: dict[int, bool] = {}

    def ref(offset: int, length: int = 0) -> None:
        for c in range(offset // cs, (offset + max(length, 1) - 1) // cs + 1):
            refs[c] += 1

    def be64(off: int, n: int) -> array:
        a = array("Q", data[off : off + 8 * n])
        a.byteswap()
        return a

    ref(0)
    ref(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
    rt = be64(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs // 8)
    for b in rt:
        if b:
            ref(b)
    ref(hdr.l1_table_offset, hdr.l1_size * 8)
    words = 2 if hdr.extended_l2 else 1
    cshift = 62 - (hdr.cluster_bits - 8)
    for l1e in be64(hdr.l1_table_offset, hdr.l1_size):
        if not l1e & 0x00FFFFFFFFFFFE00:
            continue
        l2off = l1e & 0x00FFFFFFFFFFFE00
        ref(l2off)
        copied[l2off] = bool(l1e >> 63)
        l2 = be64(l2off, cs // 8)
        for i in range(0, len(l2), words):
            e = l2[i]
            if e & (1 << 62):
                assert not e >> 63, "compressed cluster with COPIED"
                off = e & ((1 << cshift) - 1)
                nsec = ((e >> cshift) & ((1 << (hdr.cluster_bits - 8)) - 1)) + 1
                end = (off & ~511) + nsec * 512
                ref(off, end - off)
                if words == 2:
                    assert l2[i + 1] == 0
            elif e & 0x00FFFFFFFFFFFE00:
                off = e & 0x00FFFFFFFFFFFE00
                assert off % cs == 0
                ref(off)
                copied[off] = bool(e >> 63)
            if words == 2:
                bm = l2[i + 1]
                assert not (bm & ALL_ALLOC) & (bm >> 32), "subcluster both allocated and zero"
    per_block = cs * 8 // 16
    for c in range(nclusters):
        blk = rt[c // per_block] if c // per_block < len(rt) else 0
        rc = struct.unpack_from(">H", data, blk + (c % per_block) * 2)[0] if blk else 0
        assert rc == refs[c], f"cluster {c}: refcount {rc}, referenced {refs[c]}"
    for off, flag in copied.items():
        assert flag == (refs[off // cs] == 1), f"COPIED wrong at {off:#x}"


def write_image(
    path: Path,
    size: int,
    cs: int,
    seed: int = 0,
    *,
    version: int = 3,
    compress: str | None = None,
    ext: bool = False,
    zeros: bool = False,
    backing: str | None = None,
) -> bytes:
    """Feed random runs of data/compressed/zero clusters; return the expected guest bytes."""
    rnd = random.Random(seed)
    want = bytearray(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = Qcow2Writer(
            FileSink(fd, str(path)),
            size,
            cluster_size=cs,
            version=version,
            extended_l2=ext,
            compression_type=compress or "zlib",
            backing_file=backing,
            backing_format="raw" if backing else None,
        )
        g = 0
        n = -(-size // cs)
        while g < n:
            r = rnd.random()
            k = min(rnd.randint(1, 40), n - g)
            if r < 0.3:
                g += k
                continue
            if zeros and r < 0.4:
                w.write_zero(g, k)
                g += k
                continue
            for i in range(k):
                lo = (g + i) * cs
                hi = min(size, lo + cs)
                want[lo:hi] = (
                    rnd.randbytes(hi - lo)
                    if rnd.random() < 0.5
                    else bytes([rnd.randrange(1, 255)]) * (hi - lo)
                )
            if compress and r < 0.75:
                for i in range(k):
                    blk = bytes(want[(g + i) * cs : (g + i + 1) * cs])
                    blk += bytes(cs - len(blk))
                    if compress == "zlib":
                        p = zlib.compress(blk, 6, -12)
                    else:
                        import zstandard

                        p = zstandard.ZstdCompressor().compress(blk)
                    if len(p) < cs:
                        w.write_compressed(g + i, p)
                    else:
                        w.write_clusters(g + i, blk[: min(cs, size - (g + i) * cs)])
            else:
                w.write_clusters(g, memoryview(want)[g * cs : min(size, (g + k) * cs)])
            g += k
        w.finish()
    finally:
        os.close(fd)
    return bytes(want)


CASES = [
    dict(size=8 * M, cs=64 * K),
    dict(size=3 * M + 512, cs=512),
    dict(size=9 * M, cs=2 * M),
    dict(size=8 * M, cs=64 * K, version=2),
    dict(size=8 * M, cs=16 * K, ext=True),
    dict(size=8 * M, cs=64 * K, compress="zlib"),
    dict(size=8 * M, cs=64 * K, compress="zstd"),
    dict(size=2 * M, cs=512, compress="zlib"),
    dict(size=8 * M, cs=32 * K, compress="zlib", ext=True),
    dict(size=6 * M, cs=512, compress="zlib"),  # many refcount blocks, written as it goes
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_roundtrip_and_audit(tmp_path, case):
    path = tmp_path / "img.qcow2"
    want = write_image(path, **case)
    audit(path)
    with open_chain(path) as chain:
        assert chain.size == case["size"]
        assert chain.pread(0, chain.size) == want


def test_zero_clusters_over_backing(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * (4 * M))
    for version, ext in ((3, False), (3, True), (2, False)):
        path = tmp_path / f"z{version}{ext}.qcow2"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        w = Qcow2Writer(
            FileSink(fd, str(path)),
            4 * M,
            cluster_size=64 * K,
            version=version,
            extended_l2=ext,
            backing_file="base.raw",
            backing_format="raw",
        )
        w.write_zero(2, 3)
        w.write_clusters(10, b"\x01" * 64 * K)
        w.finish()
        os.close(fd)
        audit(path)
        with open_chain(path) as chain:
            got = chain.pread(0, 4 * M)
        want = bytearray(b"\x5a" * (4 * M))
        want[2 * 64 * K : 5 * 64 * K] = bytes(3 * 64 * K)
        want[10 * 64 * K : 11 * 64 * K] = b"\x01" * 64 * K
        assert got == want, (version, ext)


def test_header_fields(tmp_path):
    path = tmp_path / "h.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    w = Qcow2Writer(
        FileSink(fd, str(path)),
        10 * M,
        cluster_size=16 * K,
        extended_l2=True,
        compression_type="zstd",
        backing_file="../some/base image.qcow2",
        backing_format="qcow2",
    )
    w.write_clusters(0, b"x" * 16 * K)
    w.finish()
    os.close(fd)
    data = path.read_bytes()
    hdr = parse_header(str(path), data[: 16 * K], len(data))
    assert (hdr.version, hdr.cluster_size, hdr.size) == (3, 16 * K, 10 * M)
    assert hdr.extended_l2 and hdr.compression_type == 1 and hdr.header_length == 112
    assert hdr.backing_file == "../some/base image.qcow2" and hdr.backing_format == "qcow2"
    assert hdr.refcount_order == 4 and hdr.nb_snapshots == 0 and hdr.incompatible & 0b11 == 0


def test_header_is_written_last(tmp_path):
    """The header is the writer's last write: until then, cluster 0 is zeros (never a lying image)."""
    path = tmp_path / "late.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    sink = FileSink(fd, str(path))
    w = Qcow2Writer(sink, 64 * M, cluster_size=64 * K)
    w.write_clusters(0, b"y" * M)
    w.write_clusters(100, b"z" * M)
    order = []
    real = sink.write
    sink.write = lambda bufs, offset: (order.append((offset, os.pread(fd, 4, 0))), real(bufs, offset))
    w.finish()
    os.close(fd)
    assert order[-1] == (0, b"\0\0\0\0") and all(off for off, _ in order[:-1])
    assert path.read_bytes()[:4] == b"QFI\xfb"


def test_order_and_limits(tmp_path):
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    try:
        w = Qcow2Writer(FileSink(fd, "img"), M, cluster_size=64 * K)
        w.write_clusters(3, b"a" * 64 * K)
        with pytest.raises(ValueError):
            w.write_clusters(3, b"a" * 64 * K)  # not ascending
        with pytest.raises(ValueError):
            w.write_clusters(16, b"a" * 64 * K)  # past the end
        with pytest.raises(ValueError):
            w.write_compressed(5, b"a" * 64 * K)  # not smaller than a cluster
        for kw in (
            dict(cluster_size=1000),
            dict(cluster_size=4 * M),
            dict(cluster_size=256),
            dict(extended_l2=True, cluster_size=8 * K),
            dict(extended_l2=True, version=2),
            dict(compression_type="zstd", version=2),
            dict(compression_type="lz4"),
            dict(backing_file="x" * 1024),
            dict(backing_file="b" * 400, cluster_size=512),
        ):
            with pytest.raises(ConvertError):
                Qcow2Writer(FileSink(fd, "img"), M, **kw)
        with pytest.raises(ConvertError):
            Qcow2Writer(FileSink(fd, "img"), 1 << 50, cluster_size=512)  # L1 beyond QEMU's 32 MiB limit
    finally:
        os.close(fd)


def test_memory_does_not_depend_on_virtual_size(tmp_path):
    """A 256 TiB image with a little data: nothing sized by the virtual disk but the L1 pages."""
    path = tmp_path / "huge.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    w = Qcow2Writer(FileSink(fd, "img"), 256 << 40, cluster_size=64 * K)
    w.write_clusters(0, b"a" * 64 * K)
    w.write_clusters((200 << 40) // (64 * K), b"b" * 64 * K)
    w.finish()
    os.close(fd)
    audit_size = path.stat().st_size
    assert path.stat().st_blocks * 512 < 2 * M < audit_size
    with open_chain(path, OpenOptions(format="qcow2")) as chain:
        assert chain.pread(200 << 40, 2) == b"bb"


def test_copied_clusters(tmp_path):
    """copy_data stores whole data clusters from runs: copied by the sink from a source file, or
    from the buffer; what no run covers stays a hole."""
    src = tmp_path / "src"
    src.write_bytes(b"\x02" * (3 * 64 * K))
    sfd = os.open(src, os.O_RDONLY)
    for ext in (False, True):
        path = tmp_path / f"p{ext}.qcow2"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        w = Qcow2Writer(FileSink(fd, str(path)), 8 * M, cluster_size=64 * K, extended_l2=ext)
        w.write_clusters(1, b"\x01" * 64 * K)
        # the last of the 4 clusters stays a hole
        w.copy_data(3 * 64 * K, 4 * 64 * K, [CopyRun(0, 3 * 64 * K, HostFile(str(src), sfd), 0)], None)
        with pytest.raises(ValueError):
            w.copy_data(2 * 64 * K, 64 * K, [], None)  # guest order
        buf = memoryview(b"\x03" * 64 * K)
        w.copy_data(100 * 64 * K, 64 * K, [CopyRun(0, 64 * K, None, 0)], buf)
        w.finish()
        os.close(fd)
        audit(path)
        with open_chain(path) as chain:
            got = chain.pread(0, 8 * M)
        want = bytearray(8 * M)
        want[64 * K : 2 * 64 * K] = b"\x01" * 64 * K
        want[3 * 64 * K : 6 * 64 * K] = b"\x02" * 3 * 64 * K
        want[100 * 64 * K : 101 * 64 * K] = b"\x03" * 64 * K
        assert got == want, ext
    os.close(sfd)
