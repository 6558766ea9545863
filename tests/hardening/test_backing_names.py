"""Backing names that are not local files (nbd://, http://, json:) are refused as such, not as
"not found": flatfs never opens a network or a JSON-described image."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu


@pytest.mark.parametrize(
    "name",
    ["nbd://localhost:10809/disk", "http://example.invalid/base.qcow2", 'json:{"file.driver": "null-co"}'],
)
def test_a_url_backing_name_is_not_a_local_file(qemu: Qemu, tmp_path: Path, name: str) -> None:
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw", top, "1M")
    for cmd in (["info"], ["map"], ["convert", "-O", "raw"]):
        args = [*cmd, top] + ([tmp_path / "out.raw"] if cmd[0] == "convert" else [])
        res = flatfs(*args, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, res.stderr
        assert lines[0] == f"flatfs: {top}: backing file {name!r} is not a local file", lines[0]
    assert not (tmp_path / "out.raw").exists()


def test_a_colon_in_a_plain_file_name_is_still_a_file(qemu: Qemu, tmp_path: Path) -> None:
    base = qemu.create(tmp_path / "base:1.qcow2", "1M")
    qemu.io(base, "write -P 0x42 0 4k")
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "./base:1.qcow2", "-F", "qcow2", top, "1M")
    res = flatfs("map", "--output=json", top)
    assert '"depth": 1' in res.stdout
