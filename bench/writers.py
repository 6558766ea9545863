"""The writers scenario of `make bench`: `flatfs convert -O FORMAT` against `qemu-img convert -O FORMAT`.

One source, the bench's 1 TiB overlay (2 GiB x scale of data), converted by
both tools into every format flatfs writes, with the options that make the
same kind of output (LIKE_FOR_LIKE, also in docs/bench.md and
flatfs-convert(1)). GCP's archive has no qemu-img equivalent: it is compared
with the two-step recipe people use (qemu-img convert -O raw, then
tar --format=oldgnu -Sczf). Interleaved pairs, cold cache as the other
scenarios; a run's time is durable wall time (its output fsynced after exit,
for both tools); ratio = flatfs / qemu-img within each pair, median and
min-max over the pairs; peak RSS is the largest of the run's processes.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from timing import Cache, fsync_path, pair_ratios, run_child

# case: (flatfs convert arguments, qemu-img convert arguments, output suffix)
LIKE_FOR_LIKE: dict[str, tuple[list[str], list[str], str]] = {
    "vpc": (["-O", "vpc"], ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"], "vhd"),
    "azure": (["--for", "azure"], ["-O", "vpc", "-o", "subformat=fixed,force_size=on"], "vhd"),
    "vhdx": (["-O", "vhdx"], ["-O", "vhdx", "-o", "subformat=dynamic,block_size=32M"], "vhdx"),
    "vdi": (["-O", "vdi"], ["-O", "vdi"], "vdi"),
    "vmdk": (["-O", "vmdk"], ["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk"),
    "stream": (["--for", "vsphere"], ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk"),
    "gcp": (["--for", "gcp"], [], "tar.gz"),  # qemu side: raw, then tar --sparse | gzip
}
# the targets: wall time ratio at most this, peak RSS at most RSS_LIMIT MiB
TARGETS = {"stream": 0.5}
DEFAULT_TARGET = 0.8
RSS_LIMIT = 80.0


def _once(tool: str, case: str, src: Path, work: Path, flatfs: list[str], cache: Cache) -> dict[str, float]:
    f_args, q_args, suffix = LIKE_FOR_LIKE[case]
    dst = work / f"out-{tool}.{suffix}"
    dst.unlink(missing_ok=True)
    cache.reset()
    if tool == "flatfs":
        runs = [run_child(flatfs + ["convert", *f_args, src.name, dst.name], cwd=work)]
    elif case == "gcp":
        raw = work / "disk.raw"
        raw.unlink(missing_ok=True)
        runs = [run_child(["qemu-img", "convert", "-O", "raw", src.name, raw.name], cwd=work)]
        runs.append(run_child(["tar", "--format=oldgnu", "-Sczf", dst.name, raw.name], cwd=work))
        raw.unlink()
    else:
        runs = [run_child(["qemu-img", "convert", *q_args, src.name, dst.name], cwd=work)]
    flush = fsync_path(dst)
    st = dst.stat()
    dst.unlink()
    wall = sum(r.wall for r in runs)
    return {
        "wall": wall,
        "durable": wall + flush,
        "cpu": sum(r.cpu for r in runs),
        "rss_mib": max(r.maxrss_mib for r in runs),
        "file_size": st.st_size,
        "allocated": st.st_blocks * 512,
    }


def check(case: str, src: Path, work: Path, flatfs: list[str]) -> str:
    """The warm-up's flatfs output compared by qemu-img with the source ('identical' or why not)."""
    f_args, _q, suffix = LIKE_FOR_LIKE[case]
    dst = work / f"check.{suffix}"
    dst.unlink(missing_ok=True)
    subprocess.run(
        flatfs + ["convert", *f_args, src.name, dst.name], cwd=work, check=True, capture_output=True
    )
    try:
        if suffix == "vhdx":  # QEMU's vhdx driver reports no block status: it would read the whole TiB
            return "not compared (the suite compares VHDX outputs)"
        if case == "gcp":
            listed = subprocess.run(["tar", "-tzf", dst.name], cwd=work, capture_output=True, text=True)
            return "listed by tar" if listed.stdout.strip() == "disk.raw" else f"DIFFERENT: {listed.stdout!r}"
        fmt = {"vhd": "vpc"}.get(suffix, suffix)
        r = subprocess.run(
            ["qemu-img", "compare", "-F", fmt, src.name, dst.name], cwd=work, capture_output=True, text=True
        )
        if r.returncode == 0:
            return "identical"
        return "DIFFERENT: " + (r.stdout + r.stderr).strip().splitlines()[-1]
    finally:
        dst.unlink(missing_ok=True)


