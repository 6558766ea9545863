"""Hypothesis mutants of VDI headers and block maps, as tests/fuzz does for qcow2.

Each mutant is opened in the fuzz worker (a subprocess under a memory cap):
flatfs either reads the same bytes as ``qemu-img convert -O raw`` (where QEMU
accepts the image) or raises a one-line FlatfsError; never anything else,
never a hang.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.fuzz import poke, qemu_raw_sha
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu
from ..helpers.vdi_writer import BLOCK, ZERO, Vdi, pattern, write_registry

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "150")) // 2
INTERESTING = [0, 1, 3, 4, 0x1FF, 0x200, 0x180, 0x190, 0x100000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


def _seeds(d: Path) -> dict[str, Path]:
    q = Qemu()
    out = {}
    for name, opts in (("dynamic", None), ("static", "static=on")):
        (d / name).mkdir()
        img = q.create(d / name / "disk.vdi", "6M", fmt="vdi", opts=opts)
        q.io(img, "write -P 0x11 0 64k", "write -P 0x22 2M 1M", "write -z 4M 4k", fmt="vdi")
        out[name] = img
    vm = d / "snap"
    (vm / "Snapshots").mkdir(parents=True)
    base = Vdi(4 * BLOCK, blocks={0: pattern(1), 2: pattern(2, 9000), 3: ZERO})
    child = Vdi(4 * BLOCK, blocks={1: pattern(3), 2: ZERO}).over(base)
    base.write(vm / "disk.vdi")
    out["snapshot"] = child.write(vm / "Snapshots" / f"{{{child.create}}}.vdi")
    write_registry(vm / "VM.vbox", [(base, "disk.vdi"), (child, "x")])
    return out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return _seeds(tmp_path_factory.mktemp("vdiseeds"))


mutation = st.tuples(
    st.sampled_from([(64, 472), (0x200, 0x220)]),
    st.integers(0, 10**6),
    st.sampled_from(["byte", "bit", "u32"]),
    st.integers(0, 255),
    st.sampled_from(INTERESTING),
)


def mutate(src: Path, dst: Path, muts) -> None:
    data = bytearray(src.read_bytes())
    for (a, b), w, how, byte, value in muts:
        poke(data, a + w % (b - a), how, byte, value, "<")
    dst.write_bytes(data)


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["dynamic", "static", "snapshot"]), muts=st.lists(mutation, min_size=1, max_size=4)
)
def test_vdi_mutant_is_read_like_qemu_or_refused_cleanly(seeds, worker, tmp_path_factory, seed, muts):
    src = seeds[seed]
    d = tmp_path_factory.mktemp("vdimutant")
    if seed == "snapshot":  # keep the VM layout: the parent and registry one folder up
        shutil.copy(src.parents[1] / "disk.vdi", d / "disk.vdi")
        shutil.copy(src.parents[1] / "VM.vbox", d / "VM.vbox")
        (d / "Snapshots").mkdir()
        img = d / "Snapshots" / src.name
    else:
        img = d / src.name
    mutate(src, img, muts)
    res = worker.ask(img)
    assert "bug" not in res, res["bug"]
    if not res["ok"]:
        assert res["oneline"], res
        return
    if seed != "snapshot" and res["size"] <= 64 << 20:
        want = qemu_raw_sha(img, res["size"])
        if want is not None:
            assert res["sha"] == want, f"{seed} {muts}: flatfs reads differ from QEMU"
