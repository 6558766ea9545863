"""Mount fixtures for the FUSE tests: real mounts through the CLI, always unmounted.

Every mount a test makes is registered before the CLI even runs, and torn down
with ``fusermount3 -u`` (then ``-u -z`` if something still holds it). At the
end of the session nothing may be left mounted under its temp folder (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import Qemu, flatfs, have_fuse, have_qemu, mount_table, require

FSTYPE = "fuse.flatfs"
M = 1 << 20


# -- mount table ---------------------------------------------------------------


def flatfs_mounts() -> set[str]:
    """Mount points of every flatfs mount in this mount namespace."""
    return {mp for mp, fstype in mount_table().items() if fstype == FSTYPE}


def is_mounted(mp: Path | str) -> bool:
    return os.path.realpath(mp) in flatfs_mounts()


def unmount(mp: Path | str) -> None:
    """fusermount3 -u, then a lazy unmount if the first one did not take."""
    mp = os.path.realpath(mp)
    if not is_mounted(mp):
        return
    subprocess.run(["fusermount3", "-u", mp], capture_output=True)
    if is_mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)


def daemon_pid(mp: Path | str) -> int | None:
    """The pid of the `flatfs mount ... MP` daemon (found by its command line)."""
    mp = str(mp)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "flatfs" in argv and "mount" in argv and argv and argv[-1] == mp and int(d) != os.getpid():
            return int(d)
    return None


def wait_gone(pid: int, deadline_s: float = 60.0) -> bool:
    """Wait for a process we did not fork to exit. The deadline only stops a hang."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


# -- mounting ------------------------------------------------------------------


class Mounter:
    """Mount views through the CLI; remembers every mountpoint for teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.points: list[Path] = []
        self._n = 0

    def mountpoint(self) -> Path:
        self._n += 1
        mp = self.base / f"mnt{self._n}"
        mp.mkdir(parents=True)
        return mp

    def run(self, image: Path | str, mp: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.points.append(mp)
        return flatfs("mount", *args, image, mp, check=False)

    def mount(self, image: Path, mp: Path | None = None, *args: str) -> Path:
        """Mount ``image``; return the path of the view file."""
        mp = mp or self.mountpoint()
        res = self.run(image, mp, *args)
        assert res.returncode == 0, res.stderr
        assert res.stderr == "" and res.stdout == ""
        assert is_mounted(mp)
        return mp / (Path(image).stem + ".raw") if mp.is_dir() else mp

    def close(self) -> None:
        for mp in reversed(self.points):
            unmount(mp)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    m = Mounter(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.close()


# -- chains made by qemu-img ---------------------------------------------------


class Chain:
    """A test chain: its top image, the qemu-img reference raw, and the oracle's data extents."""

    def __init__(self, name: str, image: Path, ref: Path, data: list[tuple[int, int]], size: int) -> None:
        self.name, self.image, self.ref, self.data, self.size = name, image, ref, data, size

    def __repr__(self) -> str:
        return f"Chain({self.name})"


def data_extents(entries: list[dict]) -> list[tuple[int, int]]:
    """(start, length) of every ``data: true`` run of a qemu-img map, neighbours merged."""
    out: list[list[int]] = []
    for e in entries:
        if not e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"]])
    return [(s, n) for s, n in out]


def qemu_map(q: Qemu, path: Path, fmt: str | None = None) -> list[dict]:
    args = ["map", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    return json.loads(q.img(*args).stdout)


def _finish(q: Qemu, name: str, image: Path) -> Chain:
    ref = image.with_name(image.name + ".ref.raw")
    q.img("convert", "-O", "raw", image, ref)
    return Chain(name, image, ref, data_extents(qemu_map(q, image)), ref.stat().st_size)


def build_chains(q: Qemu, d: Path) -> dict[str, Chain]:
    chains: dict[str, Chain] = {}

    # Three qcow2 layers, three cluster sizes, a short backing under a longer
    # top, zero clusters over data, partial clusters.
    c = d / "three"
    c.mkdir()
    q.create(c / "base.qcow2", "32M", opts="cluster_size=65536")
    q.io(
        c / "base.qcow2",
        "write -P 0x11 0 2M",
        "write -P 0x12 5M 64k",
        "write -z 8M 1M",
        "write -P 0x13 12M 300k",
        "write -P 0x14 31M 1M",
    )
    q.create(c / "mid.qcow2", "48M", backing="base.qcow2", opts="cluster_size=4096")
    q.io(
        c / "mid.qcow2",
        "write -P 0x21 1M 8k",
        "write -z 5M 64k",
        "write -P 0x22 40M 12k",
        "write -P 0x23 0x1234000 4k",
        "discard 12M 64k",
    )
    q.create(c / "top.qcow2", "64M", backing="mid.qcow2", opts="cluster_size=2M")
    q.io(
        c / "top.qcow2",
        "write -P 0x31 20M 4k",
        "write -P 0x32 50M 1M",
        "write -z 60M 2M",
        "write -P 0x33 62M 512",
    )
    chains["three"] = _finish(q, "three", c / "top.qcow2")

    # A sparse raw base under a qcow2 overlay.
    r = d / "rawbase"
    r.mkdir()
    q.create(r / "disk.raw", "20M", fmt="raw")
    q.io(r / "disk.raw", "write -P 0x41 0 1M", "write -P 0x42 7M 3M", "write -P 0x43 19M 1M", fmt="raw")
    q.create(r / "vm.qcow2", "20M", backing="disk.raw", backing_fmt="raw")
    q.io(r / "vm.qcow2", "write -P 0x51 512k 1M", "write -z 8M 1M", "write -P 0x52 15M 64k")
    chains["rawbase"] = _finish(q, "rawbase", r / "vm.qcow2")

    # A single, densely written qcow2 (for concurrent readers).
    s = d / "dense"
    s.mkdir()
    q.create(s / "dense.qcow2", "48M", opts="cluster_size=65536")
    cmds = [f"write -P {0x60 + i} {i * 3}M {1 + i % 3}M" for i in range(16)]
    q.io(s / "dense.qcow2", *cmds)
    chains["dense"] = _finish(q, "dense", s / "dense.qcow2")
    return chains


@pytest.fixture(scope="session")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Chain]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return build_chains(Qemu(), tmp_path_factory.mktemp("chains"))


@pytest.fixture(scope="session")
def views(chains: dict[str, Chain], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Each test chain mounted once for the session (read-only checks share it)."""
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    m = Mounter(tmp_path_factory.mktemp("views"))
    try:
        yield {name: m.mount(c.image) for name, c in chains.items()}
    finally:
        m.close()


# -- helpers shared by the tests -----------------------------------------------


def seek_walk(path: Path | str) -> list[tuple[int, int]]:
    """(start, length) of every data run, found with SEEK_DATA/SEEK_HOLE only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == 6, exc  # ENXIO: no data after pos
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert hole > data
            out.append((data, hole - data))
            pos = hole
        return out
    finally:
        os.close(fd)


def send_and_wait(pid: int, sig: signal.Signals) -> bool:
    os.kill(pid, sig)
    return wait_gone(pid)


ONE_LINE: Callable[[str], bool] = lambda err: (
    len(err.strip().splitlines()) == 1 and err.startswith("flatfs: ") and "Traceback" not in err
)
