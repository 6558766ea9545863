"""Faults, hostile images and load on a mounted view, through the CLI.

* A layer file (qcow2 base, raw base, external data file) shrinks under a
  live mount: reads of what it lost fail with EIO, request by request; every
  other read is still right and the daemon keeps serving.
* Sixteen readers hammer a chain of compressed, zero and data clusters: every
  read is right and the daemon's memory stays flat.
* A malformed image is refused by `flatfs mount` with one line and nothing
  mounted; a corruption only a read can find gives EIO for that read only.

Reads that must reach the daemon use O_DIRECT (the view is page-cached) or
follow a drop of the page cache.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..helpers.cli import ONE_LINE, error_line
from ..helpers.mounts import Mounter, daemon_pid, is_mounted, seek_walk, unmount
from ..helpers.needs import IN_CI
from ..helpers.qcow2_edits import BROKEN, CS, OPEN_CASES, READ_CASES, TABLE_CASES
from ..helpers.qemu import Qemu, data_extents, qemu_map
from ..helpers.threads import run_threads

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

K = 1 << 10
M = 1 << 20


# -- helpers -------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] not in "ZX"
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def drop_caches() -> bool:
    """Drop the page cache so that buffered reads of the view reach the daemon."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def pread(view: Path, off: int, n: int, direct: bool = True) -> bytes:
    fd = os.open(view, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def assert_eio(view: Path, ref: bytes, off: int, n: int, direct: bool = True) -> None:
    """Reading [off, off+n) fails with EIO, never zeros or garbage.

    O_DIRECT: the request itself fails. Buffered: the page cache may first
    hand back the pages before the broken one (a short read, which must be
    right); reading on from there fails.
    """
    fd = os.open(view, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        pos, end = off, off + n
        with pytest.raises(OSError) as exc:
            while pos < end:
                got = os.pread(fd, end - pos, pos)
                assert got and not direct, f"read of {n} bytes at {off:#x} gave {len(got)} bytes, not EIO"
                assert got == ref[pos : pos + len(got)], f"{len(got)} bytes at {pos:#x} differ"
                pos += len(got)
            pytest.fail(f"reading {n} bytes at {off:#x} never failed")
        assert exc.value.errno == errno.EIO, exc.value
    finally:
        os.close(fd)


def assert_reads(view: Path, ref: bytes, ranges: list[tuple[int, int]], direct: bool = True) -> None:
    for off, n in ranges:
        got = pread(view, off, n, direct)
        assert got == ref[off : off + n], f"{n} bytes at {off:#x} differ from qemu-img convert"


def assert_serving(mp: Path, pid: int) -> None:
    assert alive(pid), "the daemon died"
    assert is_mounted(mp), "the mount is gone"


def check_fault(
    view: Path, mp: Path, pid: int, ref: bytes, good: list[tuple[int, int]], bad: list[tuple[int, int]]
) -> None:
    """``bad`` reads fail with EIO, ``good`` ones are right, in any order, direct or buffered."""
    for direct in (True, False):
        if not direct and not drop_caches():
            # Buffered reads would come from the page cache; checking them needs root.
            assert not IN_CI, "CI=true but the page cache cannot be dropped: buffered reads unchecked"
            continue
        for rnd in range(2):  # failures must not poison later requests
            order = [(r, True) for r in good] + [(r, False) for r in bad]
            random.Random(rnd).shuffle(order)
            for (off, n), ok in order:
                if ok:
                    assert_reads(view, ref, [(off, n)], direct)
                else:
                    assert_eio(view, ref, off, n, direct)
        assert_serving(mp, pid)


@contextmanager
def foreground(mounter: Mounter, image: Path, log: Path, *args: str) -> Iterator[tuple[Path, Path, int]]:
    """``flatfs mount --foreground`` with stderr (its log) in ``log``; yields (view, mountpoint, pid)
    once the daemon said READY=1 (before that, its stderr is not yet the log).

    Unmounted on the way out, whatever happens.
    """
    mp = mounter.mountpoint()
    mounter.points.append(mp)
    view = mp / (image.stem + ".raw")
    name = f"flatfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)  # only stops a hang; nothing is timed
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flatfs", "mount", "--foreground", *args, str(image), str(mp)],
                env=dict(os.environ, NOTIFY_SOCKET="@" + name),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            try:
                msg = sock.recv(4096).decode()
            except TimeoutError:
                pytest.fail(f"flatfs mount --foreground never got ready: {log.read_text()}")
            assert "READY=1" in msg.splitlines(), msg
            assert is_mounted(mp) and view.exists()
            yield view, mp, proc.pid
        finally:
            unmount(mp)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise


def log_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.strip()]


def host_offset(entries: list[dict], guest: int) -> int:
    for e in entries:
        if e["start"] <= guest < e["start"] + e["length"]:
            assert e["data"] and "offset" in e, e
            return e["offset"] + guest - e["start"]
    raise AssertionError(f"guest offset {guest:#x} not mapped")


# -- 1. a layer file shrinks under a live mount ------------------------------------


def test_truncated_qcow2_base(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    """The base loses its data clusters from guest 8M on, cut in the middle of
    that cluster. Foreground, so the log can be checked: one line per
    distinct failure, never a traceback."""
    base = qemu.create(tmp_path / "base.qcow2", "16M")
    qemu.io(base, *[f"write -P {0x10 + i} {i}M 1M" for i in range(16)])
    top = qemu.create(tmp_path / "top.qcow2", "16M", backing=base.name)
    qemu.io(top, "write -P 0x77 0 64k", "write -P 0x78 12M 64k", "write -z 13M 1M")
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    want_map = data_extents(qemu_map(qemu, top))
    bmap = qemu.map(base)
    cut = host_offset(bmap, 8 * M) + 4 * K
    assert host_offset(bmap, 8 * M - CS) + CS <= cut < host_offset(bmap, 8 * M + CS)

    log = tmp_path / "mount.log"
    with foreground(mounter, top, log) as (view, mp, pid):
        assert_reads(view, ref, [(0, 2 * M), (9 * M, 64 * K)])  # before the fault
        os.truncate(base, cut)
        good = [
            (0, M),
            (M, M),
            (7 * M, M),
            (8 * M - 4 * K, 4 * K),
            (8 * M, 4 * K),  # still in the file
            (12 * M, 64 * K),
            (13 * M, M),
            (12 * M + 56 * K, 8 * K),
        ]  # the top covers these
        bad = [
            (8 * M, 64 * K),  # short read: the cluster ends 4k in
            (8 * M + 2 * K, 4 * K),  # one small request straddling the cut
            (9 * M, 64 * K),
            (10 * M + 12345, 100 * K),
            (15 * M, M),
            (11 * M, 2 * M),
        ]
        check_fault(view, mp, pid, ref, good, bad)
        # The same failing request again and again: no new line. (Small: a big
        # O_DIRECT read is split where the user buffer crosses a page, which
        # varies, and each distinct request is a distinct failure.)
        assert_eio(view, ref, 15 * M, 64 * K)
        logged = log_lines(log)
        for _ in range(20):
            assert_eio(view, ref, 15 * M, 64 * K)
        assert log_lines(log) == logged
        assert seek_walk(view) == want_map  # SEEK_DATA/SEEK_HOLE read no data
        assert os.stat(view).st_size == len(ref)
        assert_serving(mp, pid)
    lines = log_lines(log)
    text = "\n".join(lines)
    assert "Traceback" not in text and "internal error" not in text, text
    assert lines, "the failures were not logged"
    assert all(line.startswith("flatfs: ") and "base.qcow2" in line for line in lines), text
    assert len(lines) == len(set(lines)), "a failure was logged more than once"


def _raw_base(qemu: Qemu, d: Path) -> tuple[Path, Path, bytes]:
    base = qemu.create(d / "base.raw", "16M", fmt="raw")
    qemu.io(base, "write -P 0x21 0 4M", "write -P 0x22 6M 6M", fmt="raw")  # holes: 4M..6M, 12M..16M
    top = qemu.create(d / "top.qcow2", "16M", backing=base.name, backing_fmt="raw")
    qemu.io(top, "write -P 0x77 0 64k", "write -P 0x78 10M 64k", "write -z 11M 1M")
    return base, top, qemu.to_raw(top, d / "ref.raw").read_bytes()


def test_truncated_raw_base(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    base, top, ref = _raw_base(qemu, tmp_path)
    view = mounter.mount(top)
    mp = view.parent
    pid = daemon_pid(mp)
    assert pid is not None
    os.truncate(base, 8 * M + 100)  # mid data run; the hole at the end goes too
    good = [
        (0, M),
        (M, M),
        (3 * M, 2 * M),
        (7 * M, M),
        (8 * M - 4 * K, 4 * K),
        (10 * M, 64 * K),
        (11 * M, M),
    ]  # the top covers the last two
    bad = [
        (8 * M, 64 * K),  # short: 100 bytes of it are still there
        (8 * M - 4 * K, 8 * K),
        (9 * M, 4 * K),
        (10 * M + 64 * K, 4 * K),
        (12 * M, M),
        (15 * M + 512, 512),
    ]  # the hole past the cut: the file shrank
    check_fault(view, mp, pid, ref, good, bad)
    fd = os.open(view, os.O_RDONLY)
    try:  # answers that do not depend on what was lost
        assert os.lseek(fd, 2 * M, os.SEEK_DATA) == 2 * M
        assert os.lseek(fd, 2 * M, os.SEEK_HOLE) == 4 * M
    finally:
        os.close(fd)
    assert_serving(mp, pid)


def test_truncated_external_data_file(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    img = qemu.create(tmp_path / "img.qcow2", "8M", opts="data_file=img.data,data_file_raw=on")
    qemu.io(img, "write -P 0x31 0 3M", "write -P 0x32 3M 5M", "write -z 6M 64k")
    ref = qemu.to_raw(img, tmp_path / "ref.raw").read_bytes()
    view = mounter.mount(img)
    mp = view.parent
    pid = daemon_pid(mp)
    assert pid is not None
    os.truncate(tmp_path / "img.data", 4 * M + 4 * K)
    good = [(0, M), (2 * M, 2 * M), (4 * M, 4 * K), (6 * M, 64 * K)]  # 6M: a zero cluster
    bad = [(4 * M, 64 * K), (5 * M, 12345), (7 * M, M), (3 * M, 2 * M)]
    check_fault(view, mp, pid, ref, good, bad)
    assert seek_walk(view) == [(0, 6 * M), (6 * M + 64 * K, 2 * M - 64 * K)]


# -- 2. sixteen readers, memory stays flat ----------------------------------------


def _mixed_chain(qemu: Qemu, d: Path) -> Path:
    """32 MiB over three layers: zstd-compressed and plain clusters, extended L2
    subclusters, zlib-compressed writes, zero clusters, holes."""
    src = d / "src.raw"
    rng = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(32 * M)
        for i in range(0, 24, 3):
            f.seek(i * M)
            f.write(bytes([0x40 + i]) * M)  # compresses well
            f.write(rng.randbytes(512 * K))  # stays plain data
            f.write((b"%d flatfs " % i) * (50 * K))
    base = d / "base.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, base)
    src.unlink()
    mid = qemu.create(d / "mid.qcow2", "32M", backing=base.name, opts="extended_l2=on,cluster_size=128k")
    qemu.io(
        mid,
        "write -P 0x51 1M 12k",
        "write -z 3M 8k",
        "write -P 0x52 5M 300k",
        "write -z 20M 2M",
        "write -P 0x53 26M 4k",
        "write -P 0x54 30M 1M",
    )
    top = qemu.create(d / "top.qcow2", "32M", backing=mid.name)
    qemu.io(
        top,
        "write -c -P 0x61 8M 256k",
        "write -z 10M 1M",
        "write -P 0x62 12M 300k",
        "write -c -P 0x63 28M 64k",
        "write -P 0x64 31M 4k",
    )
    return top


def test_sixteen_threads_read_one_chain(qemu: Qemu, tmp_path: Path) -> None:
    """The readers below without FUSE, so that a failure points at the layer code:
    one open chain, read from sixteen threads at once (as the FUSE workers do)."""
    from flatfs import OpenOptions, open_chain

    top = _mixed_chain(qemu, tmp_path)
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    errors: list[str] = []
    with open_chain(top, OpenOptions(force_share=True)) as chain:
        go = threading.Barrier(16)

        def reader(i: int) -> None:
            rng = random.Random(i)
            try:
                go.wait()
                for _ in range(300):
                    n = rng.randint(512, 256 * K)
                    off = rng.randrange(0, 24 * M)  # mostly compressed clusters
                    if chain.pread(off, n) != ref[off : off + n]:
                        errors.append(f"reader {i}: {n} bytes at {off:#x} differ")
            except Exception as exc:
                errors.append(f"reader {i}: {exc!r}")

        run_threads(reader, 16)
    assert not errors, errors


def test_sixteen_readers_memory_stays_flat(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    top = _mixed_chain(qemu, tmp_path)
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    size = len(ref)
    view = mounter.mount(top)
    pid = daemon_pid(view.parent)
    assert pid is not None
    errors: list[str] = []
    counts = [0] * 16

    def phase(seconds: float, seed: int) -> None:
        stop = time.monotonic() + seconds  # how long to keep reading; nothing is timed
        go = threading.Barrier(16)

        def reader(i: int) -> None:
            rng = random.Random(seed * 100 + i)
            # mostly O_DIRECT, so that the requests reach the daemon
            fd = os.open(view, os.O_RDONLY | (os.O_DIRECT if i % 4 else 0))
            try:
                go.wait()
                while time.monotonic() < stop and not errors:
                    n = rng.randint(512, M)
                    off = rng.randrange(0, size)
                    got = os.pread(fd, n, off)
                    if got != ref[off : off + n]:
                        errors.append(f"reader {i}: {n} bytes at {off:#x} differ")
                    counts[i] += 1
            except Exception as exc:
                errors.append(f"reader {i}: {exc!r}")
            finally:
                os.close(fd)

        run_threads(reader, 16)

    phase(1.5, 1)  # warm-up: threads, buffers, L2 cache
    assert not errors, errors
    warm = rss_kib(pid)
    phase(5.0, 2)
    assert not errors, errors
    end = rss_kib(pid)
    assert min(counts) > 0, counts
    assert alive(pid) and is_mounted(view.parent)
    assert end - warm < 32 * 1024, f"daemon RSS grew from {warm} KiB to {end} KiB over {sum(counts)} reads"


# -- 3. malformed images through mount ----------------------------------------------

MOUNT_REFUSED = [
    "bad-magic",
    "cluster-bits-22",
    "l1-past-eof",
    "l1-size-absurd",
    "virtual-size-huge",
    "unknown-incompatible-bit",
    "backing-loop",
    "backing-self",
    "backing-is-a-directory",
    "data-file-missing",
    "header-length-past-cluster",
    "l2-past-eof",
    "subcluster-alloc-and-zero",
]


@pytest.mark.parametrize("name", MOUNT_REFUSED)
def test_malformed_image_is_not_mounted(qemu: Qemu, tmp_path: Path, mounter: Mounter, name: str) -> None:
    make = OPEN_CASES.get(name) or TABLE_CASES[name]
    img, words = make(qemu, tmp_path)
    extra = ("-f", "qcow2") if name == "bad-magic" else ()
    mp = mounter.mountpoint()
    res = mounter.run(img, mp, *extra)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert ONE_LINE(res.stderr), res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    assert not is_mounted(mp)
    assert daemon_pid(mp) is None, "a daemon outlived the failed mount"
    assert os.listdir(mp) == []
    # the same line `flatfs map` gives
    assert res.stderr.strip() == error_line("map", *(("-f", "qcow2") if extra else ()), img)


def test_virtual_size_zero(qemu: Qemu, mounter: Mounter, tmp_path: Path) -> None:
    view = mounter.mount(qemu.create(tmp_path / "empty.qcow2", 0))
    assert os.stat(view).st_size == 0 and view.read_bytes() == b""
    assert seek_walk(view) == []


@pytest.mark.parametrize("name", sorted(READ_CASES))
def test_corruption_found_by_a_read(qemu: Qemu, tmp_path: Path, mounter: Mounter, name: str) -> None:
    img, words = READ_CASES[name](qemu, tmp_path)
    ref = (tmp_path / "ref.raw").read_bytes()
    convert_line = error_line("convert", "-O", "raw", img, tmp_path / "out.raw")
    log = tmp_path / "mount.log"
    with foreground(mounter, img, log) as (view, mp, pid):
        good = [
            (0, BROKEN),
            (BROKEN + CS, len(ref) - BROKEN - CS),
            (BROKEN - 512, 512),
            (BROKEN + CS, 512),
            (2 * M, CS),
        ]
        bad = [(BROKEN, CS), (BROKEN + 4096, 1), (BROKEN - 512, 1024), (BROKEN - CS, 3 * CS)]
        check_fault(view, mp, pid, ref, good, bad)
        assert seek_walk(view)[0][0] == 0
        assert_serving(mp, pid)
    text = log.read_text()
    assert "Traceback" not in text, text
    # the daemon logs the very message convert (and map, info) would print
    message = convert_line[len("flatfs: ") :]
    for w in words:
        assert w in message, (w, message)
    assert any(line.endswith(message) for line in log_lines(log)), (message, text)
