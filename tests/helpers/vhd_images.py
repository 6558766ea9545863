"""VHD test images: qemu-made fixed and dynamic disks, and differencing chains written by
tests/helpers/vhd_writer.py over a qemu-made base."""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
from pathlib import Path

from .qemu import Qemu
from .vhd_writer import DIFFERENCING, Vhd, unique_id_of

M = 1 << 20
SIZE = 8 * M


def qemu_base(q: Qemu, d: Path, name: str = "base.vhd") -> Path:
    """A dynamic VHD of exactly SIZE bytes (force_size: creator qem2), every block but one written."""
    img = q.create(d / name, SIZE, fmt="vpc", opts="subformat=dynamic,force_size=on")
    q.io(img, "write -P 0x11 0 4M", "write -P 0x12 6M 2M", fmt="vpc")
    return img


def base_bytes() -> bytes:
    return (b"\x11" * (4 * M) + bytes(2 * M) + b"\x12" * (2 * M))[:SIZE]


def child(parent: Path, writes: list[tuple[int, bytes]], **kw) -> Vhd:
    kw.setdefault("parent_name", parent.name)
    kw.setdefault("locators", [(b"W2ru", ".\\" + parent.name), (b"W2ku", "D:\\VMs\\" + parent.name)])
    kw.setdefault("parent_id", unique_id_of(parent))
    return Vhd(SIZE, disk_type=DIFFERENCING, writes=writes, **kw)


class FuzzWorker:
    """A tests.fuzz.worker process (memory cap) asked about one image at a time."""

    def __init__(self, cap: int = 1 << 30) -> None:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.worker", str(cap)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )

    def ask(self, path: Path, timeout: float = 30) -> dict:
        assert self.proc.poll() is None and self.proc.stdin and self.proc.stdout, "fuzz worker died"
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise AssertionError(f"flatfs hung on {path}")
        line = self.proc.stdout.readline()
        assert line, f"fuzz worker died on {path}"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


def qemu_sha(img: Path, size: int) -> str | None:
    """sha256 of `qemu-img convert -O raw` of ``img``, or None when QEMU refuses it."""
    out = img.with_name(img.name + ".qemu.raw")
    r = subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], capture_output=True)
    if r.returncode:
        return None
    h = hashlib.sha256(out.read_bytes()[:size])
    out.unlink()
    return h.hexdigest()
