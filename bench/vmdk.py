"""The VMDK scenario of `make bench`: flatfs convert against qemu-img convert on VMware disks.

Two sources, built from the seed images: the seed shape as a monolithicSparse
base with a monolithicSparse delta (1 TiB) carrying the overlay writes, and
the compressed scenario's content as a streamOptimized disk. Each is
converted to qcow2 by both tools in interleaved pairs, as the qcow2 cases
are; wall and CPU are medians, ratio = flatfs / qemu-img.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import pair_ratios

CASES = ("vmdk-delta", "vmdk-stream")


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def build(
    work: Path, base_qcow2: Path, comp_qcow2: Path, overlay_size: int, writes: list[str]
) -> dict[str, Path]:
    """base.vmdk (monolithicSparse) + top-vmdk.vmdk (its delta), and stream.vmdk (streamOptimized)."""
    base, top, stream = work / "base.vmdk", work / "top-vmdk.vmdk", work / "stream.vmdk"
    for p in (base, top, stream):
        p.unlink(missing_ok=True)
    _run(
        ["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicSparse", base_qcow2.name, base.name],
        work,
    )
    # the delta is made after the base is complete: a later write would change the base's CID
    _run(
        ["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse"]
        + ["-b", base.name, "-F", "vmdk", top.name, str(overlay_size)],
        work,
    )
    args = ["qemu-io", "-f", "vmdk"]
    for w in writes:
        args += ["-c", w]
    _run(args + [top.name], work)
    _run(
        [
            "qemu-img",
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            comp_qcow2.name,
            stream.name,
        ],
        work,
    )
    return {"vmdk-delta": top, "vmdk-stream": stream}


def run(
    sources: dict[str, Path],
    work: Path,
    pairs: int,
    convert_once: Callable[[str, Path, bool], dict[str, Any]],
    compare: Callable[[], str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Interleaved pairs (the first a warm-up, whose outputs qemu-img compares)."""
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"flatfs": [], "qemu": []} for c in CASES}
    checks: dict[str, str] = {}
    for pair in range(pairs + 1):
        tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
        for case in CASES:
            for tool in tools:
                r = convert_once(tool, sources[case], pair == 0)  # keep the warm-up's outputs
                if pair:
                    samples[case][tool].append(r)
                log(f"    {case:11} {tool:6} wall {r['wall']:7.3f} s  cpu {r['cpu']:7.3f} s")
            if not pair:
                checks[f"convert {case}: flatfs output vs qemu-img output"] = compare()
                for tool in tools:
                    (work / f"out-{tool}.qcow2").unlink(missing_ok=True)
    return {"samples": samples, "checks": checks, "figures": figures(samples)}


def figures(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for case, by_tool in samples.items():
        row: dict[str, float | None] = {}
        for key in ("wall", "cpu"):
            f = [r[key] for r in by_tool["flatfs"]]
            q = [r[key] for r in by_tool["qemu"]]
            row[f"flatfs_{key}"] = statistics.median(f) if f else None
            row[f"qemu_{key}"] = statistics.median(q) if q else None
            ratios = pair_ratios(f, q)
            row[f"{key}_ratio"] = statistics.median(ratios) if ratios else None
        out[case] = row
    return out


def lines(res: dict[str, Any]) -> list[str]:
    out = ["", "VMDK (convert to qcow2; ratio flatfs/qemu-img, target <= 1.0x)"]
    for case, row in res["figures"].items():
        parts = []
        for key in ("wall", "cpu"):
            fv, qv, ratio = row[f"flatfs_{key}"], row[f"qemu_{key}"], row[f"{key}_ratio"]
            if fv is None or qv is None or ratio is None:
                parts.append(f"{key} —")
                continue
            verdict = "PASS" if ratio <= 1.0 else "MISS"
            parts.append(f"{key} {fv:.3f} s vs {qv:.3f} s = {ratio:.2f}x {verdict}")
        out.append(f"  {case:11}  " + "   ".join(parts))
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
