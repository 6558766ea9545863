"""The copy-offload scenario of `make bench`: convert -C on a file system that shares extents.

An XFS file system made with ``mkfs.xfs -m reflink=1`` in an image file in
the bench work folder, loop-mounted (root only; skipped otherwise), holds a
copy of the seed images (the 1 TiB overlay and its base). In interleaved
pairs after a warm-up: ``flatfs convert -C`` against ``qemu-img convert -C
-O qcow2``, and once per pair ``flatfs convert`` without -C (the bytes
copied). With -C, data runs go through copy_file_range, and XFS shares
the source's extents instead of copying: ``filefrag -v`` of the warm-up's
targets counts the extents flagged ``shared``. The outputs are compared
with ``qemu-img compare`` (all three). The file system is always unmounted
and its loop device detached, in ``finally``.

Ratios: median of the within-pair ratios flatfs -C / qemu-img -C (target
<= 1.5x) and flatfs -C / flatfs (target <= 0.2x), with their spread, of the
wall to durable (as the main convert figure): the process's wall plus an
fsync of the output after it exits, since flatfs fsyncs before its rename
and qemu-img does not flush (on XFS, committing the shared extents to the
log is most of that flush). The wall to exit is printed too.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import filefrag_extents, loop_xfs, loop_xfs_missing
from timing import fsync_path, pair_ratios, run_child

TARGETS = {"vs_qemu": 1.5, "vs_plain": 0.2}
TOOLS = ("flatfs-C", "qemu-C")


def scenario(
    work: Path, imgs: Any, pairs: int, flatfs: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    why = loop_xfs_missing()
    if why:
        log(f"  skipped: {why}")
        return {"skipped": why, "checks": {}}
    base, top = imgs.base, imgs.top_small
    data = base.stat().st_blocks * 512 + top.stat().st_blocks * 512
    folder = work / "reflink-mnt"  # the image and the mount point below it
    folder.mkdir(exist_ok=True)
    with loop_xfs(folder, 3 * data + (1 << 30)) as mnt:
        for p in (base, top):
            subprocess.run(["cp", "--sparse=always", str(p), str(mnt / p.name)], check=True)
        log(f"  XFS (reflink=1) loop-mounted at {mnt}, seed images copied")
        return run(mnt, top.name, pairs, flatfs, log)


def _cmd(tool: str, flatfs: list[str], top: str, out: str) -> list[str]:
    if tool == "flatfs-C":
        return flatfs + ["convert", "-C", top, out]
    if tool == "flatfs":
        return flatfs + ["convert", top, out]
    return ["qemu-img", "convert", "-C", "-O", "qcow2", top, out]


def run(mnt: Path, top: str, pairs: int, flatfs: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {t: [] for t in (*TOOLS, "flatfs")}
    checks: dict[str, str] = {}
    sharing: dict[str, dict[str, int]] = {}
    for pair in range(pairs + 1):
        order = (*TOOLS, "flatfs") if pair % 2 == 0 else ("flatfs", *TOOLS[::-1])
        for tool in order:
            out = mnt / f"out-{tool}.qcow2"
            out.unlink(missing_ok=True)
            os.sync()
            r = run_child(_cmd(tool, flatfs, top, out.name), cwd=mnt)
            durable = r.wall + fsync_path(out)
            if pair:
                samples[tool].append({"wall": r.wall, "durable": durable, "cpu": r.cpu})
                out.unlink()
            log(f"    reflink {tool:8} wall {r.wall:7.3f} s  durable {durable:7.3f} s  cpu {r.cpu:6.3f} s")
        if pair == 0:
            for a, b in (("flatfs-C", "qemu-C"), ("flatfs-C", "flatfs")):
                c = subprocess.run(
                    ["qemu-img", "compare", "-q", f"out-{a}.qcow2", f"out-{b}.qcow2"],
                    cwd=mnt,
                    capture_output=True,
                    text=True,
                )
                checks[f"reflink convert: {a} output vs {b} output"] = (
                    "identical" if c.returncode == 0 else "DIFFERENT: " + (c.stdout + c.stderr).strip()
                )
            for tool in (*TOOLS, "flatfs"):
                sharing[tool] = filefrag_extents(mnt / f"out-{tool}.qcow2")
                (mnt / f"out-{tool}.qcow2").unlink()
            s = sharing["flatfs-C"]
            checks["reflink convert -C: flatfs target's extents shared with the source"] = (
                f"{s['shared']} of {s['extents']} extents, {s['shared_bytes'] / 2**20:.0f} of "
                f"{s['bytes'] / 2**20:.0f} MiB"
                if s["shared"]
                else "DIFFERENT: no extent shared"
            )
    return {"samples": samples, "sharing": sharing, "checks": checks, "figures": figures(samples)}


def _ratio(f: list[dict[str, float]], q: list[dict[str, float]], key: str) -> dict[str, Any]:
    r = pair_ratios([a[key] for a in f], [b[key] for b in q])
    return {"ratio": statistics.median(r) if r else None, "range": (min(r), max(r)) if r else None}


def _stat(v: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(v) if v else None, "range": (min(v), max(v)) if v else None}


def figures(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        t: {k: _stat([r[k] for r in v]) for k in ("wall", "durable", "cpu")} for t, v in samples.items()
    }
    out["vs_qemu"] = _ratio(samples["flatfs-C"], samples["qemu-C"], "durable")
    out["vs_plain"] = _ratio(samples["flatfs-C"], samples["flatfs"], "durable")
    out["vs_qemu_exit"] = _ratio(samples["flatfs-C"], samples["qemu-C"], "wall")
    return out


def lines(res: dict[str, Any]) -> list[str]:
    if "skipped" in res:
        return ["", f"reflink XFS scenario skipped: {res['skipped']}"]
    fig = res["figures"]
    n = len(res["samples"]["flatfs-C"])
    out = ["", f"reflink XFS (convert to qcow2 with copy offload; {n} pairs; median [min-max])"]
    for t, label in (("flatfs-C", "flatfs -C"), ("qemu-C", "qemu-img -C"), ("flatfs", "flatfs")):
        parts = []
        for k in ("durable", "wall", "cpu"):
            m = fig[t][k]
            if m["median"] is not None:
                parts.append(f"{k} {m['median']:.3f} s [{m['range'][0]:.3f}-{m['range'][1]:.3f}]")
        out.append(f"  {label:12} " + "  ".join(parts))
    for key, label in (
        ("vs_qemu", "flatfs -C / qemu-img -C, wall to durable"),
        ("vs_plain", "flatfs -C / flatfs, wall to durable"),
        ("vs_qemu_exit", "flatfs -C / qemu-img -C, wall to exit"),
    ):
        r = fig[key]
        if r["ratio"] is not None:
            goal = TARGETS.get(key)
            verdict = f"  target <= {goal}x {'PASS' if r['ratio'] <= goal else 'MISS'}" if goal else ""
            out.append(f"  {label:42} {r['ratio']:.2f}x [{r['range'][0]:.2f}-{r['range'][1]:.2f}]{verdict}")
    for tool, s in res["sharing"].items():
        out.append(
            f"  filefrag -v, {tool} target: {s['shared']} of {s['extents']} extents shared "
            f"({s['shared_bytes'] / 2**20:.0f} of {s['bytes'] / 2**20:.0f} MiB)"
        )
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
