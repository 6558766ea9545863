"""The compute-bound convert scenario of `make bench`: the disk taken away.

The seed images (the 1 TiB overlay and its base) are copied onto a
memory-backed folder (tmpfs, ``/dev/shm`` by default) and converted there to
qcow2 by both tools, the target on the same tmpfs, so nothing waits on a
disk: what is left is the CPU each tool spends (its own code and the
kernel's page-cache copies). In interleaved pairs after a warm-up pair
(whose outputs ``qemu-img compare`` checks), each command runs as its own
child (bench/launch.py): wall, user CPU and sys CPU separately, and peak RSS.
The statistic is the median of the within-pair ratios flatfs / qemu-img,
with their spread (min-max). ``cp --sparse=never`` of the base on the same
tmpfs, once per pair, is the limit line: copying the bytes through the page
cache once, with no format work at all.

tmpfs has no writeback: "wall" is also wall to durable here.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import pair_ratios, run_child

TOOLS = ("flatfs", "qemu")
KEYS = ("wall", "user", "sys", "cpu", "rss_mib")
MEMORY_FS = ("tmpfs", "ramfs")
TARGETS = {"wall": 0.8, "cpu": 1.0}  # issue 14: ratio flatfs / qemu-img


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    best, kind = "", "unknown"
    real = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4].replace("\\040", " ")
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, right.split()[0]
    return kind


def prepare(root: Path, base: Path, top: Path, log: Callable[[str], None]) -> Path | str:
    """Copy ``base`` and ``top`` into a fresh folder under ``root`` (a tmpfs); its path, or why not."""
    if not root.is_dir():
        return f"{root} is not a folder"
    kind = fs_type(root)
    if kind not in MEMORY_FS:
        return f"{root} is {kind}, not a memory-backed file system (tmpfs)"
    data = base.stat().st_blocks * 512 + top.stat().st_blocks * 512
    # the seed images, one target at a time, the cp copy of the base, and slack
    need = data + 2 * base.stat().st_size + (256 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        return (
            f"{root} has {free / 2**30:.1f} GiB free; the tmpfs scenario needs about "
            f"{need / 2**30:.1f} GiB (use --tmpfs on a bigger tmpfs or a smaller --scale)"
        )
    work = root / f"flatfs-bench-tmpfs-{os.getpid()}"
    work.mkdir()
    for p in (base, top):
        subprocess.run(["cp", "--sparse=always", str(p), str(work / p.name)], check=True)
    log(f"  copied the seed images to {work} ({kind}, {data / 2**30:.2f} GiB)")
    return work


def scenario(
    root: Path, imgs: Any, pairs: int, flatfs: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    """The whole scenario: copy the seed images to ``root``, run the pairs, remove the copies."""
    work = prepare(root, imgs.base, imgs.top_small, log)
    if isinstance(work, str):
        log(f"  skipped: {work}")
        return {"skipped": work, "checks": {}}
    try:
        return run(work, imgs.base.name, imgs.top_small.name, pairs, flatfs, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cmds(tool: str, flatfs: list[str], top: str, out: str) -> list[str]:
    if tool == "flatfs":
        return flatfs + ["convert", top, out]
    return ["qemu-img", "convert", "-O", "qcow2", top, out]


def _once(cmd: list[str], work: Path, out: Path, keep: bool = False) -> dict[str, float]:
    out.unlink(missing_ok=True)
    r = run_child(cmd, cwd=work)
    if not keep:
        out.unlink(missing_ok=True)
    return {"wall": r.wall, "user": r.user, "sys": r.sys, "cpu": r.cpu, "rss_mib": r.maxrss_mib}


def run(
    work: Path, base: str, top: str, pairs: int, flatfs: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    """Warm-up pair, then ``pairs`` interleaved pairs; each pair also copies the base with cp."""
    samples: dict[str, list[dict[str, float]]] = {t: [] for t in TOOLS}
    cp: list[float] = []
    checks: dict[str, str] = {}
    outs = {t: work / f"out-{t}.qcow2" for t in TOOLS}
    for pair in range(pairs + 1):
        tools = TOOLS if pair % 2 == 0 else TOOLS[::-1]
        for tool in tools:
            r = _once(_cmds(tool, flatfs, top, outs[tool].name), work, outs[tool], keep=pair == 0)
            if pair:
                samples[tool].append(r)
            log(
                f"    tmpfs {tool:6} wall {r['wall']:6.3f} s  user {r['user']:6.3f} s  "
                f"sys {r['sys']:6.3f} s  rss {r['rss_mib']:5.1f} MiB"
            )
        if pair == 0:
            c = subprocess.run(
                ["qemu-img", "compare", "-q", outs["flatfs"].name, outs["qemu"].name],
                cwd=work,
                capture_output=True,
                text=True,
            )
            checks["tmpfs convert: flatfs output vs qemu-img output"] = (
                "identical" if c.returncode == 0 else "DIFFERENT: " + (c.stdout + c.stderr).strip()
            )
            for p in outs.values():
                p.unlink(missing_ok=True)
        copy = work / "cp.out"
        r = _once(["cp", "--sparse=never", base, copy.name], work, copy)
        if pair:
            cp.append(r["wall"])
        log(f"    tmpfs cp     wall {r['wall']:6.3f} s (the base, --sparse=never)")
    return {"samples": samples, "cp": cp, "checks": checks, "figures": figures(samples, cp)}


def figures(samples: dict[str, list[dict[str, float]]], cp: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in KEYS:
        f = [r[key] for r in samples["flatfs"]]
        q = [r[key] for r in samples["qemu"]]
        ratios = pair_ratios(f, q)
        out[key] = {
            "flatfs": statistics.median(f) if f else None,
            "qemu": statistics.median(q) if q else None,
            "flatfs_range": (min(f), max(f)) if f else None,
            "qemu_range": (min(q), max(q)) if q else None,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_range": (min(ratios), max(ratios)) if ratios else None,
        }
    out["cp"] = {
        "median": statistics.median(cp) if cp else None,
        "range": (min(cp), max(cp)) if cp else None,
    }
    return out


def lines(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return ["", f"tmpfs scenario skipped: {res['skipped']}"]
    fig = res["figures"]
    n = len(res["samples"]["flatfs"])
    out = [
        "",
        f"tmpfs (convert to qcow2, images and target in memory; {n} pairs; "
        "ratio flatfs/qemu-img = median of the pair ratios [min-max])",
    ]
    for key, label in (("wall", "wall"), ("user", "user CPU"), ("sys", "sys CPU"), ("cpu", "CPU user+sys")):
        row = fig[key]
        if row["ratio"] is None:
            out.append(f"  {label:12}  —")
            continue
        lo, hi = row["ratio_range"]
        verdict = ""
        if key in TARGETS:
            verdict = f"  target <= {TARGETS[key]:.1f}x {'PASS' if row['ratio'] <= TARGETS[key] else 'MISS'}"
        out.append(
            f"  {label:12}  {row['flatfs']:.3f} s vs {row['qemu']:.3f} s = {row['ratio']:.2f}x "
            f"[{lo:.2f}-{hi:.2f}]{verdict}"
        )
    rss = fig["rss_mib"]
    if rss["flatfs"] is not None:
        out.append(f"  peak RSS      {rss['flatfs']:.1f} MiB vs {rss['qemu']:.1f} MiB")
    c = fig["cp"]
    if c["median"] is not None:
        out.append(
            f"  limit line    cp --sparse=never of the base: {c['median']:.3f} s "
            f"[{c['range'][0]:.3f}-{c['range'][1]:.3f}]"
        )
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
