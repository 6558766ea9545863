"""Random VMDK chains: subformats, sizes that are not multiples of the grain, disks above
2 GiB (so split disks have several extents), data and zero writes; flatfs agrees with
qemu-img map, and qemu-img compares and checks flatfs's converts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu
from ..helpers.vmdk_oracle import SPARSE_SUBFORMATS, SUBFORMATS, checks_out, create

M = 1 << 20
EXAMPLES = int(os.environ.get("FLATFS_VMDK_EXAMPLES", "12"))

sizes = st.one_of(
    st.integers(1, 64).map(lambda n: n * 512 * 97),  # small, odd numbers of sectors
    st.integers(0, 8).map(lambda n: (2 << 30) + n * 65536 * 3 + 512 * 5),  # over 2 GiB
)


@st.composite
def chains(draw):
    size = draw(sizes)
    n = draw(st.integers(1, 3))
    layers = []
    for i in range(n):
        sub = draw(st.sampled_from(SUBFORMATS if i == 0 else SPARSE_SUBFORMATS))
        zg = sub in SPARSE_SUBFORMATS and draw(st.booleans())
        ops = []
        for _ in range(draw(st.integers(0, 4))):
            off = draw(st.integers(0, size // 512 - 1)) * 512
            length = min(draw(st.integers(1, 512)) * 512, size - off)
            if draw(st.integers(0, 3)) == 0:
                ops.append(f"write -z {off} {length}")
            else:
                ops.append(f"write -P {draw(st.integers(1, 255))} {off} {length}")
        layers.append((sub, zg, ops))
    return size, layers


def build(q: Qemu, d: Path, size: int, layers) -> Path:
    below = None
    for i, (sub, zg, ops) in enumerate(layers):
        path = d / f"l{i}.vmdk"
        if sub == "streamOptimized":
            raw = d / "src.raw"
            q.create(raw, size, fmt="raw")
            if ops:
                q.io(raw, *ops, fmt="raw")
            q.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path)
            raw.unlink()
        else:
            create(q, path, size, sub, backing=below, opts="zeroed_grain=on" if zg else "")
            if ops:
                q.io(path, *ops, fmt="vmdk")
        below = path
    assert below is not None
    return below


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains())
def test_random_vmdk_chains(spec):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    size, layers = spec
    d = Path(tempfile.mkdtemp(prefix="vmdk-chain-"))
    try:
        top = build(Qemu(), d, size, layers)
        checks_out(Qemu(), top, d)
    finally:
        shutil.rmtree(d)
