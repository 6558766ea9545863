#!/usr/bin/env python3
"""`flatfs serve` against `qemu-nbd -r` on the bench's chains, with real NBD clients.

    .venv/bin/python bench/nbd.py [--scale S] [--quick] [--pairs N] [--out DIR] [--cold] [--keep] [--rev REV]

The images are the bench's own (bench/images.py): a qcow2 base with
2 GiB x S of data under a 1 TiB and a 64 TiB overlay. Each server is started
once per tool and kept up (server start-up is not timed); then, in
interleaved pairs whose order alternates:

* ``nbdcopy URI null:`` (the whole 1 TiB export to nowhere: block status,
  then the data) and ``nbdcopy URI out.raw`` (to a sparse file); throughput
  ratio = QEMU's time / flatfs's time (>= 1.0 means flatfs is as fast);
* ``nbdinfo --map`` of the 64 TiB export: time ratio flatfs / QEMU (<= 1.0).

Ratios are medians of the within-pair ratios, with their min-max spread.
Each run also reads the server's CPU time (user + system, from /proc) before
and after. ``--rev REV`` adds a third server, ``flatfs serve`` of the git
revision REV (``git archive``d under OUT, run with this interpreter), to the
same interleaved runs: before and after a change, each against qemu-nbd.
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
from ab import export  # noqa: E402
from timing import Cache, pair_ratios, summary  # noqa: E402

CASES = {
    "copy_null": ("nbdcopy to null:", "1t", "throughput", 1.0),
    "copy_file": ("nbdcopy to a sparse file", "1t", "throughput", 1.0),
    "map_64t": ("nbdinfo --map, 64 TiB", "64t", "time", 1.0),
}


def start(tool: str, image: Path, sock: Path, pid_file: Path, tree: Path | None = None) -> str:
    if tool.startswith("flatfs"):
        cmd = [sys.executable, "-m", "flatfs", "serve", "--socket", str(sock), "--pid-file", str(pid_file)]
        env = dict(os.environ, PYTHONPATH=str(tree)) if tree is not None else None
        subprocess.run([*cmd, str(image)], check=True, capture_output=True, env=env, cwd=tree)
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


def server_cpu(pid_file: Path) -> float:
    """The server's CPU time so far (user + system), in seconds."""
    fields = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], cache: Cache, pid_file: Path) -> tuple[float, float]:
    """Wall time of ``cmd`` and the server's CPU time during it."""
    cache.reset(programs=False)
    c = server_cpu(pid_file)
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, server_cpu(pid_file) - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=0.25, help="x 2 GiB of data (default 0.25: 512 MiB)")
    ap.add_argument("--quick", action="store_true", help="64 MiB of data, one pair: a smoke test")
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs after a warm-up (default 5)")
    ap.add_argument("--out", default="/var/tmp/flatfs-bench-nbd")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--keep", action="store_true", help="keep OUT/work")
    ap.add_argument("--rev", help="also serve with flatfs of this git revision (before/after a change)")
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
    trees: dict[str, Path | None] = {"flatfs": None, "qemu": None}
    if args.rev:
        trees[f"flatfs@{args.rev}"] = export(args.rev, out / "rev")
    tools = tuple(trees)
    pid_files: list[Path] = []
    samples: dict[str, dict[str, list[float]]] = {c: {t: [] for t in tools} for c in CASES}
    cpu: dict[str, dict[str, list[float]]] = {c: {t: [] for t in tools} for c in CASES}
    checks: dict[str, bool] = {}
    try:
        print(f"bench nbd: building the chains ({layout.data / images.GiB:.2f} GiB of data)", flush=True)
        imgs = images.build(work, layout, log=lambda m: print(m, flush=True))
        uris: dict[tuple[str, str], str] = {}
        pids: dict[tuple[str, str], Path] = {}
        for tool in tools:
            for key, image in (("1t", imgs.top_small), ("64t", imgs.top_big)):
                pid_file = pids[tool, key] = work / f"{tool}-{key}.pid"
                pid_files.append(pid_file)
                uris[tool, key] = start(tool, image, work / f"{tool}-{key}.sock", pid_file, trees[tool])
        maps = {t: subprocess.run(["nbdinfo", "--map", uris[t, "64t"]], capture_output=True, text=True).stdout
                for t in tools}  # fmt: skip
        checks["nbdinfo --map of the 64 TiB chain: same map from every server"] = all(
            m == maps["qemu"] for m in maps.values()
        )
        for p in range(pairs + 1):  # pair 0 warms up
            for tool in tools if p % 2 else tools[::-1]:
                dst = work / f"copy-{tool}.raw"
                runs = {
                    "copy_null": ["nbdcopy", uris[tool, "1t"], "null:"],
                    "copy_file": ["nbdcopy", uris[tool, "1t"], str(dst)],
                    "map_64t": ["nbdinfo", "--map", uris[tool, "64t"]],
                }
                for case, cmd in runs.items():
                    dst.unlink(missing_ok=True)
                    secs, busy = timed(cmd, cache, pids[tool, CASES[case][1]])
                    if p:
                        samples[case][tool].append(secs)
                        cpu[case][tool].append(busy)
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
        "layout": {"data": layout.data, "pairs": pairs, "cache": cache.mode, "rev": args.rev},
        "figures": {},
        "checks": checks,
    }
    w = 28 if args.rev is None else 40
    print(f"\n{'figure':{w}} {'flatfs s':>9} {'qemu-nbd s':>10} {'ratio':>7}  spread         target")
    for case, (label, _, kind, goal) in CASES.items():
        q = samples[case]["qemu"]
        for tool in (t for t in tools if t != "qemu"):
            f = samples[case][tool]
            r = pair_ratios(q, f) if kind == "throughput" else pair_ratios(f, q)
            s = summary(r)
            ok = s["median"] is not None and (
                s["median"] >= goal if kind == "throughput" else s["median"] <= goal
            )
            sign = ">=" if kind == "throughput" else "<="
            key = case if tool == "flatfs" else f"{case} {tool}"
            result["figures"][key] = {
                "flatfs": summary(f),
                "qemu": summary(q),
                "ratio": s,
                "met": ok,
                "server_cpu": {"flatfs": summary(cpu[case][tool]), "qemu": summary(cpu[case]["qemu"])},
            }
            name = label if tool == "flatfs" else f"{label} ({tool})"
            print(
                f"{name:{w}} {summary(f)['median']:9.3f} {summary(q)['median']:10.3f} {s['median']:7.2f}  "
                f"{s['min']:.2f}-{s['max']:.2f}      {kind} {sign} {goal} {'PASS' if ok else 'MISS'}"
            )
    print(f"\n{'server CPU s (median)':{w}} " + " ".join(f"{t:>14}" for t in tools))
    for case, (label, *_) in CASES.items():
        print(f"{label:{w}} " + " ".join(f"{summary(cpu[case][t])['median']:14.3f}" for t in tools))
    for what, ok in checks.items():
        print(f"check: {what}: {'ok' if ok else 'DIFFERENT'}")
    (out / "bench-nbd.json").write_text(json.dumps(result, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
