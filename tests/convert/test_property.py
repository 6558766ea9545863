"""Random raw sources, random writer options: the output always reads back identical."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatfs import OpenOptions, open_chain
from flatfs.convert import ConvertOptions, convert_chain

from ..helpers.qemu import Qemu, qemu_info

K = 1024
EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "40"))


@st.composite
def raw_images(draw, size=None):
    size = size if size is not None else draw(st.integers(1, 3 * 1024 * K))
    writes = []
    for _ in range(draw(st.integers(0, 12))):
        off = draw(st.integers(0, size - 1))
        n = draw(st.integers(1, min(300 * K, size - off)))
        kind = draw(st.sampled_from(["random", "byte", "zeros", "sparse-ish"]))
        seed = draw(st.integers(0, 255))
        if kind == "random":
            data = os.urandom(n)
        elif kind == "byte":
            data = bytes([seed or 1]) * n
        elif kind == "zeros":
            data = bytes(n)
        else:
            data = bytearray(n)
            data[::997] = bytes([seed | 1]) * len(data[::997])
            data = bytes(data)
        writes.append((off, data))
    return size, writes


@st.composite
def writer_options(draw):
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    cs = draw(st.sampled_from([512, 4096, 16 * K, 64 * K, 2048 * K]))
    compress = draw(st.sampled_from([None, "zlib"] + (["zstd"] if compat == "1.1" else [])))
    ext = compat == "1.1" and cs >= 16 * K and draw(st.booleans())
    sparse = draw(st.sampled_from([0, 512, 4096, 64 * K]))
    return ConvertOptions(
        compat=compat,
        cluster_size=cs,
        compress=compress is not None,
        compression_type=compress,
        extended_l2=ext,
        sparse_size=sparse,
    )


def make_raw(path: Path, size: int, writes) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path.read_bytes()


def check_qemu(qemu: Qemu, out: Path, src: Path, backing: bool) -> None:
    """qemu-img check passes, qemu-img compare says the output reads as the source,
    and the output names a backing file exactly when it was made with one."""
    res = qemu.img("check", out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("backing-filename" in qemu_info(qemu, out, "qcow2")) == backing
    res = qemu.img("compare", "-f", "raw", "-F", "qcow2", src, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# `qemu` is a function-scoped fixture shared by every example: it holds no state.
@pytest.mark.qemu
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(image=raw_images(), opts=writer_options(), base=st.one_of(st.none(), raw_images()))
def test_random_conversions_roundtrip(qemu, image, opts, base):
    size, writes = image
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = d / "src.raw"
        want = make_raw(src, size, writes)
        want += bytes(-len(want) % 512)
        out = d / "out.qcow2"
        with open_chain(src, OpenOptions(format="raw")) as chain:
            if base is None:
                convert_chain(chain, out, opts)
            else:
                make_raw(d / "base.raw", *base)
                o = opts._replace(backing="base.raw", backing_format="raw")
                with open_chain(d / "base.raw", OpenOptions(format="raw")) as bchain:
                    convert_chain(chain, out, o, backing=bchain)
        with open_chain(out, OpenOptions(allow_probe_raw=True)) as got:
            assert got.size == len(want)
            assert got.pread(0, got.size) == want
            assert len(got.layers) == (1 if base is None else 2)
        check_qemu(qemu, out, src, base is not None)
