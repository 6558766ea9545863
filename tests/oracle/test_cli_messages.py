"""What the CLI says and how it ends: pipes closed early, full disks, bad option values, warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M
from ..helpers.vmdk_oracle import create as create_vmdk


@pytest.fixture
def many_runs(tmp_path) -> Path:
    """A sparse raw file whose map is far longer than a pipe holds (4096 data runs)."""
    img = tmp_path / "runs.raw"
    with open(img, "wb") as f:
        for i in range(4096):
            f.seek(i * 64 * 1024)
            f.write(b"x" * 4096)
        f.truncate(4096 * 64 * 1024)
    return img


@pytest.mark.parametrize("cmd", [["map"], ["map", "--output", "json"], ["info"]])
def test_a_reader_that_goes_away_ends_quietly_with_status_0(many_runs, cmd):
    p = subprocess.Popen(
        [sys.executable, "-m", "flatfs", *cmd, str(many_runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read()
    assert p.wait() == 0 and err == ""


def test_a_full_disk_is_one_line_and_status_1(many_runs):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "flatfs", "map", str(many_runs)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert r.returncode == 1 and r.stderr.startswith("flatfs: ") and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["map", "--search-dir", "{missing}"], "--search-dir"),
        (["info", "--backing-dir", "{missing}"], "--backing-dir"),
        (["map", "--max-depth", "0"], "--max-depth"),
        (["info", "-f", "qed"], "-f"),
        (["mount", "-o", "ro,rw"], "-o"),
        (["mount", "-o", "fsname=x"], "-o"),
    ],
)
def test_a_bad_option_value_is_a_usage_error_naming_it(many_runs, tmp_path, args, option):
    args = [a.format(missing=tmp_path / "nowhere") for a in args]
    extra = [str(tmp_path / "mnt")] if args[0] == "mount" else []
    r = flatfs(*args, many_runs, *extra, check=False)
    assert r.returncode == 2 and f"'{option}" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.qemu
def test_a_vmdk_in_info_is_words_not_python(qemu, tmp_path):
    img = create_vmdk(qemu, tmp_path / "d.vmdk", 1 * M, "monolithicSparse")
    out = flatfs("info", img).stdout
    assert "[" not in out.replace("data map:      [", "").replace("[0]", ""), out


@pytest.mark.qemu
def test_info_f_vmdk_of_a_qcow2_names_what_it_is(qemu, tmp_path):
    img = qemu.create(tmp_path / "base.qcow2", "1M")
    line = one_line_error(["info", "-f", "vmdk", img], "is a qcow2 image, not a VMDK")
    assert "parent" not in line


@pytest.mark.qemu
@pytest.mark.fuse
def test_mount_ignore_parent_id_warns_once_like_force_share(qemu, mounter, tmp_path):
    img = qemu.create(tmp_path / "img.qcow2", "1M")
    r = mounter.run(img, mounter.mountpoint(), "--ignore-parent-id")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("flatfs: warning: --ignore-parent-id") == 1, r.stderr
