"""Mutate the headers and tables of small qemu-made images.

For every mutant flatfs either reads exactly what `qemu-img convert -O raw`
gives (where QEMU accepts the image) or raises a clean one-line FlatfsError.
It never raises anything else, never hangs, and stays under a memory cap
(RLIMIT_AS in the worker process). `make fuzz-long` runs a bigger budget.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.fuzz import poke, qemu_raw_sha
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "150"))


def _seed_images(d: Path) -> dict[str, Path]:
    q = Qemu()
    out = {}

    def make(name, size="4M", opts=None, ops=(), backing=None):
        img = q.create(d / f"{name}.qcow2", size, opts=opts, backing=backing)
        if ops:
            q.io(img, *ops)
        out[name] = img

    base_ops = ("write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -z 2M 64k", "write -P 0x33 3M 4k")
    make("plain", ops=base_ops)
    make("v2", opts="compat=0.10", ops=base_ops)
    make("small", opts="cluster_size=512", size="1M", ops=("write -P 1 0 8k", "write -z 64k 4k"))
    make("extl2", opts="extended_l2=on", ops=("write -P 1 2k 6k", "write -z 64k 4k", "write -P 2 1M 64k"))
    make("backed", ops=("write -P 5 0 64k",), backing="plain.qcow2")
    for ctype in ("zlib", "zstd"):
        raw = d / f"{ctype}.raw"
        q.create(raw, "2M", fmt="raw")
        q.io(raw, "write -P 0x61 0 256k", "write -P 0x62 1M 64k", fmt="raw")
        img = d / f"{ctype}.qcow2"
        q.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
        out[ctype] = img
    q.img("snapshot", "-c", "s1", out["plain"])
    return out


def _regions(img: Path) -> list[tuple[int, int]]:
    """Byte ranges worth mutating: header, L1, first L2, refcount table, first data."""
    data = img.read_bytes()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_off, rt_off = struct.unpack_from(">IQQ", data, 36)
    regions = [(0, 112), (112, 512), (l1_off, l1_off + max(8, l1_size * 8)), (rt_off, rt_off + 64)]
    l2 = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    if l2:
        regions.append((l2, l2 + min(cs, 512)))
        first = struct.unpack_from(">Q", data, l2)[0]
        if first & (1 << 62):  # compressed: mutate the compressed stream
            shift = 62 - (struct.unpack_from(">I", data, 20)[0] - 8)
            off = first & ((1 << shift) - 1)
            regions.append((off, off + 64))
    return [(a, min(b, len(data))) for a, b in regions if a < len(data)]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    d = tmp_path_factory.mktemp("seeds")
    return _seed_images(d)


INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x200,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    1 << 40,
    1 << 55,
    1 << 62,
    1 << 63,
    (1 << 64) - 1,
    0x00FFFFFFFFFFFE00,
]

mutation = st.tuples(
    st.integers(0, 10**6),  # which region (mod count)
    st.integers(0, 10**6),  # where in it (mod length)
    st.sampled_from(["byte", "bit", "u32", "u64"]),
    st.integers(0, 255),
    st.sampled_from(INTERESTING),
)


def mutate(src: Path, dst: Path, muts) -> None:
    data = bytearray(src.read_bytes())
    regions = _regions(src)
    for r, w, how, byte, value in muts:
        a, b = regions[r % len(regions)]
        poke(data, a + w % max(1, b - a), how, byte, value, ">")
    dst.write_bytes(data)


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["plain", "v2", "small", "extl2", "backed", "zlib", "zstd"]),
    muts=st.lists(mutation, min_size=1, max_size=4),
)
def test_mutant_is_read_like_qemu_or_refused_cleanly(seeds, worker, tmp_path_factory, seed, muts):
    d = tmp_path_factory.mktemp("mutant")
    src = seeds[seed]
    for sib in src.parent.glob("*.qcow2"):  # the backing file must be beside the mutant
        if sib != src:
            shutil.copy(sib, d / sib.name)
    img = d / src.name
    mutate(src, img, muts)
    res = worker.ask(img)
    assert "bug" not in res, res["bug"]
    if not res["ok"]:
        assert res["oneline"], res  # every refusal is one line, whatever it is about
        # It names the file it is about: the mutant or its backing file, both in d. A
        # mutated backing name may point anywhere; the error then says "backing".
        assert res["error"].startswith(f"{d}/") or "backing" in res["error"], res
        return
    if res["size"] <= 64 << 20:
        want = qemu_raw_sha(img, res["size"])
        if want is not None:
            assert res["sha"] == want, f"{seed} {muts}: flatfs reads differ from QEMU"
