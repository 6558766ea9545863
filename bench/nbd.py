#!/usr/bin/env python3
"""`flatfs serve` against `qemu-nbd -r` on the bench's chains, with real NBD clients.

    .venv/bin/python bench/nbd.py [--scale S] [--quick] [--pairs N] [--out DIR] [--cold] [--keep]

The images are the bench's own (bench/images.py): a qcow2 base with
2 GiB x S of data under a 1 TiB and a 64 TiB overlay. Each server is started
once per tool and kept up (server start-up is not timed); then, in
interleaved pairs whose order alternates:

* ``nbdcopy URI null:`` (the whole 1 TiB export to nowhere: block status,
  then the data) and ``nbdcopy URI out.raw`` (to a sparse file); throughput
  ratio = QEMU's time / flatfs's time (>= 1.0 means flatfs is as fast);
* ``nbdinfo --map`` of the 64 TiB export: time ratio flatfs / QEMU (<= 1.0).

Ratios are medians of the within-pair ratios, with their min-max spread.
Warm page cache by default (the machine is shared: dropping its caches
would disturb everyone else); ``--cold`` drops them before every run (root).
Every server is stopped by its pid in ``finally``; OUT/work is removed
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import images  # noqa: E402
from timing import Cache, pair_ratios, summary  # noqa: E402

TOOLS = ("flatfs", "qemu")
CASES = {
    "copy_null": ("nbdcopy to null:", "1t", "throughput", 1.0),
    "copy_file": ("nbdcopy to a sparse file", "1t", "throughput", 1.0),
    "map_64t": ("nbdinfo --map, 64 TiB", "64t", "time", 1.0),
}


def start(tool: str, image: Path, sock: Path, pid_file: Path) -> str:
    if tool == "flatfs":
        cmd = [sys.executable, "-m", "flatfs", "serve", "--socket", str(sock), "--pid-file", str(pid_file)]
        subprocess.run([*cmd, str(image)], check=True, capture_output=True)
    else:
        cmd = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", str(sock), f"--pid-file={pid_file}", "--fork"]
        subprocess.run([*cmd, str(image)], check=True, capture_output=True)
    return f"nbd+unix:///?socket={sock}"


def stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(2000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)


def timed(cmd: list[str], cache: Cache) -> tuple[float, str]:
    cache.reset(programs=False)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.25, help="x 2 GiB of data (default 0.25: 512 MiB)")
    ap.add_argument("--quick", action="store_true", help="64 MiB of data, one pair: a smoke test")
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs after a warm-up (default 5)")
    ap.add_argument("--out", default="/var/tmp/flatfs-bench-nbd")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--keep", action="store_true", help="keep OUT/work")
    args = ap.parse_args(argv)
    missing = [t for t in ("nbdkit", "nbdcopy", "nbdinfo", "qemu-nbd", "qemu-img") if not shutil.which(t)]
    if missing:
        print(f"bench: missing {', '.join(missing)} (make deps-test installs them)", file=sys.stderr)
        return 2
    layout = images.Layout.make(args.scale, args.quick)
    pairs = args.pairs or (1 if args.quick else 5)
    out = Path(args.out).resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = Cache(args.cold)
    pid_files: list[Path] = []
    samples: dict[str, dict[str, list[float]]] = {c: {t: [] for t in TOOLS} for c in CASES}
    checks: dict[str, bool] = {}
    try:
        print(f"bench nbd: building the chains ({layout.data / images.GiB:.2f} GiB of data)", flush=True)
        imgs = images.build(work, layout, log=lambda m: print(m, flush=True))
        uris: dict[tuple[str, str], str] = {}
        for tool in TOOLS:
            for key, image in (("1t", imgs.top_small), ("64t", imgs.top_big)):
                pid_file = work / f"{tool}-{key}.pid"
                pid_files.append(pid_file)
                uris[tool, key] = start(tool, image, work / f"{tool}-{key}.sock", pid_file)
        maps = {t: subprocess.run(["nbdinfo", "--map", uris[t, "64t"]], capture_output=True, text=True).stdout
                for t in TOOLS}  # fmt: skip
        checks["nbdinfo --map of the 64 TiB chain: same map from both servers"] = (
            maps["flatfs"] == maps["qemu"]
        )
        for p in range(pairs + 1):  # pair 0 warms up
            for tool in TOOLS if p % 2 else TOOLS[::-1]:
                dst = work / f"copy-{tool}.raw"
                runs = {
                    "copy_null": ["nbdcopy", uris[tool, "1t"], "null:"],
                    "copy_file": ["nbdcopy", uris[tool, "1t"], str(dst)],
                    "map_64t": ["nbdinfo", "--map", uris[tool, "64t"]],
                }
                for case, cmd in runs.items():
                    dst.unlink(missing_ok=True)
                    secs, _ = timed(cmd, cache)
                    if p:
                        samples[case][tool].append(secs)
                    if case == "copy_file" and p == pairs:
                        same = subprocess.run(
                            ["qemu-img", "compare", "-f", "raw", str(dst), str(imgs.top_small)]
                        )
                        checks[f"nbdcopy from {tool}: the copy equals the chain"] = same.returncode == 0
                dst.unlink(missing_ok=True)
    finally:
        for pid_file in pid_files:
            stop(pid_file)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "layout": {"data": layout.data, "pairs": pairs, "cache": cache.mode},
        "figures": {},
        "checks": checks,
    }
    print(f"\n{'figure':28} {'flatfs s':>9} {'qemu-nbd s':>10} {'ratio':>7}  spread         target")
    for case, (label, _, kind, goal) in CASES.items():
        f, q = samples[case]["flatfs"], samples[case]["qemu"]
        r = pair_ratios(q, f) if kind == "throughput" else pair_ratios(f, q)
        s = summary(r)
        ok = s["median"] is not None and (
            s["median"] >= goal if kind == "throughput" else s["median"] <= goal
        )
        sign = ">=" if kind == "throughput" else "<="
        result["figures"][case] = {"flatfs": summary(f), "qemu": summary(q), "ratio": s, "met": ok}
        print(
            f"{label:28} {summary(f)['median']:9.3f} {summary(q)['median']:10.3f} {s['median']:7.2f}  "
            f"{s['min']:.2f}-{s['max']:.2f}      {kind} {sign} {goal} {'PASS' if ok else 'MISS'}"
        )
    for what, ok in checks.items():
        print(f"check: {what}: {'ok' if ok else 'DIFFERENT'}")
    (out / "bench-nbd.json").write_text(json.dumps(result, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
