"""Interrupted and failing conversions leave nothing behind; TARGET is never clobbered by mistake."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers.chains import qemu_chain
from ..helpers.cli import background_convert, flatfs, leftovers, wait_for_temp
from ..helpers.images import K, M, pattern, scattered_raw, write_sparse_raw
from ..helpers.needs import require

DELAY = 0.2  # seconds after each chunk of a slowed-down conversion


def many_chunks_raw(path: Path) -> Path:
    """Data regions far apart, so each one is its own chunk (and its own test delay)."""
    return write_sparse_raw(path, 1 << 30, [(i * 32 * M, pattern(64 * K, i)) for i in range(30)])


def wait_inside(folder: Path, proc: subprocess.Popen[str]) -> None:
    """Until the conversion has made its temporary file, and 0.3 s more: well inside the data."""
    wait_for_temp(folder, proc, within=30)
    time.sleep(0.3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vmdk", "vmdk-flat", "gcp"])
def test_signal_midway_leaves_nothing(tmp_path, sig, fmt):
    src = many_chunks_raw(tmp_path / "src.raw")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "target.img"
    args = {
        "qcow2": ["-O", "qcow2", "-c"],
        "raw": ["-O", "raw", "-S4k"],
        "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"],  # compression threads in flight
        "vmdk-flat": ["-O", "vmdk", "-o", "subformat=monolithicFlat"],  # two files: neither is left
        "gcp": ["--for", "gcp"],
    }[fmt]
    proc = background_convert(*args, src, out, delay=DELAY)
    wait_inside(out_dir, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert leftovers(out_dir) == []
    assert list(out_dir.iterdir()) == []  # nor a second file (a VMDK's flat extent)


def test_signal_keeps_existing_target(tmp_path):
    """With --force, an interrupted run leaves the old TARGET as it was."""
    src = many_chunks_raw(tmp_path / "src.raw")
    out = tmp_path / "target.qcow2"
    out.write_bytes(b"old content")
    proc = background_convert("--force", src, out, delay=DELAY)
    wait_inside(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert out.read_bytes() == b"old content"
    assert leftovers(tmp_path) == []


def test_sigkill_leftover_is_removed_next_time(tmp_path):
    src = many_chunks_raw(tmp_path / "src.raw")
    out = tmp_path / "target.qcow2"
    proc = background_convert(src, out, delay=DELAY)
    wait_inside(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=30)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".target.qcow2.flatfs-tmp-")
    assert not out.exists()
    res = flatfs("convert", src, out)
    assert "removed stale temporary file" in res.stderr
    assert leftovers(tmp_path) == []
    assert out.exists()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: room for the source's metadata, not its data."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    require(res.returncode == 0, f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("args", [[], ["-O", "raw"], ["-c"]], ids=["qcow2", "raw", "zlib"])
def test_disk_full_leaves_nothing(tmp_path, small_fs, args):
    src = write_sparse_raw(
        tmp_path / "src.raw", 64 * M, [(i * 4 * M, pattern(M, i)) for i in range(8)]
    )  # 8 MiB of data
    out = small_fs / "target.img"
    res = flatfs("convert", *args, src, out, check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("flatfs: ") and len(res.stderr.strip().splitlines()) == 1
    assert "No space left on device" in res.stderr and "Traceback" not in res.stderr
    assert str(out) in res.stderr  # names TARGET, not the temporary file
    assert list(small_fs.iterdir()) == []


def test_existing_target_needs_force(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    out = tmp_path / "target.qcow2"
    out.write_bytes(b"keep me")
    res = flatfs("convert", src, out, check=False)
    assert res.returncode == 1 and "--force" in res.stderr
    assert out.read_bytes() == b"keep me"
    flatfs("convert", "--force", src, out)
    assert out.read_bytes()[:4] == b"QFI\xfb"


@pytest.mark.qemu
def test_target_in_source_chain_is_refused_even_with_force(qemu, tmp_path):
    top = qemu_chain(qemu, tmp_path)
    base = tmp_path / "base.qcow2"
    before = base.read_bytes()
    link = tmp_path / "link.qcow2"
    link.symlink_to(base)
    (tmp_path / "sub").mkdir()
    hard = tmp_path / "sub" / "hardlink.qcow2"
    os.link(base, hard)
    for target in (top, base, link, hard, tmp_path / "sub" / ".." / "base.qcow2"):
        res = flatfs("convert", "--force", top, target, check=False)
        assert res.returncode == 1, target
        assert "part of the chain" in res.stderr and "Traceback" not in res.stderr
    assert base.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_target_is_source_raw(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    res = flatfs("convert", "--force", "-O", "raw", src, src, check=False)
    assert res.returncode == 1 and "part of the chain" in res.stderr


def test_target_is_backing_is_refused(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    base = tmp_path / "base.qcow2"
    flatfs("convert", src, base)
    res = flatfs("convert", "--force", "-B", "base.qcow2", src, base, check=False)
    assert res.returncode == 1 and "part of the chain" in res.stderr


def test_errors_are_one_line(tmp_path):
    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    cases = [
        ["--cluster-size", "1000"],
        ["--cluster-size", "4M"],
        ["--extended-l2", "--cluster-size", "4k"],
        ["--extended-l2", "--compat", "0.10"],
        ["-c", "--compression-type", "zstd", "--compat", "0.10"],
        ["-O", "raw", "-c"],
        ["-O", "raw", "-B", "x"],
        ["-S", "1000"],
        ["-B", "missing.qcow2"],
    ]
    for args in cases:
        res = flatfs("convert", *args, src, tmp_path / "out.img", check=False)
        # a bad option is a usage error (2); a missing backing file a runtime one (1)
        assert res.returncode == (1 if args[0] == "-B" else 2), (args, res.stderr)
        assert res.stderr.startswith("flatfs: ") and len(res.stderr.strip().splitlines()) == 1, (
            args,
            res.stderr,
        )
    res = flatfs("convert", tmp_path / "nope.raw", tmp_path / "out.img", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = flatfs("convert", src, tmp_path / "no-such-dir" / "out.img", check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert not (tmp_path / "out.img").exists() and leftovers(tmp_path) == []


@pytest.mark.qemu
def test_target_is_external_data_file_is_refused(qemu, tmp_path):
    img = tmp_path / "img.qcow2"
    qemu.create(img, 4 * M, opts="data_file=img.data")
    qemu.io(img, "write -P 3 0 1M")
    res = flatfs("convert", "--force", "-O", "raw", img, tmp_path / "img.data", check=False)
    assert res.returncode == 1 and "part of the chain" in res.stderr, res.stderr
