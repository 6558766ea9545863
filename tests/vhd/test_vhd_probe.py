"""Probing by footer and refusing containers: a fixed VHD named *.vhd is read as one without -f
(QEMU, the oracle, reads it with -f vpc); any other name keeps QEMU's caution (raw) and info says
so. A tar archive or a compressed file is refused as the top image unless -f raw."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import tarfile
from pathlib import Path

import pytest
import zstandard

from flatfs import OpenOptions, open_chain

from ..helpers.cli import flatfs, one_line_error
from ..helpers.qemu import Qemu, assert_matches_qemu

M = 1 << 20


@pytest.fixture
def fixed(qemu: Qemu, tmp_path: Path) -> Path:
    img = qemu.create(tmp_path / "disk.vhd", "3M", fmt="vpc", opts="subformat=fixed")
    qemu.io(img, "write -P 0x11 0 64k", "write -P 0x22 2M 4k", fmt="vpc")
    return img


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["disk.vhd", "DISK.VHD", "disk.Vhd"])
def test_a_fixed_vhd_named_vhd_is_read_as_one_without_f(qemu: Qemu, fixed: Path, tmp_path: Path, name: str):
    img = tmp_path / name
    if img != fixed:
        fixed.rename(img)
    assert_matches_qemu(qemu, img, tmp_path, qemu_fmt="vpc")
    row = json.loads(flatfs("info", "--output", "json", img).stdout)[0]
    assert row["format"] == "vpc" and "footer" in row["probed"]
    assert "recognised by the vpc footer" in flatfs("info", img).stdout


@pytest.mark.qemu
def test_another_name_stays_raw_and_info_names_f_vpc(fixed: Path, tmp_path: Path):
    img = fixed.rename(tmp_path / "disk.img")
    with open_chain(img) as chain:
        assert chain.format == "raw" and chain.size == img.stat().st_size
    out = flatfs("info", img).stdout
    assert "ends with a vpc footer: -f vpc reads it" in out


@pytest.mark.qemu
@pytest.mark.parametrize(
    "damage",
    [
        (lambda b: b[: -512 + 64] + bytes([b[-512 + 64] ^ 1]) + b[-512 + 65 :]),  # checksum
        (lambda b: b[: -512 + 40] + (1 << 40).to_bytes(8, "big") + b[-512 + 48 :]),  # current size > file
    ],
    ids=["checksum", "size"],
)
def test_a_footer_that_does_not_check_out_is_not_trusted(fixed: Path, damage):
    fixed.write_bytes(damage(fixed.read_bytes()))
    with open_chain(fixed) as chain:
        assert chain.format == "raw"
    assert "probed:" not in flatfs("info", fixed).stdout


def _tar(src: Path, dst: Path) -> None:
    with tarfile.open(dst, "w") as t:
        t.add(src, arcname=src.name)


def _zstd(src: Path, dst: Path) -> None:
    dst.write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))


@pytest.mark.parametrize(
    ("suffix", "make", "words"),
    [
        (".ova", _tar, ["tar archive", "tar -xf"]),
        (".raw.gz", lambda s, d: d.write_bytes(gzip.compress(s.read_bytes())), ["gzip", "gunzip"]),
        (".raw.xz", lambda s, d: d.write_bytes(lzma.compress(s.read_bytes())), ["xz", "unxz"]),
        (".raw.bz2", lambda s, d: d.write_bytes(bz2.compress(s.read_bytes())), ["bzip2", "bunzip2"]),
        (".raw.zst", _zstd, ["zstd", "unzstd"]),
    ],
)
def test_archives_and_compressed_files_are_refused_with_what_to_do(tmp_path: Path, suffix, make, words):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x01" * 65536)
    packed = tmp_path / ("vm" + suffix)
    make(disk, packed)
    for cmd in ("info", "map"):
        one_line_error([cmd, packed], str(packed), "not a disk image", "-f raw", *words)
    with open_chain(packed, OpenOptions(format="raw")) as chain:  # -f raw: the bytes, as asked
        assert chain.format == "raw"
