"""qemu-img and qemu-io: the reference flatfs is compared with.

``Qemu`` wraps the tools (use the ``qemu`` fixture in tests: it skips on a
laptop without them and fails in CI). The rest compares flatfs's map, bytes
and converted files with what QEMU says about the same image.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from flatfs import OpenOptions, open_chain
from flatfs.extents import Kind

CHUNK = 1 << 20


class Qemu:
    """Thin wrappers over qemu-img and qemu-io."""

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
        size: int | str | None,
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


# -- qemu-img map -----------------------------------------------------------------


def project_map(entries: list[dict]) -> list[tuple[int, int, int, bool, bool, bool]]:
    """Project map entries to (start, length, depth, present, zero, data) and merge neighbours."""
    out: list[list] = []
    for e in entries:
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][0] + out[-1][1] == e["start"] and tuple(out[-1][2:]) == key:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], *key])
    return [tuple(x) for x in out]  # type: ignore[misc]


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
    """``qemu-img map --output=json`` of ``path``, run in the current folder."""
    args = ["map", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    return json.loads(q.img(*args).stdout)


def qemu_info(q: Qemu, path: Path, fmt: str | None = None) -> dict:
    """``qemu-img info --output=json`` of ``path``."""
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(q.img(*args, path).stdout)


# -- flatfs against QEMU ------------------------------------------------------------


def flatfs_map(chain: Any) -> list[dict]:
    """The chain's extents as qemu-img map entries."""
    return [
        {
            "start": e.start,
            "length": e.length,
            "depth": e.depth,
            "present": e.kind.present,
            "zero": e.kind is not Kind.DATA,
            "data": e.kind.is_data,
        }
        for e in chain.extents()
    ]


def assert_matches_qemu(
    qemu: Qemu, image: Path, scratch: Path, *, options: OpenOptions | None = None, qemu_fmt: str | None = None
) -> None:
    """flatfs's map and bytes equal qemu-img map / qemu-img convert -O raw."""
    ref = scratch / (image.name + ".ref.raw")
    args = ["convert", "-O", "raw"]
    if qemu_fmt:
        args += ["-f", qemu_fmt]
    qemu.img(*args, image, ref, cwd=image.parent)
    with open_chain(image, options) as chain:
        assert project_map(flatfs_map(chain)) == project_map(qemu.map(image, qemu_fmt)), image
        assert chain.size == ref.stat().st_size
        with open(ref, "rb") as f:
            pos = 0
            while pos < chain.size:
                want = f.read(CHUNK)
                got = chain.pread(pos, CHUNK)
                assert got == want, f"{image}: bytes differ in [{pos:#x}, {pos + CHUNK:#x})"
                pos += len(want)
            # unaligned reads that straddle extents
            for off, n in ((1, 4095), (chain.size // 3 + 7, 200_003), (max(0, chain.size - 777), 777)):
                f.seek(off)
                assert chain.pread(off, n) == f.read(n), f"{image}: unaligned read at {off:#x}"
    ref.unlink()


def assert_valid_copy(
    q: Qemu, source: Path, out: Path, fmt: str = "qcow2", source_fmt: str | None = None, backing: bool = False
) -> None:
    """qemu-img check passes (no errors, no leaks) and qemu-img compare says identical."""
    if fmt == "qcow2":
        res = q.img("check", "--output=json", out, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        rep = json.loads(res.stdout)
        assert not rep.get("leaks") and not rep.get("corruptions") and not rep.get("check-errors"), rep
        meta = qemu_info(q, out, "qcow2")
        assert ("backing-filename" in meta) == backing, meta
    args = ["compare", "-F", fmt]
    if source_fmt:
        args += ["-f", source_fmt]
    res = q.img(*args, source, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
