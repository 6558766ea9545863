#!/usr/bin/env python3
"""Deep backing chains: what each layer costs flatfs and qemu-img.

    python bench/depth.py [--depths 10,100,500] [--pairs N] [--out DIR]

For each depth, a qcow2 chain of 1 MiB images with 4 KiB clusters (made as the
tests make it: tests/helpers/chains.py ``deep_qcow2_chain``; a little data in
the base, a middle layer and the top) is opened, mapped and converted by both
tools, in interleaved pairs whose order alternates, after one warm-up pair:

* open:    ``flatfs info --output json``   vs ``qemu-img info --backing-chain --output json``
* map:     ``flatfs map --output json``    vs ``qemu-img map --output json``
* convert: ``flatfs convert -O qcow2``     vs ``qemu-img convert -O qcow2``

Each figure is the median wall time of each tool, the median of the within-pair
ratios flatfs/qemu-img with their min-max, and the cost per layer: the slope
between the smallest and largest depth. The warm-up pair's converted images are
compared with ``qemu-img compare``. Warm cache (the chains are a few MiB).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared import Qemu, deep_qcow2_chain
from timing import pair_ratios

FLATFS = [sys.executable, "-m", "flatfs"]
OPS = ("open", "map", "convert")


def commands(op: str, top: Path, out: Path) -> dict[str, list[str]]:
    if op == "open":
        return {
            "flatfs": [*FLATFS, "info", "--output", "json", str(top)],
            "qemu": ["qemu-img", "info", "--backing-chain", "--output", "json", str(top)],
        }
    if op == "map":
        return {
            "flatfs": [*FLATFS, "map", "--output", "json", str(top)],
            "qemu": ["qemu-img", "map", "--output", "json", str(top)],
        }
    return {
        "flatfs": [*FLATFS, "convert", "-O", "qcow2", str(top), str(out.with_suffix(".flatfs"))],
        "qemu": ["qemu-img", "convert", "-O", "qcow2", str(top), str(out.with_suffix(".qemu"))],
    }


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def measure(top: Path, work: Path, pairs: int) -> dict[str, dict[str, list[float]]]:
    out = work / "out"
    samples: dict[str, dict[str, list[float]]] = {op: {"flatfs": [], "qemu": []} for op in OPS}
    for pair in range(pairs + 1):
        tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
        for op in OPS:
            cmds = commands(op, top, out)
            for tool in tools:
                out.with_suffix("." + tool).unlink(missing_ok=True)
                t = timed(cmds[tool], work)
                if pair:
                    samples[op][tool].append(t)
            if op == "convert" and pair == 0:
                subprocess.run(
                    ["qemu-img", "compare", str(out.with_suffix(".flatfs")), str(out.with_suffix(".qemu"))],
                    check=True,
                    capture_output=True,
                )
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="10,100,500")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    base = Path(tempfile.mkdtemp(prefix="flatfs-depth-", dir=args.out))
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    try:
        for depth in depths:
            work = base / f"d{depth}"
            work.mkdir()
            names = deep_qcow2_chain(Qemu(), work, depth)
            results[depth] = measure(names[-1], work, args.pairs)
            shutil.rmtree(work)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"Deep chains: {args.pairs} pairs after a warm-up, medians; ratio flatfs/qemu-img (min-max)")
    print(f"{'depth':>5}  {'op':8} {'flatfs s':>9} {'qemu s':>9}  ratio")
    for depth, by_op in results.items():
        for op, s in by_op.items():
            r = pair_ratios(s["flatfs"], s["qemu"])
            f, q = statistics.median(s["flatfs"]), statistics.median(s["qemu"])
            print(
                f"{depth:>5}  {op:8} {f:9.3f} {q:9.3f}  "
                f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
            )
    lo, hi = min(depths), max(depths)
    if hi > lo:
        print(f"per layer (slope from {lo} to {hi} layers), ms:")
        for op in OPS:
            per = {
                t: (statistics.median(results[hi][op][t]) - statistics.median(results[lo][op][t]))
                / (hi - lo)
                * 1e3
                for t in ("flatfs", "qemu")
            }
            print(f"  {op:8} flatfs {per['flatfs']:.3f}  qemu-img {per['qemu']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
