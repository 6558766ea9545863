"""The direct-I/O path of a new TARGET (flatfs/convert/direct.py) against a model of the bytes.

Writers write in any mix the sink must take: runs that continue one another,
runs that start or end off a page, small writes that continue nothing
(tables, bitmaps, headers) into pages next to direct ones, and rewrites of
what was written before. Whatever the mix, the file must hold exactly the
bytes written, last write winning, once the sink has committed; a file
system that refuses direct writes, or fails one, must be handled.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from flatfs.convert import ConvertOptions, convert, direct
from flatfs.convert.sinks import FileSink
from flatfs.errors import ImageIOError

from ..helpers.images import M, scattered_raw

K = 1024


def _random_writes(rnd: random.Random, size: int, count: int) -> list[tuple[int, bytes]]:
    """Runs of mixed length, mostly ascending and continuing one another, with jumps, unaligned
    starts, small metadata writes into earlier pages, and rewrites."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    for _ in range(count):
        r = rnd.random()
        if r < 0.5:  # continue
            n = rnd.choice([512, 4 * K, 60 * K, 256 * K, 3 * M, rnd.randrange(1, 2 * M)])
        elif r < 0.75:  # jump ahead (a hole), maybe off a page
            pos += rnd.choice([0, 512, 4 * K, 100 * K, 5 * M]) + rnd.choice([0, 512, 1000])
            n = rnd.choice([64 * K, 1 * M, 5 * M, rnd.randrange(1, 9 * M)])
        elif r < 0.9:  # a small write somewhere behind (a table, a bitmap)
            at = rnd.randrange(0, max(1, pos))
            n = rnd.choice([8, 512, 4 * K, 20 * K])
            if at + n <= size:
                out.append((at, rnd.randbytes(n)))
            continue
        else:  # rewrite a range behind, large
            at = rnd.randrange(0, max(1, pos))
            n = rnd.randrange(64 * K, 6 * M)
            if at + n <= size:
                out.append((at, rnd.randbytes(n)))
            continue
        n = min(n, size - pos)
        if n <= 0:
            break
        out.append((pos, rnd.randbytes(n)))
        pos += n
    return out


def _apply(path: Path, writes: list[tuple[int, bytes]], size: int, split: bool = True) -> FileSink:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = FileSink(fd, str(path), direct=True)
    try:
        for off, data in writes:
            mv = memoryview(data)
            if split and len(mv) > 3:  # as writers do: several buffers in one write
                cut = len(mv) // 3
                sink.write([mv[:cut], mv[cut:]], off)
            else:
                sink.write([mv], off)
        sink.commit(size)
    finally:
        sink.close()
        os.close(fd)
    return sink


def _model(writes: list[tuple[int, bytes]], size: int) -> bytes:
    want = bytearray(size)
    for off, data in writes:
        want[off : off + len(data)] = data
    return bytes(want)


@pytest.mark.parametrize("seed", range(10))
def test_mixed_writes_land_exactly(tmp_path: Path, seed: int) -> None:
    size = 96 * M
    writes = _random_writes(random.Random(seed), size, 120)
    path = tmp_path / "out.img"
    _apply(path, writes, size, split=bool(seed % 2))
    assert path.read_bytes() == _model(writes, size)


def test_the_data_goes_past_the_page_cache(tmp_path: Path) -> None:
    """Long runs are written directly: afterwards, almost none of the file is in the page cache."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    size = 64 * M
    rnd = random.Random(1)
    writes = [(off, rnd.randbytes(M)) for off in range(0, size, M)]
    path = tmp_path / "out.img"
    _apply(path, writes, size)
    res = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(res.stdout.split()[0]) < size // 16
    assert path.read_bytes() == _model(writes, size)


def test_refused_direct_writes_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that opens O_DIRECT but refuses the writes (EINVAL): everything through the
    page cache, nothing lost."""
    real = os.pwrite

    def refuse(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", refuse)
    size = 40 * M
    writes = _random_writes(random.Random(7), size, 60)
    path = tmp_path / "out.img"
    _apply(path, writes, size)
    assert path.read_bytes() == _model(writes, size)


def test_a_failed_direct_write_is_the_commits_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "pwrite", full)
    path = tmp_path / "out.img"
    with pytest.raises(ImageIOError, match="No space left"):
        _apply(path, [(0, bytes(8 * M))], 8 * M)


def test_target_cache_none_is_refused_with_in_place(tmp_path: Path) -> None:
    from flatfs.convert import UsageError

    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    (tmp_path / "t.img").write_bytes(bytes(16 * M))
    with pytest.raises(UsageError, match="-t none"):
        convert(src, tmp_path / "t.img", ConvertOptions(no_create=True, target_cache="none"))


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vpc", "vhdx", "vdi", "vmdk"])
def test_convert_output_is_the_same_with_and_without(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every writer's output, byte for byte, is what the page-cache path writes."""
    from flatfs.chain import OpenOptions, open_chain

    src = tmp_path / "src.raw"
    scattered_raw(src, 48 * M, seed=3)
    outs = []
    for cache in ("none", "writeback"):
        out = tmp_path / f"out-{cache}.{fmt}"
        convert(src, out, ConvertOptions(target_format=fmt, target_cache=cache), OpenOptions(format="raw"))
        outs.append(out)
    a, b = (o.read_bytes() for o in outs)
    if fmt in ("qcow2", "raw"):
        assert a == b
        return
    # fresh ids and time stamps: the same size, and the same guest bytes read back
    assert len(a) == len(b)
    views = []
    for o in outs:
        with open_chain(str(o), OpenOptions(format=fmt)) as chain:
            buf = bytearray(chain.size)
            chain.readinto(0, memoryview(buf))
            views.append(bytes(buf))
    assert views[0] == views[1] == src.read_bytes()[: len(views[0])]


@pytest.mark.parametrize("maps", [0, 1])
def test_short_of_memory_it_still_writes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, maps: int
) -> None:
    """Under a tight RLIMIT_AS (tests/hardening), a buffer or a thread may not be had: with no
    buffer, the page cache; with one buffer and no thread, direct writes made in line."""
    real_mmap = direct.mmap.mmap
    made = [0]

    def scarce(*args: int) -> object:
        if made[0] >= maps:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        made[0] += 1
        return real_mmap(*args)

    def no_thread(self: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(direct.mmap, "mmap", scarce)
    monkeypatch.setattr(direct.threading.Thread, "start", no_thread)
    size = 40 * M
    writes = _random_writes(random.Random(11), size, 60)
    path = tmp_path / "out.img"
    _apply(path, writes, size)
    assert path.read_bytes() == _model(writes, size)


def test_the_command_line_takes_qemu_imgs_spelling(tmp_path: Path) -> None:
    from ..helpers.cli import flatfs

    src = scattered_raw(tmp_path / "src.raw", 8 * M)
    for cache in ("none", "writeback"):
        res = flatfs("convert", "-f", "raw", "-O", "raw", "-t", cache, src, tmp_path / f"{cache}.raw")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / f"{cache}.raw").read_bytes() == src.read_bytes()
    bad = flatfs("convert", "-f", "raw", "-t", "unsafe", src, tmp_path / "x.qcow2", check=False)
    assert bad.returncode == 2 and "unsafe" in bad.stderr and "Traceback" not in bad.stderr
