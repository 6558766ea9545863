#!/usr/bin/env python3
"""Two revisions of flatfs, back to back: ``flatfs convert`` of the bench's convert sources.

    python bench/ab.py A B [--quick | --scale N] [--pairs N] [--out DIR] [--reuse] [--warm]

A and B are git revisions of this repository (``main``, ``HEAD``...); each
is exported (``git archive``) to a folder under OUT and run with this
interpreter as ``python -m flatfs`` from there, so both sides pay the same
start-up. The sources are bench/run.py's convert scenario (bench/images.py:
the 1 TiB qcow2 overlay, the compressed-scenario image), built once under
OUT/work. Per case: one warm-up pair, which also checks that A and B wrote
the same bytes, then N pairs whose order alternates; each run is timed by
bench/launch.py (wall, CPU user+sys, peak RSS of the command alone), plus
an fsync of the output (wall to durable), after ``sync`` and, as root,
dropped caches. Printed: per case and figure, the medians of A and B and
the median of the within-pair ratios B/A with their min-max spread.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import images  # noqa: E402
from timing import Cache, fsync_path, pair_ratios, run_child  # noqa: E402

# case -> (convert options, source image in OUT/work)
CASES = {
    "qcow2": (["-O", "qcow2"], "top-1t.qcow2"),
    "qcow2 -c": (["-c", "-O", "qcow2"], "comp.qcow2"),
    "raw": (["-O", "raw"], "top-1t.qcow2"),
    "qcow2 -C": (["-C", "-O", "qcow2"], "top-1t.qcow2"),
}
FIGURES = ("durable", "cpu", "rss")


def export(rev: str, dest: Path) -> Path:
    """The tree of ``rev`` under ``dest`` (replaced)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def once(tree: Path, args: list[str], src: str, work: Path, out: str, cache: Cache) -> dict[str, float]:
    (work / out).unlink(missing_ok=True)
    cache.reset()
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    r = run_child([sys.executable, "-m", "flatfs", "convert", *args, src, out], cwd=work, env=env)
    return {"durable": r.wall + fsync_path(work / out), "cpu": r.cpu, "rss": r.maxrss_mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="git revision A (the reference)")
    ap.add_argument("b", help="git revision B")
    ap.add_argument("--quick", action="store_true", help="bench/run.py --quick's images (64 MiB of data)")
    ap.add_argument("--scale", type=float, default=1.0, help="bench/run.py --scale's images")
    ap.add_argument("--pairs", type=int, default=7, help="timed pairs per case (default 7)")
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/flatfs-bench-ab"))
    ap.add_argument("--reuse", action="store_true", help="reuse the images of an earlier run in OUT/work")
    ap.add_argument("--warm", action="store_true", help="do not drop caches")
    ap.add_argument("--only", choices=sorted(CASES), help="one case only")
    args = ap.parse_args()
    work = args.out / "work"
    if not args.reuse:
        if work.exists():
            shutil.rmtree(work)
        images.build(work, images.Layout.make(scale=args.scale, quick=args.quick))
    trees = {"A": export(args.a, args.out / "A"), "B": export(args.b, args.out / "B")}
    cache = Cache(want_cold=not args.warm)
    print(f"A = {args.a}, B = {args.b}; {args.pairs} pairs per case, {cache.mode} cache")
    print("| case | figure | A (median) | B (median) | B/A: median of pairs (min-max) |")
    print("|---|---|---|---|---|")
    for name, (opts, src) in CASES.items():
        if args.only and name != args.only:
            continue
        once(trees["A"], opts, src, work, "a.out", cache)
        once(trees["B"], opts, src, work, "b.out", cache)
        if not filecmp.cmp(work / "a.out", work / "b.out", shallow=False):
            raise SystemExit(f"bench: {name}: A and B wrote different bytes")
        runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for i in range(args.pairs):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                runs[side].append(once(trees[side], opts, src, work, "a.out", cache))
        for fig in FIGURES:
            a = [r[fig] for r in runs["A"]]
            b = [r[fig] for r in runs["B"]]
            ratios = pair_ratios(b, a)
            unit = " MiB" if fig == "rss" else " s"
            print(
                f"| {name} | {fig} | {statistics.median(a):.3f}{unit} | {statistics.median(b):.3f}{unit} "
                f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |",
                flush=True,
            )
    for p in (work / "a.out", work / "b.out"):
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
