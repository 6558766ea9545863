"""The mounted view against qemu-img: bytes, holes, st_blocks, and tools that read it."""

from __future__ import annotations

import errno
import filecmp
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ..helpers.chains import Chain
from ..helpers.mounts import seek_walk
from ..helpers.qemu import Qemu, data_extents, qemu_map
from ..helpers.threads import run_threads

pytestmark = pytest.mark.fuse

NAMES = ["three", "rawbase", "dense"]


@pytest.mark.parametrize("name", NAMES)
def test_bytes_equal_qemu_convert(name: str, chains: dict[str, Chain], views: dict[str, Path]) -> None:
    assert filecmp.cmp(views[name], chains[name].ref, shallow=False)


@pytest.mark.parametrize("name", NAMES)
def test_qemu_img_compare(name: str, chains: dict[str, Chain], views: dict[str, Path]) -> None:
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(views[name]), str(chains[name].image)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", NAMES)
def test_seek_walk_equals_qemu_map(name: str, chains: dict[str, Chain], views: dict[str, Path]) -> None:
    assert chains[name].data, "the test chain should have data"
    assert seek_walk(views[name]) == chains[name].data


@pytest.mark.parametrize("name", NAMES)
def test_qemu_img_map_of_the_view(name: str, chains: dict[str, Chain], views: dict[str, Path]) -> None:
    got = data_extents(qemu_map(Qemu(), views[name], "raw"))
    assert got == chains[name].data


def test_seek_edges(chains: dict[str, Chain], views: dict[str, Path]) -> None:
    c, view = chains["three"], views["three"]
    last_start, last_len = c.data[-1]
    fd = os.open(view, os.O_RDONLY)
    try:
        assert os.lseek(fd, c.data[0][0], os.SEEK_DATA) == c.data[0][0]
        mid = c.data[0][0] + c.data[0][1] // 2
        assert os.lseek(fd, mid, os.SEEK_DATA) == mid  # inside data: stays
        assert os.lseek(fd, mid, os.SEEK_HOLE) == c.data[0][0] + c.data[0][1]
        # "three" ends in data: the hole after its last run is the end of the file
        assert last_start + last_len == c.size
        assert os.lseek(fd, last_start, os.SEEK_HOLE) == c.size
        with pytest.raises(OSError) as ei:  # at/after EOF
            os.lseek(fd, c.size, os.SEEK_HOLE)
        assert ei.value.errno == 6
        assert os.lseek(fd, 123, os.SEEK_SET) == 123  # ordinary seeks still work
        assert os.lseek(fd, 0, os.SEEK_END) == c.size
    finally:
        os.close(fd)


def test_seek_past_the_last_data(chains: dict[str, Chain], views: dict[str, Path]) -> None:
    """The "dense" chain ends in a hole: SEEK_DATA after its last data run is ENXIO, SEEK_HOLE stays put."""
    c, view = chains["dense"], views["dense"]
    end = c.data[-1][0] + c.data[-1][1]
    assert end < c.size, "the test chain should end in a hole"
    fd = os.open(view, os.O_RDONLY)
    try:
        for off in (end, end + 1, c.size - 1):
            with pytest.raises(OSError) as ei:  # no data after the last run
                os.lseek(fd, off, os.SEEK_DATA)
            assert ei.value.errno == errno.ENXIO
            assert os.lseek(fd, off, os.SEEK_HOLE) == off
        assert os.lseek(fd, c.data[-1][0], os.SEEK_HOLE) == end
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", NAMES)
def test_stat(name: str, chains: dict[str, Chain], views: dict[str, Path]) -> None:
    c, view = chains[name], views[name]
    st = os.stat(view)
    assert st.st_size == c.size
    assert st.st_blocks == (sum(n for _, n in c.data) + 511) // 512
    assert st.st_mode & 0o7777 == 0o444
    assert st.st_mtime_ns == os.stat(c.image).st_mtime_ns
    assert os.stat(view.parent).st_mode & 0o7777 == 0o555
    assert os.listdir(view.parent) == [view.name]
    assert subprocess.run(
        ["du", "-B1", str(view)], capture_output=True, text=True, check=True
    ).stdout.split()[0] == str(st.st_blocks * 512)


def test_open_for_write_is_erofs(views: dict[str, Path]) -> None:
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as ei:
            os.open(views["three"], flags)
        assert ei.value.errno == 30, flags


