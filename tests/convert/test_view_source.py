"""A mounted flatfs view as SOURCE: a sparse raw file whose data is found with SEEK_DATA."""

from __future__ import annotations

import subprocess

import pytest

from ..helpers.chains import qemu_chain
from ..helpers.cli import flatfs
from ..helpers.images import disk_usage
from ..helpers.mounts import stacked_at
from ..helpers.needs import have_fuse, require
from ..helpers.qemu import assert_valid_copy


@pytest.fixture
def view(qemu, tmp_path):
    """qemu_chain() mounted through the CLI; always unmounted."""
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    top = qemu_chain(qemu, tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        res = flatfs("mount", top, mp, check=False)
        require(res.returncode == 0, f"flatfs mount failed: {res.stderr.strip()}")
        yield top, mp / "top.raw"
    finally:
        if stacked_at(mp):
            flatfs("umount", mp, check=False)
        if stacked_at(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.mark.qemu
@pytest.mark.fuse
@pytest.mark.parametrize("args", [[], ["-c"], ["-O", "raw"]], ids=["qcow2", "zlib", "raw"])
def test_view_as_source(qemu, tmp_path, view, args):
    top, raw_view = view
    fmt = "raw" if "raw" in args else "qcow2"
    out = tmp_path / f"out.{fmt}"
    flatfs("convert", "-f", "raw", *args, raw_view, out)
    assert_valid_copy(qemu, top, out, fmt)
    ref = tmp_path / f"ref.{fmt}"
    qemu.img("convert", "-f", "raw", *(args if fmt == "raw" else ["-O", "qcow2", *args]), raw_view, ref)
    assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))


@pytest.mark.qemu
@pytest.mark.fuse
def test_view_as_target_is_refused(qemu, tmp_path, view):
    top, raw_view = view
    res = flatfs("convert", "--force", "-f", "raw", raw_view, raw_view, check=False)
    assert res.returncode == 1 and "part of the chain" in res.stderr
