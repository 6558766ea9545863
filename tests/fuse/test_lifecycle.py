"""Mount and unmount through the CLI: background and foreground, signals,
sd_notify, a regular-file mountpoint, and every way a mount can fail."""

from __future__ import annotations

import filecmp
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ..helpers.chains import Chain
from ..helpers.cli import ONE_LINE, flatfs
from ..helpers.mounts import daemon_pid, is_mounted, seek_walk, send_and_wait, unmount, wait_gone
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.fuse


def test_background_mount_then_umount(chains: dict[str, Chain], mounter) -> None:
    c = chains["rawbase"]
    mp = mounter.mountpoint()
    view = mounter.mount(c.image, mp)
    assert view == mp / "vm.raw"
    pid = daemon_pid(mp)
    assert pid is not None and pid != os.getpid()
    assert filecmp.cmp(view, c.ref, shallow=False)
    res = flatfs("umount", mp, check=False)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mp)
    assert wait_gone(pid), "the daemon outlived its mount"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts(sig: signal.Signals, chains: dict[str, Chain], mounter) -> None:
    mp = mounter.mountpoint()
    mounter.mount(chains["three"].image, mp)
    pid = daemon_pid(mp)
    assert pid is not None
    assert send_and_wait(pid, sig)
    assert not is_mounted(mp)


