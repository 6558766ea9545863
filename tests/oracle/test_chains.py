"""Backing chains 1 to 5 deep, raw and qcow2 layers, short and long backings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatfs import open_chain

from ..helpers.cli import flatfs
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu, assert_matches_qemu, project_map

K = 1024
M = 1 << 20


def build_chain(q: Qemu, d: Path, layers: list[dict]) -> Path:
    """layers: bottom first; each {fmt, size, cluster, ops}. Returns the top image."""
    below: tuple[Path, str] | None = None
    for i, spec in enumerate(layers):
        fmt = spec["fmt"]
        path = d / f"l{i}.{fmt}"
        opts = None
        if fmt == "qcow2":
            opts = ",".join(filter(None, [f"cluster_size={spec.get('cluster', 65536)}", spec.get("opts")]))
        q.create(
            path,
            spec["size"],
            fmt=fmt,
            opts=opts,
            backing=below[0].name if below else None,
            backing_fmt=below[1] if below else None,
        )
        if spec.get("ops"):
            q.io(path, *spec["ops"], fmt=fmt)
        below = (path, fmt)
    assert below is not None
    return below[0]


@pytest.mark.qemu
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_chain_depths(qemu, tmp_path, depth):
    layers = [{"fmt": "raw", "size": 6 * M, "ops": ["write -P 0x10 0 6M", "write -z 1M 1M"]}]
    sizes = [8 * M, 6 * M, 10 * M, 7 * M + 512]
    for i in range(depth - 1):
        layers.append(
            {
                "fmt": "qcow2",
                "size": sizes[i],
                "cluster": [65536, 4096, 512, 2 * M][i],
                "ops": [
                    f"write -P {0x20 + i} {i * 512 * K} 100k",
                    f"write -z {i * M + 3 * M} 64k",
                    f"discard {2 * M} 64k",
                ],
            }
        )
    top = build_chain(qemu, tmp_path, layers)
    assert_matches_qemu(qemu, top, tmp_path)


@pytest.mark.qemu
def test_backing_longer_than_overlay_is_cut(qemu, tmp_path):
    top = build_chain(
        qemu,
        tmp_path,
        [
            {"fmt": "qcow2", "size": 16 * M, "ops": ["write -P 1 0 16M"]},
            {"fmt": "qcow2", "size": 5 * M + 512, "ops": ["write -P 2 1M 4k"]},
        ],
    )
    with open_chain(top) as chain:
        assert chain.size == 5 * M + 512
        assert max(e.end for e in chain.extents()) == chain.size
    assert_matches_qemu(qemu, top, tmp_path)


@pytest.mark.qemu
def test_backing_shorter_than_overlay_reads_zeros(qemu, tmp_path):
    top = build_chain(
        qemu,
        tmp_path,
        [
            {"fmt": "raw", "size": 1 * M + 512, "ops": ["write -P 1 0 1049088"]},
            {"fmt": "qcow2", "size": 3 * M, "ops": []},
            {"fmt": "qcow2", "size": 8 * M, "ops": ["write -P 2 6M 4k"]},
        ],
    )
    with open_chain(top) as chain:
        assert chain.pread(2 * M, 4096) == bytes(4096)
    assert_matches_qemu(qemu, top, tmp_path)


@pytest.mark.qemu
def test_relative_backing_names_resolve_against_the_image_folder(qemu, tmp_path, monkeypatch):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    base = qemu.create(tmp_path / "a" / "base.qcow2", "1M")
    qemu.io(base, "write -P 7 0 64k")
    top = qemu.create(sub / "top.qcow2", "1M", backing="../base.qcow2")
    monkeypatch.chdir("/")
    with open_chain(top) as chain:
        assert chain.pread(0, 4) == b"\x07" * 4
        assert [lay.path for lay in chain.layers][1].endswith("base.qcow2")


@pytest.mark.qemu
def test_64tib_overlay_map_uses_little_memory(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", "64M")
    qemu.io(base, "write -P 1 0 1M", "write -P 2 40M 2M")
    top = qemu.create(tmp_path / "top.qcow2", "64T", backing=base)
    qemu.io(top, "write -P 3 1M 64k", "write -P 4 50T 64k", "write -z 10M 1M")
    # In a fresh process. Its peak RSS is VmHWM, not ru_maxrss: Linux carries
    # ru_maxrss across execve, so a child of a big pytest would report pytest's.
    code = (
        "import re, sys; from flatfs.cli import main\n"
        "try: main(['map', '--output=json', sys.argv[1]])\n"
        "except SystemExit: pass\n"
        "status = open('/proc/self/status').read()\n"
        "sys.stderr.write(re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(top)], capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout)
    assert int(out.stderr) < 100 * 1024, "peak RSS of `flatfs map` on a 64 TiB overlay"
    assert project_map(ours) == project_map(qemu.map(top))
    with open_chain(top) as chain:
        assert chain.pread(50 << 40, 4) == b"\x04" * 4
        assert chain.seek(2 * M, 3) == 40 * M  # SEEK_DATA jumps the hole
        assert chain.seek((50 << 40) + 65536, 4) == (50 << 40) + 65536


OPS = st.sampled_from(["write", "zero", "zero-unmap", "discard", "compress"])


@st.composite
def chains(draw):
    n = draw(st.integers(1, 5))
    layers = []
    for i in range(n):
        fmt = "raw" if i == 0 and draw(st.booleans()) else "qcow2"
        cluster = draw(st.sampled_from([512, 4096, 65536, 2 * M])) if fmt == "qcow2" else 0
        size = draw(st.integers(1, 12)) * 512 * K + draw(st.sampled_from([0, 512, 3 * 512]))
        ext = fmt == "qcow2" and cluster >= 16 * K and draw(st.booleans())
        ops: list[str] = []
        compressed: dict[int, str] = {}  # QEMU compresses only into unallocated clusters: do these first
        for _ in range(draw(st.integers(0, 6))):
            op = draw(OPS)
            if fmt == "raw" and op != "write":
                op = "write"
            gran = 512 if op != "compress" else cluster
            if gran > size:
                continue
            off = draw(st.integers(0, (size - gran) // gran)) * gran
            length = min(draw(st.integers(1, 3 * M // gran + 1)) * gran, size - off)
            if op == "compress":
                compressed[off] = f"write -c -P {draw(st.integers(1, 255))} {off} {gran}"
            elif op == "write":
                ops.append(f"write -P {draw(st.integers(1, 255))} {off} {length}")
            elif op == "zero":
                ops.append(f"write -z {off} {length}")
            elif op == "zero-unmap":
                ops.append(f"write -z -u {off} {length}")
            else:
                ops.append(f"discard {off} {length}")
        layers.append(
            {
                "fmt": fmt,
                "size": size,
                "cluster": cluster,
                "ops": [*compressed.values(), *ops],
                "opts": "extended_l2=on" if ext else None,
            }
        )
    return layers


@pytest.mark.qemu
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=chains())
def test_random_chains_match_qemu(tmp_path_factory, layers):
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    d = tmp_path_factory.mktemp("chain")
    q = Qemu()
    top = build_chain(q, d, layers)
    assert_matches_qemu(q, top, d)


@pytest.mark.qemu
def test_cli_map_json_matches_qemu(qemu, tmp_path):
    top = build_chain(
        qemu,
        tmp_path,
        [
            {"fmt": "raw", "size": 4 * M, "ops": ["write -P 1 0 1M"]},
            {"fmt": "qcow2", "size": 8 * M, "ops": ["write -P 2 2M 64k", "write -z 0 64k"]},
        ],
    )
    out = flatfs("map", "--output=json", top)
    assert project_map(json.loads(out.stdout)) == project_map(qemu.map(top))
    human = flatfs("map", top).stdout
    assert "data" in human and "zero" in human


@pytest.mark.qemu
def test_raw_file_of_odd_size_is_counted_in_whole_sectors(qemu, tmp_path):
    base = tmp_path / "odd.raw"
    base.write_bytes(bytes(range(256)) * 3 + b"x" * 232)  # 1000 bytes
    top = qemu.create(tmp_path / "top.qcow2", None, backing=base.name, backing_fmt="raw")
    for img in (base, top):
        with open_chain(img) as chain:
            assert chain.size == 1024
        assert_matches_qemu(qemu, img, tmp_path)


@pytest.mark.qemu
def test_opening_an_image_does_not_change_its_block_status(qemu, tmp_path):
    """flatfs reads the header cluster and nothing else at open.

    On ext4, reading pages over an unwritten extent puts them in the page
    cache, and SEEK_DATA then reports them as data: reading a small image's
    first 2 MiB once changed what `qemu-img map` said about its partly
    written clusters (QEMU probes those with SEEK_DATA on images that look
    metadata-preallocated).
    """
    img = qemu.create(tmp_path / "a.qcow2", 2340993, opts="cluster_size=32768")
    qemu.io(
        img,
        "write -c -P 94 1835008 131072",
        "write -c -P 43 1769472 32768",
        "write -P 131 720896 4096",
        "write -P 0 762706 54352",
        "write -z 1483776 65536",
        "write -P 126 1933824 512",
        "write -P 170 2097152 65536",
        "write -c -P 186 1441792 131072",
    )
    before = project_map(qemu.map(img))
    ours = json.loads(flatfs("map", "--output=json", img).stdout)
    assert project_map(qemu.map(img)) == before
    assert project_map(ours) == before
