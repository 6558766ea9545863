"""Shared test helpers.

Tests that need qemu-img or FUSE skip on a laptop without them, but FAIL when
CI=true: no silent coverage loss.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def mount_table() -> dict[str, str]:
    """Mount point -> fstype of every mount in this namespace (from /proc/self/mountinfo)."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = parts[4].encode().decode("unicode_escape") if "\\" in parts[4] else parts[4]
            out[mp] = parts[parts.index("-", 6) + 1]
    return out


def mounts_under(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Mount point -> fstype of every mount at or under ``folder`` (FUSE views, loop-mounted guests)."""
    base = os.path.realpath(folder)
    return {mp: t for mp, t in mount_table().items() if mp == base or mp.startswith(base + os.sep)}


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory):
    """Every test mounts under the session's temp folder; nothing mounted there may outlive the session.

    Scoped to this session's folder, so that a second pytest running on the
    same machine is neither blamed nor unmounted.
    """
    base = tmp_path_factory.getbasetemp()
    yield
    if not os.path.exists("/proc/self/mountinfo"):
        return
    left = mounts_under(base)
    for mp, fstype in sorted(left.items(), reverse=True):  # innermost first
        fuse = fstype == "fuse" or fstype.startswith("fuse.")
        for cmd in (
            (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]) if fuse else (["umount"], ["umount", "-l"])
        ):
            if mp in mounts_under(mp):
                subprocess.run([*cmd, mp], capture_output=True)
    assert not left, f"mounts left behind: {left}"


def build_recipe(
    q: Qemu, d: Path, layers: list[tuple[str, str, int, str | None]], cmds: list[list[str]]
) -> Path:
    """Build a chain in ``d``: ``layers`` are (file, format, size, -o options), base first,
    each qcow2 created over the layer before it; ``cmds`` are the qemu-io commands of each
    layer, where "snapshot" takes an internal snapshot. Returns the top image."""
    prev: tuple[Path, str] | None = None
    for (fname, fmt, size, opts), io in zip(layers, cmds):
        path = d / fname
        if fmt == "raw":
            q.create(path, size // 512 * 512, fmt="raw")
        else:
            q.create(
                path,
                size,
                backing=prev[0].name if prev else None,
                backing_fmt=prev[1] if prev else None,
                opts=opts,
            )
        steps = [[]]
        for c in io:
            if c == "snapshot":
                steps.append([])
            else:
                steps[-1].append(c)
        for k, step in enumerate(steps):
            if k:
                q.img("snapshot", "-c", f"s{k}", path)
            if step:
                q.io(path, *step, fmt=fmt)
        if fmt == "raw" and size % 512:
            os.truncate(path, size)
        prev = (path, fmt)
    assert prev is not None
    return prev[0]


def poke(path: str | os.PathLike[str], offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite the bytes of ``path`` at ``offset`` with ``struct.pack(fmt, *values)``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def peek(path: str | os.PathLike[str], offset: int, fmt: str) -> int:
    """The first value of ``struct.unpack(fmt, ...)`` of the bytes of ``path`` at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def run_threads(target, n: int) -> None:
    """Run ``target(i)`` for i in range(n) on n threads at once, and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def require(ok: bool, why: str) -> None:
    """Skip locally, fail in CI."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def have_qemu() -> bool:
    return all(shutil.which(t) for t in ("qemu-img", "qemu-io"))


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


@pytest.fixture
def qemu() -> Qemu:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    return Qemu()


class Qemu:
    """Thin wrappers over qemu-img and qemu-io, the oracle."""

    # QEMU 7.2 resolves a relative data_file name against its working
    # directory, not the image's folder; every call runs in the image's folder
    # so that both agree.
    def img(
        self, *args: str | os.PathLike[str], check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["qemu-img", *map(str, args)], check=check, text=True, capture_output=True, cwd=cwd
        )

    def create(
        self,
        path: Path,
        size: int | str,
        fmt: str = "qcow2",
        *,
        backing: Path | str | None = None,
        backing_fmt: str | None = None,
        opts: str | None = None,
    ) -> Path:
        cmd: list[str] = ["create", "-q", "-f", fmt]
        if backing is not None:
            cmd += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
        if opts:
            cmd += ["-o", opts]
        cmd += [str(path)]
        if size is not None:
            cmd += [str(size)]
        # relative names (backing, data_file) resolve against the image's folder, as users do
        subprocess.run(["qemu-img", *cmd], check=True, text=True, capture_output=True, cwd=Path(path).parent)
        return path

    def io(self, path: Path, *cmds: str, fmt: str | None = None, image_opts: bool = False) -> None:
        args = ["qemu-io"]
        if fmt:
            args += ["-f", fmt]
        for c in cmds:
            args += ["-c", c]
        args.append(str(path))
        r = subprocess.run(args, capture_output=True, text=True, cwd=Path(path).parent)
        if r.returncode or "error" in r.stdout.lower():
            raise AssertionError(f"{args} failed: {r.stdout}{r.stderr}")

    def to_raw(self, path: Path, out: Path) -> Path:
        self.img("convert", "-O", "raw", str(path), str(out), cwd=Path(path).parent)
        return out

    def map(self, path: Path, fmt: str | None = None) -> list[dict]:
        args = ["map", "--output=json"]
        if fmt:
            args += ["-f", fmt]
        return json.loads(self.img(*args, str(path), cwd=Path(path).parent).stdout)


def project_map(entries: list[dict]) -> list[tuple[int, int, int, bool, bool, bool]]:
    """Project map entries to (start, length, depth, present, zero, data) and merge neighbours."""
    out: list[list] = []
    for e in entries:
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][0] + out[-1][1] == e["start"] and tuple(out[-1][2:]) == key:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], *key])
    return [tuple(x) for x in out]


def flatfs(*args: str | os.PathLike[str], check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "flatfs", *map(str, args)], text=True, capture_output=True, check=check, **kw
    )
