"""Hypothesis mutants of a qemu-made dynamic VHD and of a differencing child (the tests/fuzz pattern).

Every mutant either fails with one clean line or is read; where the mutation
left the BAT alone (QEMU ignores sector bitmaps, flatfs follows them) and QEMU
accepts the image, flatfs reads exactly QEMU's bytes.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..helpers.fuzz import qemu_raw_sha
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu
from ..helpers.vhd_images import child, qemu_base

EXAMPLES = int(os.environ.get("FLATFS_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    d = tmp_path_factory.mktemp("vhdseeds")
    base = qemu_base(Qemu(), d)
    child(base, [(0, b"\x55" * 512), (3 * 4096, b"\x56" * 8192)]).write(d / "top.vhd")
    return {"base": base, "top": d / "top.vhd"}


def regions(data: bytes) -> dict[str, tuple[int, int]]:
    table = struct.unpack_from(">Q", data, 512 + 16)[0]
    return {
        "footer": (0, 512),
        "header": (512, 1536),
        "bat": (table, table + 16),
        "tail": (len(data) - 512, len(data)),
    }


@pytest.mark.qemu
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(["base", "top"]),
    region=st.sampled_from(["footer", "header", "bat", "tail"]),
    where=st.integers(0, 10**6),
    value=st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]),
    fix=st.booleans(),
)
def test_vhd_mutant(seeds, worker, tmp_path_factory, seed, region, where, value, fix):
    d = tmp_path_factory.mktemp("vhdmutant")
    for f in seeds.values():
        shutil.copy(f, d / f.name)
    img = d / seeds[seed].name
    data = bytearray(img.read_bytes())
    a, b = regions(bytes(data))[region]
    data[a + where % (b - a)] = value
    if fix and region in ("footer", "header", "tail"):  # keep the checksum right: reach the field checks
        at, size, field = {
            "footer": (0, 512, 64),
            "header": (512, 1024, 36),
            "tail": (len(data) - 512, 512, 64),
        }[region]
        data[at + field : at + field + 4] = bytes(4)
        struct.pack_into(">I", data, at + field, ~sum(data[at : at + size]) & 0xFFFFFFFF)
        if region == "footer":
            data[-512:] = data[:512]
    img.write_bytes(data)
    res = worker.ask(img)
    assert "bug" not in res, res["bug"]
    if not res["ok"]:
        assert res["oneline"] and res["error"].startswith(str(d)), res
        return
    if seed == "base" and region != "bat" and res["size"] <= 64 << 20:
        want = qemu_raw_sha(img, res["size"])
        if want is not None:
            assert res["sha"] == want, f"{region} {where} {value}: flatfs reads differ from QEMU"
