"""Mutants of small VMDKs (header, embedded descriptor, grain directory and tables, a
compressed grain, a descriptor file): flatfs reads exactly what `qemu-img convert -O raw`
reads, or refuses with one line; never a traceback, a hang or a memory blow-up (the
worker of tests/fuzz runs each mutant under a memory cap)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.fuzz import poke, read_like_qemu_or_refused
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu
from ..helpers.vmdk_oracle import create, write_stream_vmdk

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "100"))
M = 1 << 20


def _seeds(d: Path) -> dict[str, Path]:
    q = Qemu()
    out: dict[str, Path] = {}
    (d / "plain").mkdir()
    img = create(q, d / "plain" / "disk.vmdk", 8 * M + 1536, "monolithicSparse", opts="zeroed_grain=on")
    q.io(
        img,
        "write -P 0x11 0 128k",
        "write -P 0x22 4M 64k",
        "write -z 6M 64k",
        "write -P 0x33 8M 1536",
        fmt="vmdk",
    )
    out["plain"] = img
    (d / "backed").mkdir()
    base = create(q, d / "backed" / "base.vmdk", 8 * M, "monolithicSparse")
    q.io(base, "write -P 0x44 0 8M", fmt="vmdk")
    top = create(q, d / "backed" / "top.vmdk", 8 * M, "monolithicSparse", backing=base)
    q.io(top, "write -P 0x55 1M 64k", fmt="vmdk")
    out["backed"] = top
    (d / "stream").mkdir()
    raw = d / "stream" / "src.raw"
    q.create(raw, 4 * M, fmt="raw")
    q.io(raw, "write -P 0x61 0 200k", "write -P 0x62 3M 64k", fmt="raw")
    q.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, d / "stream" / "s.vmdk")
    raw.unlink()
    out["stream"] = d / "stream" / "s.vmdk"
    (d / "export").mkdir()
    write_stream_vmdk(d / "export" / "e.vmdk", 5 * M, {0: b"\x01" * 65536, 40: b"\x02" * 3000})
    out["export"] = d / "export" / "e.vmdk"
    (d / "split").mkdir()
    img = create(q, d / "split" / "split.vmdk", 8 * M, "twoGbMaxExtentSparse")
    q.io(img, "write -P 0x71 0 64k", fmt="vmdk")
    out["split"] = img
    return out


def _regions(img: Path) -> list[tuple[int, int]]:
    data = img.read_bytes()
    if data[:4] != b"KDMV":  # a descriptor file: its text
        return [(0, len(data))]
    regions = [(0, 80), (512, 1024)]
    gd = struct.unpack_from("<Q", data, 56)[0]
    if gd == 0xFFFFFFFFFFFFFFFF:
        gd = struct.unpack_from("<Q", data, len(data) - 1024 + 56)[0]
        regions.append((len(data) - 1536, len(data)))
    if gd * 512 < len(data):
        regions.append((gd * 512, gd * 512 + 16))
        gt = struct.unpack_from("<I", data, gd * 512)[0]
        if gt and gt * 512 < len(data):
            regions.append((gt * 512, gt * 512 + 256))
            grain = struct.unpack_from("<I", data, gt * 512)[0]
            if grain > 1 and grain * 512 < len(data):
                regions.append((grain * 512, grain * 512 + 64))
    return [(a, min(b, len(data))) for a, b in regions if a < len(data)]


INTERESTING = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x200,
    0x201,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0xFFFFFFFF,
    1 << 32,
    1 << 62,
]

mutation = st.tuples(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from(["byte", "bit", "u32", "u64"]),
    st.integers(0, 255),
    st.sampled_from(INTERESTING),
)


def mutate(src: Path, dst: Path, muts) -> None:
    data = bytearray(src.read_bytes())
    regions = _regions(src)
    for r, w, how, byte, value in muts:
        a, b = regions[r % len(regions)]
        poke(data, a + w % max(1, b - a), how, byte, value, "<")
    dst.write_bytes(data)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return _seeds(tmp_path_factory.mktemp("vmdk-seeds"))


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["plain", "backed", "stream", "export", "split"]),
    muts=st.lists(mutation, min_size=1, max_size=4),
)
def test_vmdk_mutant_is_read_like_qemu_or_refused_cleanly(seeds, worker, tmp_path_factory, seed, muts):
    d = tmp_path_factory.mktemp("mutant")
    src = seeds[seed]
    for sib in src.parent.iterdir():  # parents and extent files beside the mutant
        if sib != src:
            shutil.copy(sib, d / sib.name)
    img = d / src.name
    mutate(src, img, muts)
    read_like_qemu_or_refused(worker, img, d, f"{seed} {muts}")
