"""The VHDX scenario of `make bench`: Hyper-V disks.

* ``vhdx-dynamic``: the seed base as a dynamic VHDX (``qemu-img convert -O
  vhdx -o subformat=dynamic``), converted to qcow2 by ``flatfs convert`` and
  by ``qemu-img convert -O qcow2`` in interleaved pairs after a warm-up pair
  (whose outputs ``qemu-img compare`` checks). Target: flatfs's wall <= 1.0x.
* ``vhdx-diff``: a differencing chain QEMU cannot read (it refuses
  differencing VHDX): a dynamic VHDX base (qemu-img, 1 MiB blocks, written
  with qemu-io) under a differencing child written by the tests' VHDX writer
  (full and partially present blocks). The same data at 2 TiB and at 64 GiB
  of virtual size; ``flatfs convert`` of each, interleaved, order
  alternating. The BAT of the 2 TiB pair holds 32x the entries; the cost
  should follow the data, not the size. Target: within 1.1x of each other.

Ratios are medians of the within-pair ratios, with their range (min–max).
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import Parent, VhdxImage
from timing import pair_ratios

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
SIZES = {"2T": 2 * TiB, "64G": 64 * GiB}


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def data_write_guid(path: Path) -> Any:
    """The current header's DataWriteGuid (the parent identity a child records)."""
    import uuid

    raw = path.read_bytes()[: 192 << 10]
    heads = [raw[at : at + 48] for at in (64 << 10, 128 << 10)]
    cur = max(heads, key=lambda h: int.from_bytes(h[8:16], "little"))
    return uuid.UUID(bytes_le=bytes(cur[32:48]))


