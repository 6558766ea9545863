"""Mounting where real deployments trip: two mounts racing for one mountpoint, a dead mount,
--debug's libfuse noise, the -U warning. Every mount made here is unmounted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.mounts import stacked_at
from ..helpers.needs import have_fuse, require

RACES = 8


def _flatfs(*args: str) -> list[str]:
    return [sys.executable, "-m", "flatfs", *args]


def _clear(mp: Path) -> None:
    for _ in range(8):
        if not stacked_at(mp):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    assert not stacked_at(mp), f"could not unmount {mp}"


def _wait_for(view: Path, proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """Until a foreground mount's view appears (the server must stay alive meanwhile)."""
    deadline = time.monotonic() + 30
    while not view.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the mount did not appear"
        time.sleep(0.05)


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"A" * 65536)
    b.write_bytes(b"B" * 65536)
    yield a, b


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["directory", "file"])
def test_two_mounts_on_one_mountpoint_exactly_one_wins(
    tmp_path: Path, images: tuple[Path, Path], mode: str
) -> None:
    a, b = images
    mp = tmp_path / "mnt"
    if mode == "directory":
        mp.mkdir()
        view = {a: mp / "a.raw", b: mp / "b.raw"}
    else:
        mp.write_bytes(b"")
        view = {a: mp, b: mp}
    try:
        for i in range(RACES):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            p1 = subprocess.Popen(_flatfs("mount", str(first), str(mp)), stderr=subprocess.PIPE, text=True)
            p2 = subprocess.Popen(_flatfs("mount", str(second), str(mp)), stderr=subprocess.PIPE, text=True)
            results = {first: (p1.wait(60), p1.stderr.read()), second: (p2.wait(60), p2.stderr.read())}
            p1.stderr.close()
            p2.stderr.close()
            winners = [img for img, (rc, _) in results.items() if rc == 0]
            assert len(winners) == 1, results
            (loser,) = [img for img in results if img not in winners]
            rc, err = results[loser]
            lines = err.strip().splitlines()
            assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"flatfs: {mp}: "), results
            assert "another flatfs mount is starting there" in err or "already a mount point" in err, err
            # the winner's view is intact and alone: the loser never mounted or unmounted
            assert stacked_at(mp) == ["fuse.flatfs"], (i, stacked_at(mp))
            winner = winners[0]
            assert view[winner].read_bytes() == winner.read_bytes()
            res = flatfs("umount", mp, check=False)
            assert res.returncode == 0, res.stderr
            assert stacked_at(mp) == []
    finally:
        _clear(mp)


@pytest.mark.fuse
def test_a_dead_mount_is_named_as_dead(tmp_path: Path, images: tuple[Path, Path]) -> None:
    a, _ = images
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        # Killed only once it said READY=1: before that, its own ready check may be inside a
        # request to its own mount, and a process killed there cannot finish dying (the request
        # waits for the server that is going away), which is not what this test is about.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(tmp_path / "notify"))
            notify.settimeout(30)
            env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
            proc = subprocess.Popen(
                _flatfs("mount", "--foreground", str(a), str(mp)), stderr=subprocess.DEVNULL, env=env
            )
            assert b"READY=1" in notify.recv(4096)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        res = flatfs("mount", a, mp, check=False)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            f"flatfs: {mp}: a flatfs mount whose server is gone is still there; "
            f"clear it with: flatfs umount {mp}"
        ]
        res = flatfs("umount", mp, check=False)
        assert res.returncode == 0, res.stderr
        assert stacked_at(mp) == []
    finally:
        _clear(mp)


@pytest.mark.fuse
def test_debug_has_no_libfuse_thread_warning_and_u_warns_once(
    tmp_path: Path, images: tuple[Path, Path]
) -> None:
    a, _ = images
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        proc = subprocess.Popen(
            _flatfs("mount", "--debug", "-U", str(a), str(mp)), stderr=subprocess.PIPE, text=True
        )
        _wait_for(mp / "a.raw", proc)
        assert (mp / "a.raw").read_bytes() == a.read_bytes()
        flatfs("umount", mp)
        _, err = proc.communicate(timeout=30)
        assert "Ignoring invalid max threads" not in err, err
        warnings = [ln for ln in err.splitlines() if "warning: -U" in ln]
        assert len(warnings) == 1 and "torn" in warnings[0], err
    finally:
        _clear(mp)
