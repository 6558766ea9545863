"""convert -n into an existing regular file: sizes, zeroing, --target-is-zero, the writer lock,
and the order that makes an interrupted run leave nothing that looks like an image.
(Block devices: tests/deploy/test_convert_in_place.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers.cli import background_convert, flatfs
from ..helpers.images import K, M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu

COSTLY = "the cost now grows with the target's size"


def filled(path: Path, size: int, byte: int = 0xA5) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def sparse_source(tmp_path: Path) -> Path:
    return write_sparse_raw(
        tmp_path / "src.raw",
        8 * M,
        [(0, pattern(200 * K, 1)), (3 * M, pattern(64 * K, 2) + bytes(64 * K) + pattern(5 * K, 3))],
    )


@pytest.mark.qemu
@pytest.mark.parametrize("args", [[], ["--compat", "0.10"], ["-c"], ["--extended-l2"], ["-O", "raw"]])
def test_into_a_file_holding_an_old_image(qemu: Qemu, tmp_path: Path, args: list[str]) -> None:
    src = sparse_source(tmp_path)
    old = qemu.create(tmp_path / "old.qcow2", "16M")
    qemu.io(old, "write -P 0x77 0 16M")
    target = tmp_path / "target.img"
    filled(target, 24 * M)
    with open(target, "r+b") as f:
        f.write(old.read_bytes())
    res = flatfs("convert", "-n", *args, src, target)
    assert res.stderr == "" and target.stat().st_size == 24 * M
    if "raw" in args:
        assert target.read_bytes()[: 8 * M] == src.read_bytes()
        assert target.read_bytes()[-M:] == bytes(M)  # the old trailing bytes past the image are erased
    else:
        assert qemu.img("check", "-f", "qcow2", target).returncode == 0
        assert "identical" in qemu.img("compare", "-f", "qcow2", "-F", "raw", target, src).stdout


def test_a_target_too_small_is_refused_naming_the_size(tmp_path: Path) -> None:
    src = sparse_source(tmp_path)
    target = filled(tmp_path / "t.img", 256 * K)
    for args, need in ((["-O", "raw"], 8 * M), ([], None)):
        res = flatfs("convert", "-n", *args, src, target, check=False)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "too small" in res.stderr
        if need is not None:
            assert f"needs {need} bytes" in res.stderr
    assert target.read_bytes() == bytes([0xA5]) * (256 * K)  # refused before anything was written


def test_gaps_are_zeroed_and_target_is_zero_skips_it(tmp_path: Path) -> None:
    src = sparse_source(tmp_path)
    want = src.read_bytes()
    target = filled(tmp_path / "t.img", 8 * M)
    res = flatfs("convert", "-n", "-O", "raw", src, target)
    assert res.stderr == "" and target.read_bytes() == want
    target = filled(tmp_path / "z.img", 8 * M)
    res = flatfs("convert", "-n", "--target-is-zero", "-O", "raw", src, target)
    got = target.read_bytes()
    assert got[: 200 * K] == want[: 200 * K]
    assert got[1 * M : 2 * M] == bytes([0xA5]) * M  # a hole of the source: not zeroed, as promised


def test_where_zeroing_is_not_cheap_zeros_are_written_and_that_is_said_once(tmp_path: Path) -> None:
    src = sparse_source(tmp_path)
    target = filled(tmp_path / "t.img", 8 * M)
    env = dict(os.environ, FLATFS_CONVERT_TEST_NO_CHEAP_ZERO="1")
    res = flatfs("convert", "-n", "-O", "raw", src, target, env=env)
    assert target.read_bytes() == src.read_bytes()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and COSTLY in lines[0] and "--target-is-zero" in lines[0], res.stderr


def test_options_that_need_n_or_contradict_it(tmp_path: Path) -> None:
    src = sparse_source(tmp_path)
    target = filled(tmp_path / "t.img", 8 * M)
    for args, words in (
        (["--target-is-zero"], "needs -n"),
        (["-n", "--force"], "--force"),
    ):
        res = flatfs("convert", *args, src, target, check=False)
        assert res.returncode == 2 and words in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = flatfs("convert", "-n", src, tmp_path / "missing.img", check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert not (tmp_path / "missing.img").exists()
    res = flatfs("convert", "-n", "--force-share", src, src, check=False)
    assert res.returncode == 1 and "part of the chain" in res.stderr


def _wait_until_erased(target: Path, proc: subprocess.Popen[str]) -> None:
    """The run has started writing once the old header is gone."""
    deadline = time.monotonic() + 60
    while True:
        with open(target, "rb") as f:
            if f.read(4) == bytes(4):
                return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def many_chunks(tmp_path: Path) -> Path:
    return write_sparse_raw(
        tmp_path / "src.raw", 64 * M, [(i * 2 * M, pattern(64 * K, i)) for i in range(32)]
    )


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_interrupted_run_leaves_nothing_that_looks_like_an_image(
    qemu: Qemu, tmp_path: Path, fmt: str
) -> None:
    src = many_chunks(tmp_path)
    old = qemu.create(tmp_path / "old.qcow2", "8M")
    target = filled(tmp_path / "t.img", 72 * M)
    with open(target, "r+b") as f:
        f.write(old.read_bytes())
    proc = background_convert("-n", "-O", fmt, src, target, delay=0.1)
    _wait_until_erased(target, proc)
    time.sleep(0.3)  # inside the data now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "no valid image" in err and len(err.strip().splitlines()) == 1
    data = target.read_bytes()
    head = 64 * K if fmt == "qcow2" else M  # the header cluster; the raw guest's first MiB
    assert data[:head] == bytes(head), "the start of the target is not all zeros"
    assert data[-M:] == bytes(M), "the end of the target is not all zeros"
    assert data[head : 8 * M] != bytes(8 * M - head), "the run had not started"
    info = qemu.img("info", "--output=json", target).stdout
    assert '"format": "raw"' in info


def test_two_runs_into_one_file_cannot_interleave(tmp_path: Path) -> None:
    """The writer lock (QEMU's): a second -n, or anything holding the file, is refused."""
    src = many_chunks(tmp_path)
    target = filled(tmp_path / "t.img", 72 * M)
    proc = background_convert("-n", "-O", "raw", src, target, delay=0.1)
    _wait_until_erased(target, proc)
    res = flatfs("convert", "-n", "-O", "raw", src, target, check=False)
    assert res.returncode == 1 and "in use by another process" in res.stderr, res.stderr
    res = flatfs("map", target, check=False)  # a reader is refused while it writes
    assert res.returncode == 1 and "in use" in res.stderr
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    res = flatfs("convert", "-n", "-O", "raw", src, target)
    assert target.read_bytes()[: 64 * M] == src.read_bytes()