@pytest.mark.parametrize("name", ["three", "rawbase"])
def test_cp_sparse_allocates_no_more_than_data(
    name: str, chains: dict[str, Chain], views: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(views[name]), str(out)], check=True)
    assert filecmp.cmp(out, chains[name].ref, shallow=False)
    # Data runs are counted in whole 4 KiB blocks of the host file system. The copy's own
    # SEEK_DATA runs, not st_blocks: st_blocks also counts the file system's extent-tree
    # blocks, one more 4 KiB block whenever a busy machine fragments the copy.
    blocks = set()
    for s, n in chains[name].data:
        blocks.update(range(s // 4096, (s + n + 4095) // 4096))
    copied = set()
    for s, n in seek_walk(out):
        copied.update(range(s // 4096, (s + n + 4095) // 4096))
    assert copied <= blocks, sorted(copied - blocks)[:8]


@pytest.mark.parametrize("name", ["three", "rawbase"])
def test_qemu_img_convert_from_the_view(
    name: str, chains: dict[str, Chain], views: dict[str, Path], tmp_path: Path
) -> None:
    q = Qemu()
    out = tmp_path / "out.qcow2"
    q.img("convert", "-f", "raw", "-O", "qcow2", views[name], out)
    res = q.img("compare", out, chains[name].image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_eight_threads_random_reads(chains: dict[str, Chain], views: dict[str, Path]) -> None:
    c, view = chains["dense"], views["dense"]
    ref = c.ref.read_bytes()
    start = threading.Barrier(8)
    errors: list[str] = []

    def worker(i: int) -> None:
        rng = random.Random(1000 + i)
        # Half the readers use O_DIRECT so their requests reach the daemon
        # instead of the page cache the others fill.
        flags = os.O_RDONLY | (os.O_DIRECT if i % 2 else 0)
        fd = os.open(view, flags)
        try:
            start.wait()
            for _ in range(150):
                off = rng.randrange(0, c.size)
                n = rng.choice([1, 511, 4096, 65536, 200_000, 1 << 20])
                got = os.pread(fd, n, off)
                if got != ref[off : off + n]:
                    errors.append(f"thread {i}: {n} bytes at {off:#x} differ")
                    return
        except Exception as exc:
            errors.append(f"thread {i}: {exc!r}")
        finally:
            os.close(fd)

    run_threads(worker, 8)
    assert not errors, errors


def test_worker_threads_that_come_and_go(chains: dict[str, Chain], mounter) -> None:
    """-o max_idle_threads=1: libfuse ends idle workers after each burst, so many more
    threads serve requests than flatfs keeps a Python thread state for (PIN_MAX).
    Every answer must still be right, and the mount must come down cleanly."""
    c = chains["three"]
    mp = mounter.mountpoint()
    view = mounter.mount(c.image, mp, "-o", "max_idle_threads=1")
    ref = c.ref.read_bytes()
    errors: list[str] = []

    def worker(i: int) -> None:
        rng = random.Random(2000 + i)
        fd = os.open(view, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(60):
                off = rng.randrange(0, c.size) // 4096 * 4096
                got = os.pread(fd, 65536, off)
                if got != ref[off : off + 65536]:
                    errors.append(f"thread {i}: read at {off:#x} differs")
                    return
            if seek_walk(view) != c.data:
                errors.append(f"thread {i}: the SEEK walk differs")
        except Exception as exc:
            errors.append(f"thread {i}: {exc!r}")
        finally:
            os.close(fd)

    for _ in range(6):  # bursts: workers start, then go idle and exit
        run_threads(worker, 8)
        assert not errors, errors
    assert data_extents(qemu_map(Qemu(), view, "raw")) == c.data


def test_huge_sparse_overlay_seek(tmp_path: Path, mounter, capsys: pytest.CaptureFixture[str]) -> None:
    """A 64 TiB sparse overlay: the walk is exact; the cost per lseek is reported, not asserted."""
    q = Qemu()
    q.create(tmp_path / "huge.qcow2", "64T")
    q.io(tmp_path / "huge.qcow2", "write -P 3 63T 64k")
    q.create(tmp_path / "top.qcow2", "64T", backing="huge.qcow2")
    q.io(tmp_path / "top.qcow2", "write -P 1 40T 64k", "write -P 2 1G 64k")
    view = mounter.mount(tmp_path / "top.qcow2")
    want = data_extents(qemu_map(q, tmp_path / "top.qcow2"))
    t = time.perf_counter()
    got = seek_walk(view)
    per_call = (time.perf_counter() - t) / (2 * len(got) + 1)
    assert got == want
    assert os.stat(view).st_blocks == 3 * 65536 // 512
    with capsys.disabled():
        print(f"\n64 TiB overlay: {per_call * 1e3:.3f} ms per SEEK_DATA/SEEK_HOLE", end="")


def test_reading_the_view_leaves_the_image_block_status_alone(tmp_path: Path, mounter) -> None:
    """Reads through the view must not change what `qemu-img map` says about the image.

    A raw base whose zeroed ranges are ext4 unwritten extents (qemu-io `write -z`
    uses fallocate), right after its data: readahead past the data would fill the
    page cache over them, ext4's SEEK_DATA would then call them data, and the
    image's map would no longer match the view's SEEK walk (computed at mount).
    """
    q = Qemu()
    base = tmp_path / "base.raw"
    base.write_bytes(b"")
    os.truncate(base, 64 << 20)
    q.io(base, *[f"write -P {i + 1} {i * 16 << 20} 4M" for i in range(4)], fmt="raw")
    q.io(base, *[f"write -z {(i * 16 << 20) + (4 << 20)} 1M" for i in range(4)], fmt="raw")
    fd = os.open(base, os.O_RDONLY)  # cold: evict the base's pages, so reads reach the disk
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    top = q.create(tmp_path / "top.qcow2", 64 << 20, backing=base, backing_fmt="raw")
    before = data_extents(qemu_map(q, top))
    # The zeroed ranges start as holes (else there is nothing for a read to change):
    # the image's data is the four 4 MiB writes and nothing else.
    assert before == [(i * 16 << 20, 4 << 20) for i in range(4)], before
    view = mounter.mount(top)
    with open(view, "rb") as f:  # a buffered, sequential read of it all
        while f.read(1 << 20):
            pass
    assert seek_walk(view) == before
    assert data_extents(qemu_map(q, top)) == before