def test_mount_over_a_regular_file(chains: dict[str, Chain], mounter, tmp_path: Path) -> None:
    c = chains["three"]
    target = tmp_path / "disk.img"
    target.write_bytes(b"underneath")
    view = mounter.mount(c.image, target)
    assert view == target
    st = os.stat(target)
    assert st.st_size == c.size and st.st_mode & 0o777 == 0o444
    assert filecmp.cmp(target, c.ref, shallow=False)
    assert flatfs("umount", target, check=False).returncode == 0
    assert target.read_bytes() == b"underneath"


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_foreground_sd_notify(abstract: bool, chains: dict[str, Chain], mounter, tmp_path: Path) -> None:
    c = chains["rawbase"]
    mp = mounter.mountpoint()
    mounter.points.append(mp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"flatfs-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp_path / "notify.sock")
        sock.bind(addr)
    sock.settimeout(60)  # only stops a hang; nothing is timed
    env = dict(os.environ, NOTIFY_SOCKET=addr)
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flatfs", "mount", "--foreground", str(c.image), str(mp)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.splitlines()
        assert is_mounted(mp)  # live before READY=1
        assert filecmp.cmp(mp / "vm.raw", c.ref, shallow=False)
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
        assert proc.wait(timeout=60) == 0
        assert not is_mounted(mp)
        err.seek(0)
        assert err.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        err.close()
        unmount(mp)


# -- failures: non-zero, one line, no traceback, nothing mounted ----------------


def _fails(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0
    assert ONE_LINE(res.stderr), res.stderr
    for w in words:
        assert w in res.stderr, res.stderr


def test_image_cannot_be_opened(mounter, tmp_path: Path) -> None:
    mp = mounter.mountpoint()
    _fails(mounter.run(tmp_path / "nope.qcow2", mp), "nope.qcow2")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    _fails(mounter.run(bad, mp), "bad.qcow2")
    assert not is_mounted(mp)


def test_missing_backing_file(mounter, tmp_path: Path, chains: dict[str, Chain]) -> None:
    q = Qemu()
    q.create(tmp_path / "b.qcow2", "1M")
    q.create(tmp_path / "t.qcow2", "1M", backing="b.qcow2")
    (tmp_path / "b.qcow2").unlink()
    mp = mounter.mountpoint()
    _fails(mounter.run(tmp_path / "t.qcow2", mp), "b.qcow2")
    assert not is_mounted(mp)


def test_missing_mountpoint(chains: dict[str, Chain], mounter, tmp_path: Path) -> None:
    _fails(mounter.run(chains["three"].image, tmp_path / "absent"), "does not exist")


def test_mountpoint_in_use(chains: dict[str, Chain], mounter) -> None:
    mp = mounter.mountpoint()
    mounter.mount(chains["three"].image, mp)
    _fails(mounter.run(chains["rawbase"].image, mp), "already a mount point")
    assert os.listdir(mp) == ["top.raw"]  # the first mount is untouched


def test_bad_fuse_option(chains: dict[str, Chain], mounter) -> None:
    mp = mounter.mountpoint()
    _fails(mounter.run(chains["three"].image, mp, "-o", "no_such_option_xyz"), "no_such_option_xyz")
    assert not is_mounted(mp)


def test_extra_fuse_option_is_applied(chains: dict[str, Chain], mounter) -> None:
    mp = mounter.mountpoint()
    mounter.mount(chains["three"].image, mp, "-o", "max_idle_threads=4", "--allow-other")
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if f" {mp} " in x)
    assert "allow_other" in line and "fuse.flatfs" in line


def test_umount_refuses_what_is_not_flatfs(tmp_path: Path) -> None:
    _fails(flatfs("umount", tmp_path, check=False), "not mounted")
    _fails(flatfs("umount", "/proc", check=False), "not a flatfs mount")


def test_dead_mount_is_reported_and_cleaned(chains: dict[str, Chain], mounter) -> None:
    """SIGKILL leaves a dead mount: mount refuses it with a hint, umount removes it."""
    mp = mounter.mountpoint()
    mounter.mount(chains["three"].image, mp)
    pid = daemon_pid(mp)
    assert pid is not None
    assert send_and_wait(pid, signal.SIGKILL)
    assert is_mounted(mp)
    with pytest.raises(OSError) as ei:  # attributes may be cached, opens are not
        with open(mp / "top.raw", "rb") as f:
            f.read(1)
    assert ei.value.errno in (103, 107)  # ECONNABORTED or ENOTCONN
    res = mounter.run(chains["three"].image, mp)
    _fails(res, "flatfs umount")
    res = flatfs("umount", mp, check=False)
    assert res.returncode == 0, res.stderr
    assert not is_mounted(mp)
    assert flatfs("umount", "--quiet", mp, check=False).returncode == 0


def test_libfuse3_is_forced(chains: dict[str, Chain], mounter) -> None:
    """FUSE_LIBRARY_NAME=fuse would make mfusepy pick libfuse 2 first; flatfs overrides it."""
    c = chains["three"]
    mp = mounter.mountpoint()
    mounter.points.append(mp)
    res = flatfs("mount", c.image, mp, check=False, env=dict(os.environ, FUSE_LIBRARY_NAME="fuse"))
    assert res.returncode == 0, res.stderr
    assert seek_walk(mp / "top.raw") == c.data  # lseek answered, not the ENOSYS fallback


def test_odd_names_and_mounting_over_the_image_itself(
    chains: dict[str, Chain], mounter, tmp_path: Path
) -> None:
    import shutil

    c = chains["rawbase"]
    d = tmp_path / "with space"
    d.mkdir()
    image = d / "a,b c.qcow2"
    shutil.copy(c.image, image)
    shutil.copy(c.image.with_name("disk.raw"), d / "disk.raw")
    mp = d / "m p"
    mp.mkdir()
    view = mounter.mount(image, mp)
    assert view.name == "a,b c.raw"
    assert filecmp.cmp(view, c.ref, shallow=False)
    _fails(mounter.run(image, mp), "already a mount point", "flatfs umount")
    assert flatfs("umount", mp, check=False).returncode == 0
    # Over the top image itself: the chain is open before the mount hides it.
    assert mounter.mount(image, image) == image
    assert os.stat(image).st_size == c.size and filecmp.cmp(image, c.ref, shallow=False)
    assert flatfs("umount", image, check=False).returncode == 0
    assert image.read_bytes()[:4] == b"QFI\xfb"
