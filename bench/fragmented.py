"""The fragmented-disk scenario of `make bench`: what each extent costs.

A qcow2 holding 4 KiB of data every 128 KiB (one allocated 64 KiB cluster
per run) under an empty overlay: 262,144 data runs in 32 GiB at scale 1
(--quick: 1 GiB, 8,192 runs), built with qemu-img convert from a sparse raw
file. In interleaved pairs, after a warm-up pair (warm cache: this is about
CPU per extent, not the disk):

* ``flatfs map --output=json`` against ``qemu-img map --output=json``: wall and peak RSS;
* the human maps (flatfs also prints the holes qemu-img leaves out);
* ``flatfs mount`` until the view is readable (the data-run index pass).

Ratio = the median of the within-pair ratios flatfs / qemu-img.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import pair_ratios, run_child

STRIDE = 128 << 10
DATA = 4 << 10
CASES = ("map-json", "map-human")


def build(work: Path, quick: bool, log: Callable[[str], None]) -> Path:
    """frag-top.qcow2 over frag-base.qcow2; the raw file they come from is removed."""
    size = (1 << 30) if quick else (32 << 30)
    raw, base, top = work / "frag.raw", work / "frag-base.qcow2", work / "frag-top.qcow2"
    if top.exists() and base.exists():
        return top
    block = b"\x5a" * DATA
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, STRIDE):
            os.pwrite(fd, block, off)
    finally:
        os.close(fd)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw.name, base.name], cwd=work, check=True)
    raw.unlink()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top.name],
        cwd=work,
        check=True,
    )
    log(f"  fragmented disk: {size >> 30} GiB, {size // STRIDE} data runs")
    return top


def _cmds(case: str, flatfs: list[str], top: Path) -> dict[str, list[str]]:
    json_out = ["--output=json"] if case == "map-json" else []
    return {
        "flatfs": flatfs + ["map", *json_out, str(top)],
        "qemu": ["qemu-img", "map", *json_out, str(top)],
    }


def _mount_once(flatfs: list[str], top: Path, mp: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(flatfs + ["mount", str(top), str(mp)], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    subprocess.run(flatfs + ["umount", str(mp)], check=True, capture_output=True)
    return seconds


def run(top: Path, work: Path, pairs: int, flatfs: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    samples: dict[str, dict[str, list[dict[str, float]]]] = {c: {"flatfs": [], "qemu": []} for c in CASES}
    mounts: list[float] = []
    checks: dict[str, str] = {}
    mp = work / "frag-mnt"
    mp.mkdir(exist_ok=True)
    for pair in range(pairs + 1):
        tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
        for case in CASES:
            cmds = _cmds(case, flatfs, top)
            for tool in tools:
                r = run_child(cmds[tool], cwd=work)
                if pair:
                    samples[case][tool].append({"wall": r.wall, "rss_mib": r.maxrss_mib})
                log(f"    {case:9} {tool:6} wall {r.wall:7.3f} s  rss {r.maxrss_mib:6.1f} MiB")
        seconds = _mount_once(flatfs, top, mp)
        if pair:
            mounts.append(seconds)
        log(f"    mount     flatfs wall {seconds:7.3f} s")
    # the two JSON maps agree once projected to (start, length, data, zero): checked by the test
    # suite on every kind of image; here, the number of records
    f = subprocess.run(_cmds("map-json", flatfs, top)["flatfs"], capture_output=True, text=True).stdout
    q = subprocess.run(_cmds("map-json", flatfs, top)["qemu"], capture_output=True, text=True).stdout
    checks["fragmented map --output=json: records, flatfs vs qemu-img"] = (
        f"{f.count('start')} vs {q.count('start')}"
    )
    return {"samples": samples, "mount": mounts, "checks": checks, "figures": figures(samples, mounts)}


def figures(samples: dict[str, dict[str, list[dict[str, float]]]], mounts: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, by_tool in samples.items():
        row: dict[str, Any] = {}
        for key in ("wall", "rss_mib"):
            f = [r[key] for r in by_tool["flatfs"]]
            q = [r[key] for r in by_tool["qemu"]]
            row[f"flatfs_{key}"] = statistics.median(f) if f else None
            row[f"qemu_{key}"] = statistics.median(q) if q else None
            ratios = pair_ratios(f, q)
            row[f"{key}_ratio"] = statistics.median(ratios) if ratios else None
            row[f"{key}_ratio_range"] = (min(ratios), max(ratios)) if ratios else None
        out[case] = row
    out["mount"] = {
        "median": statistics.median(mounts) if mounts else None,
        "range": (min(mounts), max(mounts)) if mounts else None,
    }
    return out


def lines(res: dict[str, Any]) -> list[str]:
    out = ["", "Fragmented disk (map and mount; ratio flatfs/qemu-img: median of pairs, [min-max])"]
    for case in CASES:
        row = res["figures"][case]
        if row["wall_ratio"] is None:
            out.append(f"  {case:9}  —")
            continue
        lo, hi = row["wall_ratio_range"]
        out.append(
            f"  {case:9}  wall {row['flatfs_wall']:.3f} s vs {row['qemu_wall']:.3f} s = "
            f"{row['wall_ratio']:.2f}x [{lo:.2f}-{hi:.2f}]   peak RSS {row['flatfs_rss_mib']:.1f} MiB "
            f"vs {row['qemu_rss_mib']:.1f} MiB"
        )
    m = res["figures"]["mount"]
    if m["median"] is not None:
        out.append(
            f"  mount      flatfs live after {m['median']:.3f} s [{m['range'][0]:.3f}-{m['range'][1]:.3f}]"
        )
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
