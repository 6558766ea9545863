"""convert -C/--copy-offload: data runs copied by the kernel (copy_file_range), same images.

The output with -C must be the same disk as without it (qemu-img compare, and
qemu-img check for qcow2), for raw and qcow2 sources, an external data file
and a chain with compressed clusters (read, not copied); -C refuses -c and -B
in one line; and on a file system that shares extents (XFS, reflink=1,
loop-mounted) the target's data extents are shared with the source's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..helpers.chains import qemu_chain
from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, scattered_raw
from ..helpers.loopfs import filefrag_extents, loop_xfs, loop_xfs_missing
from ..helpers.needs import require
from ..helpers.qemu import Qemu, assert_valid_copy

pytestmark = pytest.mark.qemu


def _sources(q: Qemu, d: Path) -> dict[str, Path]:
    raw = scattered_raw(d / "src.raw", 24 * M, seed=7)
    plain = d / "plain.qcow2"
    q.img("convert", "-f", "raw", "-O", "qcow2", raw, plain)
    ext = d / "ext.qcow2"
    q.create(ext, 24 * M, opts=f"data_file={d}/ext.data")  # absolute: QEMU 7.2 resolves it against its cwd
    q.io(ext, "write -P 0x61 0 1M", "write -P 0x62 5M 300k", "write -P 0 9M 64k", "write -P 0x63 20M 4M")
    chain_dir = d / "chain"
    chain_dir.mkdir()
    return {"raw": raw, "qcow2": plain, "data-file": ext, "chain": qemu_chain(q, chain_dir)}


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("kind", ["raw", "qcow2", "data-file", "chain"])
def test_copy_offload_writes_the_same_disk(qemu: Qemu, tmp_path: Path, kind: str, fmt: str) -> None:
    src = _sources(qemu, tmp_path)[kind]
    plain, offload = tmp_path / f"plain.out.{fmt}", tmp_path / f"offload.out.{fmt}"
    flatfs("convert", "-O", fmt, src, plain)
    r = flatfs("convert", "-C", "-O", fmt, "--output=json", src, offload)
    summary = json.loads(r.stdout)
    assert summary["copied"] > 0, summary  # the kernel copied data runs
    # only the chain's compressed clusters are read through flatfs; the rest is copied
    assert (summary["data-read"] > 0) == (kind == "chain"), summary
    assert_valid_copy(qemu, src, offload, fmt)
    assert qemu.img("compare", "-f", fmt, "-F", fmt, plain, offload, check=False).returncode == 0


@pytest.mark.parametrize("other", [["-c"], ["-B", "base.qcow2"]])
def test_copy_offload_refuses_compress_and_backing(qemu: Qemu, tmp_path: Path, other: list[str]) -> None:
    src = tmp_path / "src.qcow2"
    qemu.create(src, 4 * M)
    qemu.create(tmp_path / "base.qcow2", 4 * M)
    one_line_error(["convert", "-C", *other, src, tmp_path / "out.qcow2"], "-C", other[0], status=2)
    assert not (tmp_path / "out.qcow2").exists()


def test_copy_offload_shares_extents_on_reflink_xfs(qemu: Qemu, tmp_path: Path) -> None:
    why = loop_xfs_missing()
    require(why is None, why or "")
    with loop_xfs(tmp_path) as mnt:
        base = mnt / "base.qcow2"
        scattered_raw(tmp_path / "seed.raw", 32 * M, seed=3)
        qemu.img("convert", "-f", "raw", "-O", "qcow2", tmp_path / "seed.raw", base)
        top = mnt / "top.qcow2"
        qemu.create(top, 32 * M, backing=base.name, backing_fmt="qcow2")
        qemu.io(top, "write -P 0x71 1M 2M", "write -z 8M 1M")
        for fmt in ("qcow2", "raw"):
            out = mnt / f"out.{fmt}"
            flatfs("convert", "-C", "-O", fmt, top, out)
            assert_valid_copy(qemu, top, out, fmt)
            ext = filefrag_extents(out)
            shared, total = ext["shared_bytes"], ext["bytes"]
            data = sum(e["length"] for e in qemu.map(top) if e["data"])
            # nearly all of the data is shared; metadata (qcow2 tables) and the
            # tails of runs that do not fill a block are not
            assert shared >= data * 0.8 and shared <= total, (fmt, shared, total, data)
        plain = mnt / "plain.qcow2"
        flatfs("convert", top, plain)
        assert filefrag_extents(plain)["shared_bytes"] == 0  # without -C, the bytes are copied
    assert not any(str(tmp_path) in line for line in open("/proc/self/mounts"))


def test_copy_offload_across_file_systems(qemu: Qemu, tmp_path: Path) -> None:
    """Source and target on different file systems: copy_file_range copies (or falls back)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    src = _sources(qemu, tmp_path)["qcow2"]
    d = shm / f"flatfs-test-{os.getpid()}"
    d.mkdir()
    try:
        out = d / "out.qcow2"
        flatfs("convert", "-C", src, out)
        assert_valid_copy(qemu, src, out)
    finally:
        shutil.rmtree(d)
