"""Every qcow2 feature a real image can hold, checked byte for byte against QEMU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flatfs import open_chain

from ..helpers.qemu import Qemu, assert_matches_qemu

M = 1 << 20

WRITES = (
    "write -P 0xa1 0 64k",
    "write -P 0xb2 1M 100k",
    "write -P 0x33 3145728 512",
    "write -P 0x44 5000k 3k",
)


def _basic(qemu: Qemu, d: Path, opts: str | None = None, size: int | str = "8M") -> Path:
    img = qemu.create(d / "img.qcow2", size, opts=opts)
    qemu.io(img, *WRITES)
    return img


def case_v3(q, d):
    return _basic(q, d)


def case_v2(q, d):
    img = _basic(q, d, "compat=0.10")
    q.io(img, "write -z 1M 64k")
    return img


def case_cluster_512(q, d):
    img = _basic(q, d, "cluster_size=512")
    q.io(img, "write -z 1M 4k", "write -P 7 7M 1536")
    return img


def case_cluster_4k(q, d):
    return _basic(q, d, "cluster_size=4096")


def case_cluster_2m(q, d):
    img = _basic(q, d, "cluster_size=2M", size=9 * M + 512)
    q.io(img, "write -z 4M 2M")
    return img


def case_odd_size(q, d):
    img = _basic(q, d, size=8 * M + 512 * 3)
    q.io(img, f"write -P 9 {8 * M} 1536")
    return img


def case_zero_plain_and_prealloc(q, d):
    img = _basic(q, d)
    q.io(
        img,
        "write -z 0 64k",  # allocated -> zero cluster keeping its offset
        "write -z -u 1M 64k",  # unmapped zero: plain zero cluster
        "write -z 6M 128k",  # never allocated -> plain zero
        "discard 5000k 64k",
    )
    return img


def case_zero_over_backing(q, d):
    base = q.create(d / "base.qcow2", "8M")
    q.io(base, "write -P 0x55 0 8M")
    top = q.create(d / "top.qcow2", "8M", backing=base)
    q.io(
        top,
        "write -z 64k 64k",
        "write -z -u 1M 128k",
        "discard 2M 64k",
        "write -P 1 3M 4k",
        "write -z 3M 64k",
    )
    return top


def _compressed(q, d, ctype):
    raw = d / "src.raw"
    q.create(raw, "8M", fmt="raw")
    q.io(raw, "write -P 0x61 0 1M", "write -P 0x62 2M 64k", "write -P 0 3M 64k", fmt="raw")
    with open(raw, "r+b") as f:  # incompressible data too
        f.seek(5 * M)
        f.write(bytes(range(256)) * 256 + __import__("os").urandom(200_000))
    img = d / "img.qcow2"
    q.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
    q.io(img, "write -P 0x70 64k 4k", f"write -c -P 0x71 {6 * M} 64k")
    return img


def case_compressed_zlib(q, d):
    return _compressed(q, d, "zlib")


def case_compressed_zstd(q, d):
    return _compressed(q, d, "zstd")


def case_compressed_small_clusters(q, d):
    raw = d / "src.raw"
    q.create(raw, "2M", fmt="raw")
    q.io(raw, "write -P 0x61 0 1M", fmt="raw")
    img = d / "img.qcow2"
    q.img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=512", raw, img)
    return img


def case_extended_l2(q, d):
    base = q.create(d / "base.qcow2", "8M")
    q.io(base, "write -P 0x11 0 8M")
    img = q.create(d / "img.qcow2", "8M", backing=base, opts="extended_l2=on")
    q.io(
        img,
        "write -P 0x22 2k 2k",
        "write -P 0x23 10k 6k",
        "write -z 20k 4k",
        "write -z -u 26k 2k",
        "write -P 0x24 1M 64k",
        "write -z 2M 64k",
        "discard 1M 2k",
        "write -P 0x25 3M 3k",
    )
    return img


def case_extended_l2_no_backing(q, d):
    img = q.create(d / "img.qcow2", "4M", opts="extended_l2=on,cluster_size=128k")
    q.io(img, "write -P 0x22 4k 4k", "write -z 64k 8k", "write -P 3 1M 1M", "write -z 1M 4k")
    return img


def case_data_file(q, d):
    img = q.create(d / "img.qcow2", "8M", opts="data_file=img.data")
    q.io(img, *WRITES, "write -z 1M 64k")
    return img


def case_data_file_raw(q, d):
    img = q.create(d / "img.qcow2", "8M", opts="data_file=img.data,data_file_raw=on")
    q.io(img, *WRITES)
    return img


def case_snapshots(q, d):
    img = _basic(q, d)
    q.img("snapshot", "-c", "snap1", img)
    q.io(img, "write -P 0xee 0 32k", "write -z 1M 64k", "write -P 0xef 7M 64k")
    q.img("snapshot", "-c", "snap2", img)
    q.io(img, "discard 7M 64k")
    return img


def case_prealloc_metadata(q, d):
    img = q.create(d / "img.qcow2", "4M", opts="preallocation=metadata")
    q.io(img, "write -P 5 0 4k", "write -P 6 2M 100k")
    return img


def case_prealloc_falloc(q, d):
    img = q.create(d / "img.qcow2", "4M", opts="preallocation=falloc")
    q.io(img, "write -P 5 0 4k")
    return img


def case_lazy_refcounts_dirty(q, d):
    img = _basic(q, d, "lazy_refcounts=on")
    with open(img, "r+b") as f:  # mark it dirty, as a crashed QEMU leaves it
        f.seek(79)
        f.write(b"\x01")
    return img


def case_corrupt_bit(q, d):
    img = _basic(q, d)
    with open(img, "r+b") as f:
        f.seek(79)
        f.write(b"\x02")
    return img


def case_bitmaps(q, d):
    img = _basic(q, d)
    q.img("bitmap", "--add", img, "b0")
    q.io(img, "write -P 0x99 2M 64k")
    return img


def case_punched_data_cluster(q, d):
    img = _basic(q, d)
    subprocess.run(["fallocate", "-p", "-o", str(5 * 65536), "-l", "65536", str(img)], check=True)
    return img


def case_big_prealloc_punched(q, d):
    img = q.create(d / "img.qcow2", "16M", opts="preallocation=full")
    q.io(img, "write -P 3 1M 64k")
    subprocess.run(["fallocate", "-p", "-o", str(4 * M), "-l", str(6 * M), str(img)], check=True)
    return img


def case_refcount_bits_1(q, d):
    return _basic(q, d, "refcount_bits=1")


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(CASES))
def test_feature_matches_qemu(qemu, tmp_path, name):
    img = CASES[name](qemu, tmp_path)
    assert_matches_qemu(qemu, img, tmp_path)


@pytest.mark.qemu
def test_snapshot_table_is_not_read_for_the_active_view(qemu, tmp_path):
    img = case_snapshots(qemu, tmp_path)
    with open_chain(img) as chain:
        assert "snapshots=2" in chain.layers[0].info()["features"]


@pytest.mark.qemu
def test_info_reports_features(qemu, tmp_path):
    img = _basic(qemu, tmp_path, "extended_l2=on,compression_type=zstd,lazy_refcounts=on")
    from flatfs.cli.info import chain_info

    with open_chain(img) as chain:
        row = chain_info(chain)[0]
    assert row["cluster-size"] == 65536 and row["compat"] == "1.1"
    assert {"extended-l2", "compression-type=zstd", "lazy-refcounts"} <= set(row["features"])
