"""Races on TARGET, run truly concurrently: two converts to one TARGET, a TARGET created during the
run, and stale temporary files told from live ones by their writer's lock (not by a PID)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flatfs.convert import safety

from ..helpers.cli import TEMP_MARK, background_convert, flatfs, leftovers, wait_for_temp
from ..helpers.images import K, M, pattern, write_sparse_raw

DELAY = 0.05  # seconds after each chunk of a slowed-down conversion


def chunky_raw(path: Path, chunks: int) -> Path:
    """Data regions far apart, each its own chunk (and its own test delay)."""
    return write_sparse_raw(path, chunks * 4 * M, [(i * 4 * M, pattern(64 * K, i)) for i in range(chunks)])


def test_of_two_converts_to_one_target_exactly_one_wins(tmp_path: Path) -> None:
    src = chunky_raw(tmp_path / "src.raw", 6)
    want = src.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    appeared = 0
    for i in range(8):
        out = out_dir / f"t{i}.img"
        procs = [
            background_convert("-O", "raw", "-S", "0", src, out, delay=DELAY),
            background_convert("-O", "raw", src, out, delay=DELAY),
        ]
        results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 1], results
        (loser,) = [err for rc, _, err in results if rc == 1]
        assert loser.startswith(f"flatfs: {out}: ") and len(loser.strip().splitlines()) == 1, loser
        appeared += "appeared while the conversion ran" in loser
        assert out.read_bytes() == want
        assert leftovers(out_dir) == []
    # the concurrent path (both past the start check) was taken, not only the early refusal
    assert appeared > 0


def test_a_target_created_during_the_run_is_not_replaced(tmp_path: Path) -> None:
    src = chunky_raw(tmp_path / "src.raw", 8)
    for i, fmt in enumerate(["qcow2", "raw", "qcow2"]):
        out = tmp_path / f"target{i}.img"
        proc = background_convert("-O", fmt, src, out, delay=DELAY)
        wait_for_temp(tmp_path, proc, within=60)
        out.write_bytes(b"made by someone else")  # while the convert writes its temporary file
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "appeared while the conversion ran" in err and "--force" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert out.read_bytes() == b"made by someone else"
        assert leftovers(tmp_path) == []


def test_with_force_a_target_created_during_the_run_is_replaced(tmp_path: Path) -> None:
    src = chunky_raw(tmp_path / "src.raw", 6)
    out = tmp_path / "target.img"
    proc = background_convert("-O", "raw", "--force", src, out, delay=DELAY)
    wait_for_temp(tmp_path, proc, within=60)
    out.write_bytes(b"made by someone else")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.read_bytes() == src.read_bytes()
    assert leftovers(tmp_path) == []


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process (as on another host: its PID is not in the name) holds a temp's write lock."""
    code = (
        "import os, sys\n"
        "from flatfs.hostio import try_lock_whole\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "assert try_lock_whole(fd, exclusive=True)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_stale_temporaries_are_told_by_their_lock_not_their_pid(tmp_path: Path) -> None:
    src = write_sparse_raw(tmp_path / "src.raw", 4 * M, [(0, pattern(64 * K, 1))])
    dead_pid = 4_000_000  # above pid_max: no such process here, as for a writer on another host
    locked = tmp_path / f".other.img{TEMP_MARK}{dead_pid}-0badcafe"
    mine = tmp_path / f".target.img{TEMP_MARK}{os.getpid()}-deadbeef"  # a live PID, but no lock
    other_target = tmp_path / f".vm.qcow2{TEMP_MARK}{dead_pid}-12345678"
    not_ours = [
        f".target.img{TEMP_MARK}1-deadbee",  # 7 hex digits
        f".target.img{TEMP_MARK}1-deadbeef.bak",
        f"target.img{TEMP_MARK}1-deadbeef",  # no leading dot
        f".target.img{TEMP_MARK}x-deadbeef",
    ]
    for p in (locked, mine, other_target, *(tmp_path / n for n in not_ours)):
        p.write_bytes(b"partial image")
    (tmp_path / f".link.img{TEMP_MARK}1-abcdef01").symlink_to(src)
    holder = _hold_lock(locked)
    try:
        res = flatfs("convert", src, tmp_path / "target.img")
    finally:
        holder.communicate("")
    removed = sorted(line for line in res.stderr.splitlines() if "removed stale temporary file" in line)
    assert removed == sorted(f"flatfs: removed stale temporary file {p}" for p in (mine, other_target))
    assert locked.exists() and not mine.exists() and not other_target.exists()
    assert all((tmp_path / n).exists() for n in not_ours)
    assert (tmp_path / f".link.img{TEMP_MARK}1-abcdef01").is_symlink()
    # once its writer is gone, the same file is stale
    res = flatfs("convert", src, tmp_path / "again.img")
    assert f"removed stale temporary file {locked}" in res.stderr and not locked.exists()


def test_a_running_convert_keeps_its_temporary_against_another_in_the_folder(tmp_path: Path) -> None:
    src = chunky_raw(tmp_path / "src.raw", 8)
    proc = background_convert(src, tmp_path / "slow.img", delay=DELAY)
    wait_for_temp(tmp_path, proc, within=60)
    (temp,) = leftovers(tmp_path)
    res = flatfs("convert", "-O", "raw", src, tmp_path / "fast.img")
    assert "removed stale" not in res.stderr
    assert (tmp_path / temp).exists()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert leftovers(tmp_path) == []


def _no_renameat2(src: str, dst: str, flags: int) -> None:
    raise OSError(errno.EINVAL, "not supported here")


def _no_link(*args: object, **kw: object) -> None:
    raise OSError(errno.EPERM, "no hard links here")


@pytest.mark.parametrize("without", [[], ["renameat2"], ["renameat2", "link"]])
def test_the_no_replace_rename_and_its_fallbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, without: list[str]
) -> None:
    if "renameat2" in without:
        monkeypatch.setattr(safety, "_renameat2", _no_renameat2)
    if "link" in without:
        monkeypatch.setattr(safety.os, "link", _no_link)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"new")
    b.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        safety.rename_noreplace(str(a), str(b))
    assert a.read_bytes() == b"new" and b.read_bytes() == b"old"
    b.unlink()
    safety.rename_noreplace(str(a), str(b))
    assert not a.exists() and b.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
