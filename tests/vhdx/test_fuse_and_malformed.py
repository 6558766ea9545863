"""A differencing VHDX chain mounted for real, and hand-broken VHDX files through the CLI."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ..helpers.cli import ONE_LINE, flatfs
from ..helpers.mounts import seek_walk
from ..helpers.vhdx_images import first_difference, three_layers
from ..helpers.vhdx_writer import BAT_OFFSET, METADATA_OFFSET, MiB, with_crc


@pytest.mark.fuse
def test_mount_a_differencing_chain(tmp_path: Path, mounter) -> None:
    top, _, m = three_layers(tmp_path)
    view = mounter.mount(top)
    got = view.read_bytes()
    assert first_difference(got, bytes(m.data)) is None
    runs = seek_walk(view)
    assert runs and sum(n for _, n in runs) < len(got)  # truthful holes: blocks nobody holds


def _broken(tmp_path: Path, name: str, edit) -> Path:
    top, _, _ = three_layers(tmp_path)
    data = bytearray((tmp_path / "base.vhdx").read_bytes())
    edit(data)
    out = tmp_path / f"{name}.vhdx"
    out.write_bytes(bytes(data))
    return out


def _rt(data: bytearray, fn) -> None:
    rt = bytearray(data[192 * 1024 : 256 * 1024])
    fn(rt)
    data[192 * 1024 : 256 * 1024] = with_crc(rt)
    data[256 * 1024 : 320 * 1024] = with_crc(rt)


CASES = {
    "headers-crc": (
        lambda d: (
            d.__setitem__(slice(64 * 1024 + 8, 64 * 1024 + 9), b"\x99")
            or d.__setitem__(slice(128 * 1024 + 8, 128 * 1024 + 9), b"\x99")
        ),
        "no valid header",
    ),
    "region-crc": (
        lambda d: (
            d.__setitem__(slice(192 * 1024 + 40, 192 * 1024 + 41), b"\x01")
            or d.__setitem__(slice(256 * 1024 + 40, 256 * 1024 + 41), b"\x01")
        ),
        "region table checksum",
    ),
    "region-past-end": (lambda d: _rt(d, lambda rt: struct.pack_into("<Q", rt, 32, 1 << 40)), "past the end"),
    "unknown-required-region": (
        lambda d: _rt(
            d,
            lambda rt: (
                struct.pack_into("<I", rt, 8, 3),
                struct.pack_into("<16sQII", rt, 80, b"\x42" * 16, 0, 0, 1),
            ),
        ),
        "unknown required region",
    ),
    "metadata-signature": (
        lambda d: d.__setitem__(slice(METADATA_OFFSET, METADATA_OFFSET + 8), b"xxxxxxxx"),
        "no metadata table signature",
    ),
    "block-size": (lambda d: struct.pack_into("<I", d, METADATA_OFFSET + 64 * 1024, 3 * MiB), "block size"),
    "bat-state": (lambda d: struct.pack_into("<Q", d, BAT_OFFSET, 5 | (4 << 20)), "invalid state"),
    "bat-offset": (lambda d: struct.pack_into("<Q", d, BAT_OFFSET, 6 | (1 << 40)), "outside the file"),
    "log-guid-without-log": (lambda d: None, None),
}


@pytest.mark.parametrize("name", [k for k, v in CASES.items() if v[1]])
def test_broken_vhdx_is_one_line(tmp_path: Path, name: str) -> None:
    edit, want = CASES[name]
    img = _broken(tmp_path, name, edit)
    # info reads headers, regions and metadata; the BAT is read by map and convert
    cmds = (["map"], ["convert", "-O", "raw"]) if name.startswith("bat") else (["info"], ["map"])
    for cmd in cmds:
        args = [*cmd, img] + ([tmp_path / f"{name}.raw"] if cmd[0] == "convert" else [])
        r = flatfs(*args, check=False)
        assert r.returncode == 1 and ONE_LINE(r.stderr), (cmd, r.stderr)
        assert want in r.stderr, (cmd, r.stderr)
