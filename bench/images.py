"""Build the benchmark's images with qemu-img/qemu-io (and a seeded content generator).

Every scenario is deterministic for a given scale: the same seed gives the
same bytes, so two runs of the benchmark read and write the same data.

Seed shape (``Layout.seed``): a qcow2 base of ``4 GiB x scale`` holding
``2 GiB x scale`` of data: a dense region at the start (the part the view's
read test streams), then extents of log-uniform sizes scattered over the rest,
with a few allocated clusters full of zeros. Two overlays on it, 1 TiB and
64 TiB, get the same few scattered writes and one zero write (``write -z``).

Compressed scenario (``Layout.comp``): a qcow2 image of ``1 GiB x scale``
with ``512 MiB x scale`` of mixed content in small pieces (text-like,
random, structured records, zeros), so that most clusters mix kinds.

Content kinds, all cut from seeded pools:

* ``random``: incompressible (Mersenne Twister bytes);
* ``text``: words and numbers in lines, like logs or source (zlib: ~3:1);
* ``records``: fixed-size binary records with counters and padding, like
  database pages (compresses well, but is not one byte);
* ``zero``: zeros inside the data (whole 4 KiB blocks, so that both tools'
  zero detection sees them).
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

POOL_BYTES = 16 * MiB  # each content pool; slices are taken at random offsets
SEED = 0x5EED


@dataclass(frozen=True)
class Mix:
    """Relative weights of content kinds, and the size range of one piece."""

    weights: dict[str, float]
    piece_min: int
    piece_max: int


@dataclass(frozen=True)
class Layout:
    """Sizes of one run of the benchmark (already scaled)."""

    base_size: int  # virtual size of the seed base
    data: int  # bytes of data in the seed base
    dense: int  # the first ``dense`` bytes of the base are all data
    read_bytes: int  # how much of the view the read test streams
    extent_min: int  # scattered extents: log-uniform sizes in [min, max]
    extent_max: int
    comp_size: int  # virtual size of the compressed-scenario image
    comp_data: int  # its data
    overlay_small: int = 1 * TiB
    overlay_big: int = 64 * TiB
    seed_mix: Mix = field(
        default_factory=lambda: Mix(
            {"random": 0.45, "text": 0.30, "records": 0.20, "zero": 0.05}, 4 * KiB, 256 * KiB
        )
    )
    comp_mix: Mix = field(
        default_factory=lambda: Mix(
            {"text": 0.40, "random": 0.25, "records": 0.15, "zero": 0.20}, 4 * KiB, 64 * KiB
        )
    )

    @classmethod
    def make(cls, scale: float = 1.0, quick: bool = False) -> Layout:
        if quick:
            # Small enough for a smoke test: 64 MiB of data, 16 MiB compressed.
            return cls(
                base_size=128 * MiB,
                data=64 * MiB,
                dense=32 * MiB,
                read_bytes=32 * MiB,
                extent_min=64 * KiB,
                extent_max=2 * MiB,
                comp_size=64 * MiB,
                comp_data=16 * MiB,
            )
        if scale <= 0:
            raise ValueError("scale must be positive")

        def sz(n: float) -> int:
            return max(64 * KiB, int(n * scale) // MiB * MiB)

        data = sz(2 * GiB)
        return cls(
            base_size=sz(4 * GiB),
            data=data,
            dense=data // 2,
            read_bytes=min(1 * GiB, data // 2),
            extent_min=64 * KiB,
            extent_max=16 * MiB,
            comp_size=sz(1 * GiB),
            comp_data=sz(512 * MiB),
        )

    def overlay_writes(self) -> list[str]:
        """qemu-io commands for both overlays: a few scattered writes and one zero write."""
        d, b = self.dense, self.base_size
        return [
            f"write -P 0x5a {d // 4} 4M",  # over the dense data (the read test sees it)
            f"write -z {d // 2} 8M",  # the zero write, over data
            f"write -P 0xa5 {b * 3 // 4} 1M",  # over the scattered part of the base
            f"write -P 0x3c {100 * GiB} 2M",  # far above the base
            f"write -P 0xc3 {700 * GiB} 64k",
            f"write -P 0x69 {self.overlay_small - 1 * MiB} 1M",  # the last MiB of the 1 TiB disk
        ]

    def disk_needed(self) -> int:
        """Bytes of scratch space a run needs at most (about 3x the data, plus slack)."""
        return 3 * (self.data + self.comp_data) + 512 * MiB


# -- content ---------------------------------------------------------------------

_WORDS = (
    "the of and to in is for on with as by at from this that error info debug warn user "
    "system kernel disk block write read cluster offset table entry image backing chain "
    "request timeout session config value null true false return static void int char "
    "struct include define http GET POST 200 404 500 json path file open close"
).split()


class Pools:
    """Seeded content pools; ``piece(kind, n)`` returns n bytes of that kind."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.pools: dict[str, bytes] = {
            "random": rng.randbytes(POOL_BYTES),
            "text": self._text(rng, POOL_BYTES),
            "records": self._records(rng, POOL_BYTES),
        }
        self.zeros = bytes(max(256 * KiB, 16 * MiB))
        # doubled pools: any slice of up to POOL_BYTES is one contiguous memoryview
        self._doubled = {k: memoryview(v + v) for k, v in self.pools.items()}

    @staticmethod
    def _text(rng: random.Random, n: int) -> bytes:
        lines = []
        total = 0
        t = 1_700_000_000
        while total < n:
            t += rng.randint(0, 5)
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
            host = f"host{rng.randint(1, 40):02d} [{rng.randint(100, 99999)}]"
            line = f"{t} {host} {words} id={rng.getrandbits(32):08x}\n"
            lines.append(line)
            total += len(line)
        return "".join(lines).encode()[:n]

    @staticmethod
    def _records(rng: random.Random, n: int) -> bytes:
        rec = struct.Struct("<QIIdd16s16x")  # 64-byte records, some padding
        out = bytearray()
        key = rng.getrandbits(40)
        while len(out) < n:
            key += rng.randint(1, 9)
            name = f"item-{key % 100000:05d}".encode()
            out += rec.pack(
                key, rng.randint(0, 3), rng.randint(0, 1 << 20), rng.random() * 1000, float(key % 977), name
            )
        return bytes(out[:n])

    def piece(self, kind: str, n: int) -> memoryview:
        if kind == "zero":
            return memoryview(self.zeros)[:n]
        off = self.rng.randrange(POOL_BYTES)
        return self._doubled[kind][off : off + n]

    def fill(self, n: int, mix: Mix) -> bytearray:
        """n bytes of mixed content, in pieces of 4 KiB multiples."""
        kinds = list(mix.weights)
        weights = [mix.weights[k] for k in kinds]
        out = bytearray()
        rng = self.rng
        while len(out) < n:
            kind = rng.choices(kinds, weights)[0]
            size = rng.randint(mix.piece_min // (4 * KiB), mix.piece_max // (4 * KiB)) * 4 * KiB
            out += self.piece(kind, min(size, n - len(out)))
        return out


def extents_layout(
    rng: random.Random, start: int, end: int, data: int, lo: int, hi: int, align: int = 64 * KiB
) -> list[tuple[int, int]]:
    """Scatter ``data`` bytes over [start, end) in aligned extents of log-uniform sizes."""
    sizes = []
    left = data
    while left > 0:
        s = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        s = max(align, s - s % align)
        s = min(s, left)
        sizes.append(s)
        left -= s
    free = (end - start) - data
    if free < 0:
        raise ValueError("more data than room")
    # random gaps, proportional to uniform cuts, aligned
    cuts = sorted(rng.random() for _ in range(len(sizes)))
    out = []
    pos = start
    prev = 0.0
    used_gap = 0
    for s, c in zip(sizes, cuts):
        gap = int((c - prev) * free)
        gap -= gap % align
        prev = c
        pos += gap
        used_gap += gap
        out.append((pos, s))
        pos += s
    assert pos <= end
    return out


def write_raw(
    path: Path, size: int, extents: list[tuple[int, int]], pools: Pools, mix: Mix, chunk: int = 8 * MiB
) -> None:
    """A sparse raw file of ``size`` bytes with mixed content in ``extents``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start, length in extents:
            done = 0
            while done < length:
                n = min(chunk, length - done)
                buf = pools.fill(n, mix)
                os.pwrite(fd, buf, start + done)
                done += n
    finally:
        os.close(fd)


# -- qemu ------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0 or (cmd[0] == "qemu-io" and "error" in r.stdout.lower()):
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}".strip())
    return r.stdout


def qemu_io(path: Path, cmds: list[str]) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(args + [path.name], cwd=path.parent)


@dataclass
class Images:
    base: Path
    top_small: Path  # 1 TiB overlay
    top_big: Path  # 64 TiB overlay
    comp: Path  # compressed-scenario source
    base_extents: int  # how many data extents the base was written with
    data_bytes: int  # allocated bytes of the base (qemu-img map)


def _facts(work: Path, base: Path) -> int:
    import json

    m = json.loads(run(["qemu-img", "map", "--output=json", base.name], cwd=work))
    return sum(e["length"] for e in m if e.get("data"))


def existing(work: Path) -> Images:
    """The images a previous build left in ``work`` (``--keep``, then ``--reuse``)."""
    paths = [work / n for n in ("base.qcow2", "top-1t.qcow2", "top-64t.qcow2", "comp.qcow2")]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{work}: missing {', '.join(missing)}")
    return Images(*paths, base_extents=0, data_bytes=_facts(work, paths[0]))


def build(work: Path, layout: Layout, log=print) -> Images:
    """Create every image of the benchmark under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    pools = Pools()
    rng = random.Random(SEED + 1)

    # Seed base: dense region, then scattered extents.
    raw = work / "base.raw"
    scattered = extents_layout(
        rng, layout.dense, layout.base_size, layout.data - layout.dense, layout.extent_min, layout.extent_max
    )
    extents = [(0, layout.dense)] + scattered
    log(f"  writing {layout.data / GiB:.2f} GiB of mixed content in {len(extents)} extents")
    write_raw(raw, layout.base_size, extents, pools, layout.seed_mix)
    base = work / "base.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw.name, base.name], cwd=work)
    raw.unlink()
    # A few allocated clusters that hold zeros (not zero clusters): zero
    # detection must find them.
    zs = [s + (ln // 2 - ln // 2 % (64 * KiB)) for s, ln in scattered[:: max(1, len(scattered) // 4)]][:4]
    qemu_io(base, [f"write -P 0 {z} 64k" for z in zs])

    tops = []
    for name, size in (("top-1t.qcow2", layout.overlay_small), ("top-64t.qcow2", layout.overlay_big)):
        top = work / name
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top.name, str(size)],
            cwd=work,
        )
        qemu_io(top, layout.overlay_writes())
        tops.append(top)

    # Compressed scenario.
    log(f"  writing {layout.comp_data / MiB:.0f} MiB of mixed content for the compressed scenario")
    craw = work / "comp.raw"
    cext = extents_layout(
        rng,
        0,
        layout.comp_size,
        layout.comp_data,
        256 * KiB,
        max(256 * KiB, min(32 * MiB, layout.comp_data // 8)),
    )
    write_raw(craw, layout.comp_size, cext, pools, layout.comp_mix)
    comp = work / "comp.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", craw.name, comp.name], cwd=work)
    craw.unlink()

    return Images(base, tops[0], tops[1], comp, len(extents), _facts(work, base))
