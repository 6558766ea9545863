"""Type before open (issue 23): a FIFO or device an image names is refused without being opened.

The proof for a FIFO: a writer waits in open(2) on it, which returns only once
a reader opens the FIFO. After flatfs refused the image the writer must still be
waiting: flatfs looked at the file through an O_PATH descriptor and never opened
it for reading. (Opening it, even O_NONBLOCK, would release the writer.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.hostile import refused

DESCRIPTOR = (
    '# Disk DescriptorFile\nversion=1\nCID=fedcba98\nparentCID=ffffffff\ncreateType="{ct}"\n{extent}\n'
)


def flat_over(d: Path, name: str) -> Path:
    top = d / "top.vmdk"
    top.write_text(DESCRIPTOR.format(ct="monolithicFlat", extent=f'RW 2048 FLAT "{name}" 0'))
    return top


def hinted(d: Path, name: str) -> Path:
    (d / "data.bin").write_bytes(bytes(1 << 20))
    top = d / "top.vmdk"
    text = DESCRIPTOR.format(ct="monolithicFlat", extent='RW 2048 FLAT "data.bin" 0')
    top.write_text(
        text.replace("parentCID=ffffffff", "parentCID=12345678") + f'parentFileNameHint="{name}"\n'
    )
    return top


@pytest.fixture
def waiting_writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A FIFO and a process blocked opening it for writing; always released at the end."""
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'wb').close()"])
    try:
        time.sleep(0.2)  # let it reach open(); if it has not yet, the check below still holds
        yield fifo, writer
    finally:
        if writer.poll() is None:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # release it
            try:
                writer.wait(10)
            finally:
                os.close(fd)


@pytest.mark.parametrize("build", [flat_over, hinted], ids=["extent", "parent"])
def test_a_fifo_is_refused_unopened(
    tmp_path: Path, waiting_writer: tuple[Path, subprocess.Popen[bytes]], build: object
) -> None:
    fifo, writer = waiting_writer
    top = build(tmp_path, fifo.name)  # type: ignore[operator]
    for cmd in ("info", "map"):
        line = refused(cmd, top, wall=20)
        assert "is not a regular file" in line and "--allow-special" in line, line
    assert writer.poll() is None, "flatfs opened the FIFO for reading"


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
@pytest.mark.parametrize("build", [flat_over, hinted], ids=["extent", "parent"])
def test_a_device_is_refused(tmp_path: Path, device: str, build: object) -> None:
    (tmp_path / "dev").symlink_to(device)
    top = build(tmp_path, "dev")  # type: ignore[operator]
    line = refused("info", top)
    assert "is not a regular file" in line and "--allow-special" in line, line


def test_a_character_device_named_as_the_image_is_refused() -> None:
    line = refused("info", "/dev/zero")
    assert "not a regular file or block device" in line, line


def test_allow_special_lets_a_device_in(tmp_path: Path) -> None:
    (tmp_path / "dev").symlink_to("/dev/zero")
    top = flat_over(tmp_path, "dev")
    r = subprocess.run(
        [sys.executable, "-m", "flatfs", "info", "--allow-special", top], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