def run(
    src: Path,
    work: Path,
    pairs: int,
    flatfs: list[str],
    cache: Cache,
    log: Callable[[str], None],
    cases: list[str] | None = None,
) -> dict[str, Any]:
    chosen = cases or list(LIKE_FOR_LIKE)
    unknown = set(chosen) - set(LIKE_FOR_LIKE)
    if unknown:
        raise SystemExit(f"--writers: no case {sorted(unknown)} (cases: {', '.join(LIKE_FOR_LIKE)})")
    samples: dict[str, dict[str, list[dict[str, float]]]] = {c: {"flatfs": [], "qemu": []} for c in chosen}
    checks: dict[str, str] = {}
    for case in chosen:
        checks[f"writers {case}: flatfs output vs the source"] = check(case, src, work, flatfs)
    for pair in range(pairs + 1):
        tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
        for case in chosen:
            for tool in tools:
                r = _once(tool, case, src, work, flatfs, cache)
                if pair:
                    samples[case][tool].append(r)
                log(
                    f"    {case:7} {tool:6} durable {r['durable']:7.3f} s  cpu {r['cpu']:7.3f} s  "
                    f"rss {r['rss_mib']:6.1f} MiB  size {r['file_size'] / 2**20:9.1f} MiB"
                )
    return {"samples": samples, "checks": checks, "figures": figures(samples)}


def figures(samples: dict[str, dict[str, list[dict[str, float]]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for case, by_tool in samples.items():
        f = [r["durable"] for r in by_tool["flatfs"]]
        q = [r["durable"] for r in by_tool["qemu"]]
        ratios = pair_ratios(f, q)
        out[case] = {
            "flatfs_durable": statistics.median(f) if f else None,
            "qemu_durable": statistics.median(q) if q else None,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "flatfs_rss_mib": max((r["rss_mib"] for r in by_tool["flatfs"]), default=None),
            "qemu_rss_mib": max((r["rss_mib"] for r in by_tool["qemu"]), default=None),
            "flatfs_size": statistics.median([r["file_size"] for r in by_tool["flatfs"]]) if f else None,
            "qemu_size": statistics.median([r["file_size"] for r in by_tool["qemu"]]) if q else None,
        }
    return out


def lines(res: dict[str, Any]) -> list[str]:
    out = ["", "Writers (durable wall time; ratio flatfs/qemu-img, median [min-max] of the pairs)"]
    for case, row in res["figures"].items():
        ratio, fr = row["ratio"], row["flatfs_rss_mib"]
        if ratio is None or fr is None:
            out.append(f"  {case:7}  —")
            continue
        target = TARGETS.get(case, DEFAULT_TARGET)
        verdict = "PASS" if ratio <= target and fr <= RSS_LIMIT else "MISS"
        out.append(
            f"  {case:7}  {row['flatfs_durable']:.3f} s vs {row['qemu_durable']:.3f} s = {ratio:.2f}x "
            f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] (target <= {target}x)  "
            f"rss {fr:.0f} vs {row['qemu_rss_mib']:.0f} MiB  "
            f"size {row['flatfs_size'] / 2**20:.1f} vs {row['qemu_size'] / 2**20:.1f} MiB  {verdict}"
        )
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