def build(work: Path, base_qcow2: Path, quick: bool, log: Callable[[str], None]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    dyn = work / "dyn.vhdx"
    dyn.unlink(missing_ok=True)
    _run(["qemu-img", "convert", "-O", "vhdx", "-o", "subformat=dynamic", base_qcow2.name, dyn.name], work)
    out["vhdx-dynamic"] = dyn
    # the same guest data at both sizes, all of it below 64 GiB
    chunks = 8 if quick else 128  # 4 MiB each in the base: 32 MiB / 512 MiB
    writes = [f"write -P {0x40 + i % 64} {(i * 60 * GiB // chunks) // MiB * MiB} 4M" for i in range(chunks)]
    for tag, size in SIZES.items():
        base, top = work / f"diff-base-{tag}.vhdx", work / f"diff-top-{tag}.avhdx"
        for p in (base, top):
            p.unlink(missing_ok=True)
        _run(
            ["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M", base.name]
            + [str(size)],
            work,
        )
        args = ["qemu-io", "-f", "vhdx"]
        for w in writes:
            args += ["-c", w]
        _run(args + [base.name], work)
        child = VhdxImage(size, parent=Parent(data_write_guid(base), relative_path=base.name))
        for i in range(chunks // 4):
            at = (i * 60 * GiB // (chunks // 4)) // MiB * MiB
            child.write(at + MiB, bytes([0x90 + i % 32]) * (2 * MiB))  # two full blocks
            child.write(at + 64 * 512, bytes([0xB0 + i % 32]) * (16 * 512))  # partial, over base data
        child.save(top)
        child.blocks.clear()
        out[f"vhdx-diff-{tag}"] = top
        log(f"  {top.name}: {size / GiB:.0f} GiB virtual")
    return out


def run(
    sources: dict[str, Path],
    work: Path,
    pairs: int,
    convert_once: Callable[[str, Path, bool], dict[str, Any]],
    compare: Callable[[], str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Interleaved pairs; the first is a warm-up, its dynamic-VHDX outputs compared by qemu-img."""
    dyn: dict[str, list[dict[str, Any]]] = {"flatfs": [], "qemu": []}
    diff: dict[str, list[dict[str, Any]]] = {tag: [] for tag in SIZES}
    checks: dict[str, str] = {}
    for pair in range(pairs + 1):
        tools = ("flatfs", "qemu") if pair % 2 == 0 else ("qemu", "flatfs")
        for tool in tools:
            r = convert_once(tool, sources["vhdx-dynamic"], pair == 0)
            if pair:
                dyn[tool].append(r)
            log(f"    vhdx-dynamic  {tool:6} wall {r['wall']:7.3f} s  cpu {r['cpu']:7.3f} s")
        if not pair:
            checks["convert vhdx-dynamic: flatfs output vs qemu-img output"] = compare()
            for tool in tools:
                (work / f"out-{tool}.qcow2").unlink(missing_ok=True)
        tags = tuple(SIZES) if pair % 2 == 0 else tuple(SIZES)[::-1]
        for tag in tags:
            r = convert_once("flatfs", sources[f"vhdx-diff-{tag}"], False)
            if pair:
                diff[tag].append(r)
            log(f"    vhdx-diff-{tag:3} flatfs wall {r['wall']:7.3f} s  cpu {r['cpu']:7.3f} s")
    return {"samples": {"dynamic": dyn, "diff": diff}, "checks": checks, "figures": figures(dyn, diff)}


def _ratio(a: list[float], b: list[float]) -> dict[str, float | None]:
    r = pair_ratios(a, b)
    if not r:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def figures(
    dyn: dict[str, list[dict[str, Any]]], diff: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"dynamic": {}, "diff": {}}
    for key in ("wall", "cpu"):
        f = [r[key] for r in dyn["flatfs"]]
        q = [r[key] for r in dyn["qemu"]]
        out["dynamic"][key] = {
            "flatfs": statistics.median(f) if f else None,
            "qemu": statistics.median(q) if q else None,
            "ratio": _ratio(f, q),
        }
        big = [r[key] for r in diff["2T"]]
        small = [r[key] for r in diff["64G"]]
        out["diff"][key] = {
            "2T": statistics.median(big) if big else None,
            "64G": statistics.median(small) if small else None,
            "ratio": _ratio(big, small),
        }
    return out


def _fmt(r: dict[str, float | None]) -> str:
    if r["median"] is None or r["min"] is None or r["max"] is None:
        return "—"
    return f"{r['median']:.2f}x ({r['min']:.2f}–{r['max']:.2f})"


def lines(res: dict[str, Any]) -> list[str]:
    out = ["", "VHDX (convert to qcow2; ratios are medians of within-pair ratios, range in brackets)"]
    for key in ("wall", "cpu"):
        row = res["figures"]["dynamic"][key]
        if row["flatfs"] is None or row["qemu"] is None:
            out.append(f"  vhdx-dynamic  {key} —")
            continue
        med = row["ratio"]["median"]
        verdict = "" if key != "wall" or med is None else (" PASS" if med <= 1.0 else " MISS")
        out.append(
            f"  vhdx-dynamic  {key:4} flatfs {row['flatfs']:.3f} s vs qemu-img {row['qemu']:.3f} s"
            f" = {_fmt(row['ratio'])}{' target <= 1.0x' if key == 'wall' else ''}{verdict}"
        )
    for key in ("wall", "cpu"):
        row = res["figures"]["diff"][key]
        if row["2T"] is None or row["64G"] is None:
            out.append(f"  vhdx-diff     {key} —")
            continue
        r = row["ratio"]
        worst = None if r["median"] is None else max(r["median"], 1 / r["median"])
        verdict = "" if key != "wall" or worst is None else (" PASS" if worst <= 1.1 else " MISS")
        out.append(
            f"  vhdx-diff     {key:4} flatfs 2 TiB {row['2T']:.3f} s vs 64 GiB {row['64G']:.3f} s"
            f" = {_fmt(r)}{' target within 1.1x' if key == 'wall' else ''}{verdict}"
        )
    out += [f"  check: {k}: {v}" for k, v in res["checks"].items()]
    return out
