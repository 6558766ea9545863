"""Every format flatfs reads, served: nbdcopy's copy equals the content the test wrote
(or qemu-img's conversion), and `nbdinfo --map` equals `flatfs map`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers.images import M, pattern, scattered_raw
from ..helpers.nbd import Servers, flatfs_map_as_nbd, nbd_map
from ..helpers.qemu import Qemu
from ..helpers.vdi_writer import ZERO, Vdi
from ..helpers.vhd_images import base_bytes, child, qemu_base
from ..helpers.vhd_writer import compose
from ..helpers.vhdx_images import three_layers


def _qemu_ref(q: Qemu, top: Path) -> bytes:
    ref = top.with_name("ref.raw")
    q.img("convert", "-O", "raw", top, ref)
    return ref.read_bytes()


def _raw(q: Qemu, d: Path) -> tuple[Path, bytes]:
    img = scattered_raw(d / "disk.img", 16 * M)
    return img, img.read_bytes()


def _vmdk(q: Qemu, d: Path) -> tuple[Path, bytes]:
    q.create(d / "base.vmdk", 8 * M, fmt="vmdk")
    q.io(d / "base.vmdk", "write -P 0x11 0 1M", "write -P 0x12 5M 64k", fmt="vmdk")
    q.create(d / "delta.vmdk", 8 * M, fmt="vmdk", backing="base.vmdk", backing_fmt="vmdk")
    q.io(d / "delta.vmdk", "write -P 0x21 512k 1M", "write -P 0x22 7M 4k", fmt="vmdk")
    return d / "delta.vmdk", _qemu_ref(q, d / "delta.vmdk")


def _vhd(q: Qemu, d: Path) -> tuple[Path, bytes]:
    base = qemu_base(q, d)
    top = child(base, [(0, b"\x21" * 8192), (5 * M, b"\x23" * (2 * M))])
    top.write(d / "top.vhd")
    return d / "top.vhd", compose(top.size, base_bytes(), top)


def _vhdx(q: Qemu, d: Path) -> tuple[Path, bytes]:
    top, _, model = three_layers(d)
    return top, bytes(model.data)


def _vdi(q: Qemu, d: Path) -> tuple[Path, bytes]:
    size = 6 * M
    base = Vdi(size, blocks={0: pattern(M, 1), 2: pattern(M, 2), 4: pattern(M, 3)})
    top = Vdi(size, blocks={1: pattern(M, 4), 2: ZERO}).over(base)
    base.write(d / "disk.vdi")
    path = top.write(d / f"{{{top.create}}}.vdi")
    want = pattern(M, 1) + pattern(M, 4) + bytes(2 * M) + pattern(M, 3) + bytes(M)
    return path, want


BUILDERS: dict[str, Callable[[Qemu, Path], tuple[Path, bytes]]] = {
    "raw": _raw,
    "vmdk": _vmdk,
    "vhd": _vhd,
    "vhdx": _vhdx,
    "vdi": _vdi,
}


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_every_format_served(fmt: str, servers: Servers, tmp_path: Path) -> None:
    top, want = BUILDERS[fmt](Qemu(), tmp_path)
    uri = servers.flatfs(top)
    out = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    assert out.read_bytes() == want
    assert nbd_map(uri) == flatfs_map_as_nbd(top)
