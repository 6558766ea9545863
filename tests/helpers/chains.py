"""Backing chains made with qemu-img and qemu-io, for the tests to read, mount and convert."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .images import M
from .qemu import Qemu, data_extents, qemu_map


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
        steps: list[list[str]] = [[]]
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


class Chain:
    """A test chain: its top image, the qemu-img reference raw, and qemu-img map's data extents."""

    def __init__(self, name: str, image: Path, ref: Path, data: list[tuple[int, int]], size: int) -> None:
        self.name, self.image, self.ref, self.data, self.size = name, image, ref, data, size

    def __repr__(self) -> str:
        return f"Chain({self.name})"


def _finish(q: Qemu, name: str, image: Path) -> Chain:
    ref = image.with_name(image.name + ".ref.raw")
    q.img("convert", "-O", "raw", image, ref)
    return Chain(name, image, ref, data_extents(qemu_map(q, image)), ref.stat().st_size)


def build_chains(q: Qemu, d: Path) -> dict[str, Chain]:
    """The chains the FUSE tests mount once per session: "three", "rawbase", "dense"."""
    chains: dict[str, Chain] = {}

    # Three qcow2 layers, three cluster sizes, a short backing under a longer
    # top, zero clusters over data, partial clusters.
    c = d / "three"
    c.mkdir()
    q.create(c / "base.qcow2", "32M", opts="cluster_size=65536")
    q.io(
        c / "base.qcow2",
        "write -P 0x11 0 2M",
        "write -P 0x12 5M 64k",
        "write -z 8M 1M",
        "write -P 0x13 12M 300k",
        "write -P 0x14 31M 1M",
    )
    q.create(c / "mid.qcow2", "48M", backing="base.qcow2", opts="cluster_size=4096")
    q.io(
        c / "mid.qcow2",
        "write -P 0x21 1M 8k",
        "write -z 5M 64k",
        "write -P 0x22 40M 12k",
        "write -P 0x23 0x1234000 4k",
        "discard 12M 64k",
    )
    q.create(c / "top.qcow2", "64M", backing="mid.qcow2", opts="cluster_size=2M")
    q.io(
        c / "top.qcow2",
        "write -P 0x31 20M 4k",
        "write -P 0x32 50M 1M",
        "write -z 60M 2M",
        "write -P 0x33 62M 512",
    )
    chains["three"] = _finish(q, "three", c / "top.qcow2")

    # A sparse raw base under a qcow2 overlay.
    r = d / "rawbase"
    r.mkdir()
    q.create(r / "disk.raw", "20M", fmt="raw")
    q.io(r / "disk.raw", "write -P 0x41 0 1M", "write -P 0x42 7M 3M", "write -P 0x43 19M 1M", fmt="raw")
    q.create(r / "vm.qcow2", "20M", backing="disk.raw", backing_fmt="raw")
    q.io(r / "vm.qcow2", "write -P 0x51 512k 1M", "write -z 8M 1M", "write -P 0x52 15M 64k")
    chains["rawbase"] = _finish(q, "rawbase", r / "vm.qcow2")

    # A single, densely written qcow2 (for concurrent readers).
    s = d / "dense"
    s.mkdir()
    q.create(s / "dense.qcow2", "48M", opts="cluster_size=65536")
    cmds = [f"write -P {0x60 + i} {i * 3}M {1 + i % 3}M" for i in range(16)]
    q.io(s / "dense.qcow2", *cmds)
    chains["dense"] = _finish(q, "dense", s / "dense.qcow2")
    return chains


def deep_qcow2_chain(q: Qemu, d: Path, depth: int, size: int = 1 * M) -> list[Path]:
    """A ``depth``-image qcow2 chain in ``d``, base first, made cheaply: qemu-img makes two
    images with 4 KiB clusters; every other layer is a copy of the second with its backing
    name (fixed width: l0000.qcow2 ...) patched in the header. qemu-io then writes a little
    data into the base, a middle layer and the top, through the whole chain."""
    names = [d / f"l{i:04d}.qcow2" for i in range(depth)]
    q.create(names[0], size, opts="cluster_size=4096")
    if depth == 1:
        return names
    q.create(names[1], size, backing=names[0].name, backing_fmt="qcow2", opts="cluster_size=4096")
    template = names[1].read_bytes()
    at, length = struct.unpack_from(">QI", template, 8)
    assert template[at : at + length] == names[0].name.encode()
    for i in range(2, depth):
        img = bytearray(template)
        img[at : at + length] = names[i - 1].name.encode()
        names[i].write_bytes(img)
    for layer, cmd in (
        (0, "write -P 0x11 0 64k"),
        (depth // 2, "write -P 0x22 32k 64k"),
        (depth - 1, "write -P 0x33 512k 4k"),
    ):
        q.io(names[layer], cmd, fmt="qcow2")
    return names
