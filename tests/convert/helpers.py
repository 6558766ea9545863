"""Helpers shared by the convert tests: build sources, check outputs against QEMU."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..conftest import Qemu

K = 1024
M = 1 << 20


def disk_usage(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def write_sparse_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> Path:
    """A sparse raw file of ``size`` bytes holding ``writes`` (offset, bytes)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


def pattern(n: int, seed: int) -> bytes:
    """Incompressible-ish but deterministic bytes."""
    return random.Random(seed).randbytes(n)


def scattered_raw(path: Path, size: int = 64 * M, seed: int = 1) -> Path:
    """Data runs, zero runs inside data, and a text-like (compressible) region."""
    r = random.Random(seed)
    writes = [(0, pattern(300 * K, seed))]
    for _ in range(12):
        off = r.randrange(0, size - M) & ~511
        writes.append((off, pattern(r.randrange(1, 400 * K), r.random())))
    writes.append((5 * M, pattern(64 * K, 2) + bytes(128 * K) + pattern(3 * K + 17, 3)))
    writes.append((20 * M, (b"flatfs compressible text " * 20000)[: 400 * K]))
    writes.append((size - 1000, b"\xff" * 1000))
    return write_sparse_raw(path, size, writes)


def qemu_chain(q: Qemu, d: Path) -> Path:
    """A two-image qcow2 chain covering data, zero, discarded and compressed clusters."""
    base = d / "base.qcow2"
    q.create(base, 48 * M)
    q.io(
        base,
        "write -P 0x11 0 3M",
        "write -P 0x22 8M 1M",
        "write -z 9M 256k",
        "write -c -P 0x33 12M 512k",
        "write -P 0x44 40M 64k",
        "write -P 0x55 47M 1M",
    )
    top = d / "top.qcow2"
    q.create(top, 48 * M, backing=base.name, backing_fmt="qcow2", opts="cluster_size=4096")
    q.io(
        top,
        "write -P 0x66 1M 100k",
        "write -z 2M 64k",
        "discard 8M 64k",
        "write -P 0x77 30M 12k",
        "write -z 40M 4k",
        "write -P 0 47M 64k",
    )
    return top


def info(q: Qemu, path: Path, fmt: str | None = None) -> dict:
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(q.img(*args, path).stdout)


def assert_valid_copy(
    q: Qemu, source: Path, out: Path, fmt: str = "qcow2", source_fmt: str | None = None, backing: bool = False
) -> None:
    """qemu-img check passes (no errors, no leaks) and qemu-img compare says identical."""
    if fmt == "qcow2":
        res = q.img("check", "--output=json", out, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        rep = json.loads(res.stdout)
        assert not rep.get("leaks") and not rep.get("corruptions") and not rep.get("check-errors"), rep
        meta = info(q, out, "qcow2")
        assert ("backing-filename" in meta) == backing, meta
    args = ["compare", "-F", fmt]
    if source_fmt:
        args += ["-f", source_fmt]
    res = q.img(*args, source, out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
