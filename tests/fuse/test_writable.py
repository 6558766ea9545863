"""`flatfs mount --writable`: writes land in a nameless scratch file, never in the chain; reads,
SEEK_DATA/SEEK_HOLE and st_blocks follow them; discards and zero writes are not data; kill -9 and
16 racing threads; a non-root writable mount."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.images import M
from ..helpers.mounts import daemon_pid, is_mounted, seek_walk, unmount, wait_gone
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.fuse
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(None, use_errno=True)


def punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, PUNCH, ctypes.c_int64(offset), ctypes.c_int64(length)):
        raise OSError(ctypes.get_errno(), "fallocate")


def fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Content and mtime of every file of a chain's folder."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    q = Qemu()
    d = tmp_path / "chain"
    d.mkdir()
    base = q.create(d / "base.qcow2", "8M")
    q.io(base, "write -P 0x11 0 1M", "write -P 0x12 4M 64k")
    top = q.create(d / "vm.qcow2", None, backing=base)
    q.io(top, "write -P 0x21 512k 1M")
    return top


def test_writes_stay_in_the_scratch_layer(mounter, chain: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = fingerprint(chain.parent)
    view = mounter.mount(chain, None, "--writable", "--scratch-dir", str(scratch))
    model = bytearray(view.read_bytes())
    ro_runs = seek_walk(view)
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x55" * 8192, 6 * M)  # new data in a hole
        model[6 * M : 6 * M + 8192] = b"\x55" * 8192
        os.pwrite(fd, b"\x66" * 4096, 100 * 1024)  # over the chain's data
        model[100 * 1024 : 104 * 1024] = b"\x66" * 4096
        os.pwrite(fd, bytes(65536), 4 * M)  # zeros over data: a hole now
        model[4 * M : 4 * M + 65536] = bytes(65536)
        punch(fd, 0, 64 * 1024)  # a discard, as fstrim through a loop device sends it
        model[0 : 64 * 1024] = bytes(64 * 1024)
        os.fsync(fd)
        assert os.pread(fd, 8 * M, 0) == bytes(model)
        assert os.listdir(scratch) == []  # the scratch file has no name
    finally:
        os.close(fd)
    runs = seek_walk(view)
    assert runs[0] == (64 * 1024, 1536 * 1024 - 64 * 1024)  # 64k..1.5M: chain data, discard cut off
    assert (6 * M, 8192) in runs and not any(s <= 4 * M < s + n for s, n in runs)
    assert runs != ro_runs
    assert view.stat().st_blocks == sum(n for _, n in runs) // 512
    with open(view, "rb") as f:
        assert f.read() == bytes(model)
    unmount(view.parent)
    assert fingerprint(chain.parent) == before  # content and mtime of every chain file


def test_size_is_fixed(mounter, chain: Path) -> None:
    view = mounter.mount(chain, None, "--writable")
    with pytest.raises(OSError):
        os.truncate(view, 1 * M)
    os.truncate(view, 8 * M)  # its own size: fine
    fd = os.open(view, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 8 * M)
    finally:
        os.close(fd)
    assert view.stat().st_size == 8 * M


@pytest.mark.parametrize("keep", [False, True], ids=["scratch", "overlay"])
def test_sixteen_threads_race(mounter, chain: Path, tmp_path: Path, keep: bool) -> None:
    """16 threads write and read back their own stripes while others read everywhere (with
    --overlay, what was written is read back from the overlay's clusters)."""
    extra = ("--overlay", str(tmp_path / "keep.qcow2")) if keep else ()
    view = mounter.mount(chain, None, "--writable", *extra)
    size = 8 * M
    stripe = size // 16
    errors: list[str] = []
    final: dict[int, bytes] = {}

    def worker(n: int) -> None:
        rnd = random.Random(n)
        fd = os.open(view, os.O_RDWR)
        try:
            for i in range(40):
                off = n * stripe + rnd.randrange(0, stripe - 8192) // 512 * 512
                data = bytes([n + 1, i + 1]) * 2048
                os.pwrite(fd, data, off)
                if os.pread(fd, 4096, off) != data:
                    errors.append(f"thread {n}: read back differs at {off}")
                os.pread(fd, 65536, rnd.randrange(0, size - 65536))  # somebody else's stripe
                final[off] = data
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    content = view.read_bytes()
    for off, data in final.items():
        got = content[off : off + 4096]
        assert got[:2] == data[:2] or any(o != off and o <= off < o + 4096 for o in final), off


def test_kill_9_leaves_nothing(mounter, chain: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = fingerprint(chain.parent)
    view = mounter.mount(chain, None, "--writable", "--scratch-dir", str(scratch))
    with open(view, "r+b") as f:
        f.write(b"\x77" * M)
        f.flush()
        os.fsync(f.fileno())
    pid = daemon_pid(view.parent)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    flatfs("umount", view.parent)
    assert not is_mounted(view.parent)
    assert os.listdir(scratch) == []
    assert fingerprint(chain.parent) == before


def test_enospc_in_the_scratch_dir(mounter, chain: Path, tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        view = mounter.mount(chain, None, "--writable", "--scratch-dir", str(small))
        fd = os.open(view, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x31" * 65536, 2 * M)
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"\x32" * M, 2 * M + 32768)
            assert ei.value.errno == 28  # ENOSPC
            got = os.pread(fd, 65536, 2 * M)
        finally:
            os.close(fd)
        assert got == b"\x31" * 65536  # what was acknowledged, nothing of the failed write
        pid = daemon_pid(view.parent)
        unmount(view.parent)
        assert pid is None or wait_gone(pid)  # it holds the scratch file until it exits
    finally:
        if subprocess.run(["umount", str(small)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(small)], check=True)


def test_non_root_writable_mount(chain: Path) -> None:
    """A user without root mounts --writable and reads and writes the view (mounting a partition
    file with mount -o loop is what needs root)."""
    require(os.geteuid() == 0 and shutil.which("setpriv") is not None, "needs root to become nobody")
    # libfuse opens /dev/fuse itself before it asks fusermount3; Debian's udev rule makes it 0666,
    # a container may leave it 0600: open it to others for this test only, as Debian would
    fuse_mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", fuse_mode | 0o666)
    home = Path(tempfile.mkdtemp(prefix="flatfs-nonroot-"))  # pytest's tmp folders are root-only
    try:
        os.chmod(home, 0o755)
        for p in chain.parent.iterdir():
            shutil.copy(p, home / p.name)
        Qemu().img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", home / chain.name)
        mp = home / "mnt"
        mp.mkdir()
        os.chown(mp, 65534, 65534)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        env = dict(os.environ, HOME=str(mp), TMPDIR=str(mp))
        py = [sys.executable, "-m", "flatfs"]
        res = subprocess.run(
            [*as_nobody, *py, "mount", "--writable", home / chain.name, mp],
            capture_output=True,
            text=True,
            env=env,
        )
        assert res.returncode == 0, res.stderr
        try:
            script = (
                "import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.pwrite(fd, b'u'*4096, 0); "
                "print(os.pread(fd, 4, 0))"
            )
            out = subprocess.run(
                [*as_nobody, sys.executable, "-c", script, str(mp / "vm.raw")], capture_output=True, text=True
            )
            assert out.stdout.strip() == "b'uuuu'", out.stderr
        finally:
            subprocess.run([*as_nobody, *py, "umount", mp], capture_output=True, env=env)
            if is_mounted(mp):
                unmount(mp)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        os.chmod("/dev/fuse", fuse_mode)
