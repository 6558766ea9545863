#!/usr/bin/env python3
"""ESXi snapshot chains: flatfs convert against qemu-img convert -O qcow2.

    python bench/esxi.py [--full | --quick] [--pairs N] [--out DIR] [--warm] [--keep]

* ``esxi-sesparse``: a seSparse delta holding D of data (runs of 1 MiB,
  stored in the file in shuffled order, the tables in shuffled slots) over a
  thin ``-flat.vmdk`` of S (a sparse file with 64 MiB of data).
* ``esxi-vmfssparse``: three vmfsSparse deltas (COWD, 4 KiB grains) over a
  thin flat base of C, each delta holding D/4 of data, partly over the one
  below.

D is 256 MiB, S and C 16 GiB by default (the machine is shared); 2 GiB,
1 TiB and 64 GiB with ``--full`` (qemu-img then needs minutes per run: it
asks the block status of every 4 KiB grain of the disk).
Both tools convert the same files (createType ``vmfs``: QEMU refuses
``vmfsThin``), each run a child of bench/launch.py, after ``sync`` and (as
root) a cache drop; one warm-up pair whose outputs ``qemu-img compare``
checks, then N interleaved pairs, order alternating. Figure: wall to durable
(the process's wall + an fsync of the output after exit, since qemu-img does
not flush), ratio flatfs / qemu-img per pair, median with min-max. Target:
flatfs <= 0.8x.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import compare_outputs, convert_once  # noqa: E402
from shared import (  # noqa: E402
    SE_GRAIN,
    SE_GTES,
    grain_entry,
    sesparse_layout,
    write_descriptor,
    write_thin_flat,
)
from timing import Cache, pair_ratios  # noqa: E402
from views import flatfs_cmd  # noqa: E402

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
SECTOR = 512
RUN = MiB  # data is written in runs of 1 MiB (256 grains of 4 KiB)
TARGET = 0.8


def _chunk(seed: int, n: int) -> bytes:
    """n bytes of data that no tool can skip: each 4 KiB stamped with (seed, index)."""
    stamp = [struct.pack("<QQ", seed, i).ljust(4096, bytes([seed % 251 + 1])) for i in range(n // 4096)]
    return b"".join(stamp)


def write_sesparse_bulk(path: Path, capacity: int, runs: list[int], seed: int) -> None:
    """A seSparse extent whose data is ``runs`` (guest offsets of 1 MiB runs), stored shuffled."""
    a = sesparse_layout(capacity)
    rnd = random.Random(seed)
    order = runs[:]
    rnd.shuffle(order)
    gpr = RUN // SE_GRAIN
    tables: dict[int, bytearray] = {}
    with open(path, "wb") as f:
        g0 = a["grains"][0] * SECTOR
        for k, off in enumerate(order):  # the k-th run stored is grains k*gpr... of the area
            f.seek(g0 + k * RUN)
            f.write(_chunk(seed * 1000003 + off // RUN, RUN))
            first = off // SE_GRAIN
            for j in range(gpr):
                t, e = divmod(first + j, SE_GTES)
                struct.pack_into(
                    "<Q", tables.setdefault(t, bytearray(SE_GTES * 8)), 8 * e, grain_entry(k * gpr + j)
                )
        slots = list(tables)
        rnd.shuffle(slots)
        gd0, gt0 = a["gd"][0] * SECTOR, a["gts"][0] * SECTOR
        for slot, t in enumerate(slots):
            f.seek(gd0 + 8 * t)
            f.write(struct.pack("<Q", 0x1000000000000000 | slot))
            f.seek(gt0 + slot * 64 * SECTOR)
            f.write(tables[t])
        f.seek(0)
        f.write(
            struct.pack(
                "<26Q",
                0xCAFEBABE,
                0x0000000200000001,
                capacity // SECTOR,
                8,
                64,
                0,
                0,
                0,
                0,
                0,
                *(
                    v
                    for key in (
                        "volatile",
                        "journal header",
                        "journal",
                        "gd",
                        "gts",
                        "free bitmap",
                        "back map",
                    )
                    for v in a[key]
                ),
                a["grains"][0],
                len(runs) * RUN // SECTOR,
            )
        )
        f.seek(SECTOR)
        f.write(struct.pack("<4Q", 0xCAFECAFE, len(slots), 1, 0))
        f.truncate(max(g0 + len(runs) * RUN, (a["back map"][0] + 1) * SECTOR))


def write_cowd_bulk(path: Path, capacity: int, runs: list[int], seed: int) -> None:
    """A vmfsSparse extent (4 KiB grains) whose data is ``runs`` (1 MiB each), stored shuffled."""
    gs, gtes = 8, 4096
    span = gtes * gs * SECTOR
    n_gd = -(-capacity // span)
    rnd = random.Random(seed)
    order = runs[:]
    rnd.shuffle(order)
    tables = sorted({off // span for off in runs} | {(off + RUN - 1) // span for off in runs})
    rnd.shuffle(tables)
    pos = 4 + -(-n_gd * 4 // SECTOR)
    gt_at = {}
    for t in tables:
        gt_at[t] = pos
        pos += gtes * 4 // SECTOR
    gts = {t: bytearray(gtes * 4) for t in tables}
    with open(path, "wb") as f:
        for off in order:
            f.seek(pos * SECTOR)
            f.write(_chunk(seed * 1000003 + off // RUN, RUN))
            for j in range(RUN // (gs * SECTOR)):
                t, e = divmod(off // (gs * SECTOR) + j, gtes)
                struct.pack_into("<I", gts[t], 4 * e, pos + j * gs)
            pos += RUN // SECTOR
        gd = bytearray(n_gd * 4)
        for t, at in gt_at.items():
            struct.pack_into("<I", gd, 4 * t, at)
            f.seek(at * SECTOR)
            f.write(gts[t])
        f.seek(4 * SECTOR)
        f.write(gd)
        f.seek(0)
        f.write(
            struct.pack("<4sIIIIIII", b"COWD", 1, 3, capacity // SECTOR, gs, 4, n_gd, pos).ljust(2048, b"\0")
        )


def _base(d: Path, size: int) -> None:
    write_thin_flat(
        d / "vm-flat.vmdk", size, {i * (size // 64): _chunk(7, MiB) for i in range(64)}, image=False
    )
    write_descriptor(d / "vm.vmdk", "vmfs", [(size // SECTOR, "VMFS", "vm-flat.vmdk")], cid=0xB0000001)


def build(work: Path, data: int, size: int, cowd_size: int) -> dict[str, Path]:
    out = {}
    d = work / "sesparse"
    d.mkdir(parents=True)
    _base(d, size)
    rnd = random.Random(1)
    runs = sorted(rnd.sample(range(0, size // 4 // RUN), data // RUN))  # in the first quarter
    write_sesparse_bulk(d / "vm-000001-sesparse.vmdk", size, [r * RUN for r in runs], 1)
    out["esxi-sesparse"] = write_descriptor(
        d / "vm-000001.vmdk",
        "seSparse",
        [(size // SECTOR, "SESPARSE", "vm-000001-sesparse.vmdk")],
        cid=0xB0000002,
        parent_cid=0xB0000001,
        parent_hint="vm.vmdk",
    )
    d = work / "vmfssparse"
    d.mkdir(parents=True)
    size = cowd_size
    _base(d, size)
    parent = "vm.vmdk"
    for n in (1, 2, 3):
        runs = sorted(rnd.sample(range(0, size // RUN // 2 + n * (size // RUN // 16)), data // 4 // RUN))
        name = f"vm-{n:06d}"
        write_cowd_bulk(d / f"{name}-delta.vmdk", size, [r * RUN for r in runs], 10 + n)
        top = write_descriptor(
            d / f"{name}.vmdk",
            "vmfsSparse",
            [(size // SECTOR, "VMFSSPARSE", f"{name}-delta.vmdk")],
            cid=0xB0000001 + n,
            parent_cid=0xB0000000 + n,
            parent_hint=parent,
        )
        parent = top.name
    out["esxi-vmfssparse"] = top
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--full", action="store_true", help="2 GiB of delta data (default 256 MiB), a 1 TiB seSparse disk"
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 GiB disks, 32 MiB of data, 1 pair: runs, measures nothing"
    )
    ap.add_argument("--only", choices=("esxi-sesparse", "esxi-vmfssparse"), help="one scenario")
    ap.add_argument("--pairs", type=int, help="timed pairs after the warm-up (default 3; 1 with --full)")
    ap.add_argument("--out", default="/var/tmp/flatfs-bench-esxi", help="scratch folder (removed afterwards)")
    ap.add_argument("--warm", action="store_true", help="do not drop caches")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args(argv)
    work = Path(args.out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    data = 2 * GiB if args.full else 32 * MiB if args.quick else 256 * MiB
    pairs = args.pairs if args.pairs is not None else (1 if args.full or args.quick else 3)
    small = GiB if args.quick else 16 * GiB
    cache = Cache(not args.warm, warm_cmds=[flatfs_cmd() + ["convert", "--help"], ["qemu-img", "--version"]])
    try:
        srcs = build(work, data, TiB if args.full else small, 64 * GiB if args.full else small)
        if args.only:
            srcs = {args.only: srcs[args.only]}
        print(f"ESXi convert to qcow2, {data // MiB} MiB of delta data, cache {cache.mode}, {pairs} pairs")
        failed = False
        for case, src in srcs.items():
            f: list[float] = []
            q: list[float] = []
            wd = src.parent
            for pair in range(pairs + 1):
                tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
                for tool in tools:
                    r = convert_once(tool, src, wd, False, cache, pair == 0)
                    if pair:
                        (f if tool == "flatfs" else q).append(r["durable"])
                    print(
                        f"  {case:16} {tool:6} durable {r['durable']:7.3f} s  cpu {r['cpu']:7.3f} s",
                        flush=True,
                    )
                if pair == 0:
                    check = compare_outputs(wd)
                    print(f"  {case:16} outputs: {check}")
                    failed |= check != "identical"
                    for tool in tools:
                        (wd / f"out-{tool}.qcow2").unlink(missing_ok=True)
            ratios = pair_ratios(f, q)
            m = statistics.median(ratios)
            verdict = "PASS" if m <= TARGET else "MISS"
            print(
                f"  {case:16} flatfs {statistics.median(f):.3f} s, qemu-img {statistics.median(q):.3f} s: "
                f"{m:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}) {verdict} (target <= {TARGET}x)"
            )
            failed |= m > TARGET
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
