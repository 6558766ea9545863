"""A guest ext4 file system changed in an overlay, loop-mounted through the view."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..helpers.needs import IN_CI, require
from ..helpers.qemu import Qemu, qemu_map

pytestmark = pytest.mark.fuse


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent.name != "lost+found"
    }


def _can_loop_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("mount") is not None


def test_ext4_overlay_loop_mounted_through_view(tmp_path: Path, mounter) -> None:
    require(all(shutil.which(t) for t in ("mkfs.ext4", "debugfs")), "e2fsprogs is not installed")
    if not _can_loop_mount():
        # Loop devices need root; CI runs as root, so there this is a failure.
        require(not IN_CI, "loop-mounting needs root and /dev/loop-control")
        pytest.skip("loop-mounting needs root and /dev/loop-control")
    q = Qemu()
    rng = os.urandom
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("guest\n")
    (src / "data.bin").write_bytes(rng(3 << 20))
    (src / "keep.bin").write_bytes(rng(200_000))
    (src / "doomed.txt").write_text("to be removed in the overlay\n")

    base_raw = tmp_path / "base.raw"
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(src),
            str(base_raw),
            "64M",
        ],
        check=True,
        capture_output=True,
    )

    # The guest changes some files; the changed disk is mod.raw.
    mod_raw = tmp_path / "mod.raw"
    subprocess.run(["cp", "--sparse=always", str(base_raw), str(mod_raw)], check=True)
    new_data = tmp_path / "new_data.bin"
    new_data.write_bytes(rng(1 << 20))
    hello = tmp_path / "hello.txt"
    hello.write_text("written in the overlay\n")
    host = tmp_path / "hostname"
    host.write_text("renamed-guest\n")
    cmds = tmp_path / "debugfs.cmds"
    cmds.write_text(
        f"rm /doomed.txt\nrm /data.bin\nwrite {new_data} /data.bin\nmkdir /new\n"
        f"write {hello} /new/hello.txt\nrm /etc/hostname\nwrite {host} /etc/hostname\n"
    )
    subprocess.run(["debugfs", "-w", "-f", str(cmds), str(mod_raw)], check=True, capture_output=True)

    # Chain: base.qcow2 <- overlay.qcow2, the overlay holding only what changed.
    # A safe rebase of an empty overlay from mod.raw onto base.qcow2 copies in
    # exactly the clusters where the two differ.
    base = tmp_path / "base.qcow2"
    q.img("convert", "-f", "raw", "-O", "qcow2", base_raw, base)
    overlay = tmp_path / "overlay.qcow2"
    q.create(overlay, None, backing=mod_raw.name, backing_fmt="raw")
    q.img("rebase", "-f", "qcow2", "-b", base.name, "-F", "qcow2", overlay, cwd=tmp_path)
    assert q.img("compare", overlay, mod_raw, check=False).returncode == 0
    depths = {e["depth"] for e in qemu_map(q, overlay) if e["data"]}
    assert depths == {0, 1}, "the overlay should hold some, not all, of the data"

    view = mounter.mount(overlay)
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-o", "ro,loop", str(view), str(fs)], check=True, capture_output=True)
    try:
        got = _files(fs)
    finally:
        subprocess.run(["umount", str(fs)], check=True, capture_output=True)
    assert got == {
        "data.bin": new_data.read_bytes(),
        "keep.bin": (src / "keep.bin").read_bytes(),
        "etc/hostname": b"renamed-guest\n",
        "new/hello.txt": b"written in the overlay\n",
    }
