"""VirtualBox snapshot chains as VirtualBox lays them out, and dissect.hypervisor as their second reader."""

from __future__ import annotations

from pathlib import Path

from .vdi_writer import BLOCK, ZERO, Vdi, pattern, write_registry

M = BLOCK


def dissect_read(paths: list[Path], size: int) -> bytes:
    """The chain's bytes through dissect.hypervisor, base first; each child gets its parent's stream."""
    from dissect.hypervisor.disk.vdi import VDI

    files = []
    stream = None
    try:
        for p in paths:
            fh = open(p, "rb")
            files.append(fh)
            stream = VDI(fh, parent=stream).open()
        assert stream is not None
        out = bytearray()
        # dissect reads one block per call correctly; longer reads of a
        # stream start cross block boundaries, so read block by block
        for off in range(0, size, M):
            stream.seek(off)
            out += stream.read(min(M, size - off))
        return bytes(out)
    finally:
        for fh in files:
            fh.close()


def snapshot_chain(vm: Path, depth: int, *, registry: bool) -> tuple[list[Path], list[Vdi], bytes]:
    """VirtualBox's layout: VM/disk.vdi, then VM/Snapshots/{uuid}.vdi per snapshot; returns the
    paths base first, the images, and the composed content the test expects."""
    (vm / "Snapshots").mkdir(parents=True)
    size = 9 * M + 512 * 3  # a partial last block
    base = Vdi(
        size, blocks={0: pattern(0x10), 2: pattern(0x12, 5000), 3: ZERO, 5: pattern(0x15), 9: pattern(0x19)}
    )
    imgs = [base]
    layers = [
        {1: pattern(0x21), 2: ZERO, 5: pattern(0x25, 300), 7: pattern(0x27)},
        {0: pattern(0x31, 4096), 7: ZERO, 8: pattern(0x38), 9: pattern(0x39, 100)},
        {2: pattern(0x42), 3: pattern(0x43), 5: ZERO},
    ]
    for blocks in layers[: depth - 1]:
        imgs.append(Vdi(size, blocks=blocks).over(imgs[-1]))
    paths = [imgs[0].write(vm / "disk.vdi")]
    locs = ["disk.vdi"]
    for img in imgs[1:]:
        loc = f"Snapshots/{{{img.create}}}.vdi"
        paths.append(img.write(vm / loc))
        locs.append(loc)
    if registry:
        write_registry(vm / "VM.vbox", list(zip(imgs, locs)))
    want: bytes | None = None
    for img in imgs:
        want = img.content(want)
    assert want is not None
    return paths, imgs, want
