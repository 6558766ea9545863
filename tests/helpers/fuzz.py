"""The client of tests/fuzz/worker.py: flatfs reads mutated images in a child process with a
memory cap, one at a time, so a hang, a crash or a memory blow-up is caught and named."""

from __future__ import annotations

import hashlib
import json
import select
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMORY_CAP = 1 << 30  # RLIMIT_AS of the worker
TIMEOUT = 30  # seconds for one image


class FuzzWorker:
    def __init__(self, cap: int = MEMORY_CAP) -> None:
        self.cap = cap
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.worker", str(cap)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def ask(self, path: Path, timeout: float = TIMEOUT) -> dict[str, Any]:
        """What the worker made of ``path`` (see tests/fuzz/worker.py for the keys)."""
        assert self.proc.poll() is None, "fuzz worker died"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"flatfs hung on {path}")
        line = self.proc.stdout.readline()
        assert line, f"fuzz worker died on {path} (memory cap {self.cap}?)"
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


READ_CAP = 64 << 20  # what tests/fuzz/worker.py hashes of a view: its first 64 MiB


def qemu_raw_sha(img: Path, size: int) -> str | None:
    """sha256 of the first min(size, READ_CAP) bytes of ``qemu-img convert -O raw`` of ``img``
    (what the worker's ``sha`` is compared with), or None when QEMU refuses or hangs on it.

    Run in the image's folder: QEMU 7.2 resolves a relative data file name against its cwd."""
    out = img.with_name(img.name + ".qemu.raw")
    try:
        r = subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(img), str(out)],
            cwd=img.parent,
            capture_output=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    try:
        with open(out, "rb") as f:
            return hashlib.sha256(f.read(min(size, READ_CAP))).hexdigest()
    finally:
        out.unlink()


def poke(data: bytearray, off: int, how: str, byte: int, value: int, order: str) -> int:
    """Apply one mutation at ``off``: set the byte to ``byte``, flip one of its bits, or store
    ``value`` as a ``u32``/``u64`` word (aligned down, byte ``order`` "<" or ">"). Returns the
    offset changed; a word that would run past the end of ``data`` is not written."""
    if how == "byte":
        data[off] = byte
    elif how == "bit":
        data[off] ^= 1 << (byte % 8)
    else:
        size, code = (4, "I") if how == "u32" else (8, "Q")
        off -= off % size
        if off + size <= len(data):
            struct.pack_into(order + code, data, off, value & ((1 << 8 * size) - 1))
    return off


def read_like_qemu_or_refused(worker: FuzzWorker, img: Path, folder: Path, what: str) -> None:
    """The worker reads ``img``: no bug; a refusal is one line naming a file in ``folder``;
    what it reads equals what `qemu-img convert -O raw` reads, where QEMU reads it."""
    res = worker.ask(img)
    assert "bug" not in res, res["bug"]
    if not res["ok"]:
        assert res["oneline"] and res["error"].startswith(str(folder)), res
        return
    want = qemu_raw_sha(img, res["size"])
    if want is not None:
        assert res["sha"] == want, f"{what}: flatfs reads differ from QEMU"
