#!/usr/bin/env python3
"""flatfs against QEMU, side by side: convert, compressed convert, and the mounted view.

    python bench/run.py [--scale N] [--quick] [--pairs N] [--out DIR] [--keep] [--reuse]
                        [--only convert|vmdk|vhdx|views|fragmented|tmpfs|reflink] [--warm] [--seek-budget S]

Builds its images with qemu-img/qemu-io under OUT/work (OUT defaults to
/var/tmp/flatfs-bench), runs flatfs and QEMU alternately (one warm-up pair,
then N interleaved A/B pairs whose order alternates), and prints a table of
medians with the ratio flatfs/QEMU for each figure and PASS/MISS for each
target of issue 5. Writes OUT/bench.json (every sample) and OUT/bench.md.

Before every timed run: ``sync`` and, as root, ``echo 3 > drop_caches``
(cold cache, the same for both tools); without root every run is warm-cache
and the output says so. The daemons' own in-process caches stay warm after
the warm-up, for both; the view file's own page cache (flatfs keeps it
across opens, qsd does not) is evicted before every read, so every read is
a request to the daemon. The spread (min–max) over the pairs and how busy
the rest of the machine was (/proc/stat) are reported next to the medians.

Convert figures come from bench/launch.py, which runs each command as its
own child: wall, user+sys CPU and peak RSS belong to the command alone.
"Wall to durable" adds an fsync of the output after the process exits, since
qemu-img convert writes with cache=unsafe and flatfs fsyncs before exiting.
QEMU's SEEK_DATA/SEEK_HOLE walk of the 64 TiB view is capped by a time
budget (--seek-budget); the output says when the cap cut it short.

Nothing is left behind: every mount is unmounted in ``finally`` (SIGTERM,
then ``fusermount3 -u``, then ``-u -z``) and OUT/work is removed unless
``--keep``. The run refuses to start without about 3x the data size free.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fragmented  # noqa: E402
import images  # noqa: E402
import reflink  # noqa: E402
import tmpfs  # noqa: E402
import vhdx  # noqa: E402
import vmdk  # noqa: E402
import writers  # noqa: E402
from report import Figure, spread_markdown, table_markdown, table_text  # noqa: E402
from timing import Cache, busy_seconds, fsync_path, pair_ratios, proc_cpu, run_child, summary  # noqa: E402
from views import FlatfsView, QsdView, View, flatfs_cmd, read_sequential, seek_once, seek_walk  # noqa: E402

GiB = images.GiB
MiB = images.MiB
TOOLS = ("flatfs", "qemu")
MOUNT_PAIRS = 7  # cold mounts per tool for the time to readable
FIGURE_KEYS = (
    "convert_wall",
    "convert_wall_exit",
    "convert_cpu",
    "convert_rss",
    "convert64_wall",
    "size_ratio_64_1",
    "comp_wall",
    "comp_cpu",
    "comp_size",
    "read_throughput",
    "read_cpu",
    "seek_walk",
    "seek_typical",
    "seek_tail",
    "map_1t",
    "mount_time",
)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- environment -----------------------------------------------------------------


def check_tools() -> list[str]:
    missing = [
        t for t in ("qemu-img", "qemu-io", "qemu-storage-daemon", "fusermount3") if shutil.which(t) is None
    ]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=HERE).stdout.strip()
        except OSError:
            return ""

    qemu = out(["qemu-img", "--version"]).splitlines()
    flat = out(flatfs_cmd() + ["--version"])
    commit = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "status", "--porcelain", "--untracked-files=no", "--", "flatfs"])
    return {
        "qemu": qemu[0] if qemu else "",
        "flatfs": flat,
        "flatfs_commit": commit + ("+dirty" if dirty else ""),
    }


# -- convert ---------------------------------------------------------------------------


def convert_cmd(tool: str, src: Path, dst: Path, compress: bool) -> list[str]:
    if tool == "flatfs":
        return flatfs_cmd() + ["convert"] + (["-c"] if compress else []) + [src.name, dst.name]
    return ["qemu-img", "convert"] + (["-c"] if compress else []) + ["-O", "qcow2", src.name, dst.name]


def convert_once(
    tool: str, src: Path, work: Path, compress: bool, cache: Cache, keep_output: bool = False
) -> dict:
    dst = work / f"out-{tool}.qcow2"
    dst.unlink(missing_ok=True)
    cache.reset()
    b0 = busy_seconds()
    r = run_child(convert_cmd(tool, src, dst, compress), cwd=work)
    # qemu-img convert writes with cache=unsafe (no flush at the end); flatfs
    # fsyncs before its rename. "durable" adds an fsync after exit, for both.
    flush = fsync_path(dst)
    other = max(0.0, busy_seconds() - b0 - r.cpu)
    st = dst.stat()
    if not keep_output:
        dst.unlink()
    return {
        "wall": r.wall,
        "durable": r.wall + flush,
        "flush": flush,
        "cpu": r.cpu,
        "user": r.user,
        "sys": r.sys,
        "rss_mib": r.maxrss_mib,
        "file_size": st.st_size,
        "allocated": st.st_blocks * 512,
        "other_cpu": other,
    }


def compare_outputs(work: Path) -> str:
    """qemu-img compare of the two tools' outputs: 'identical' or the first difference."""
    r = subprocess.run(
        ["qemu-img", "compare", "-q", "out-flatfs.qcow2", "out-qemu.qcow2"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    if r.returncode == 0:
        return "identical"
    r2 = subprocess.run(
        ["qemu-img", "compare", "out-flatfs.qcow2", "out-qemu.qcow2"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    return "DIFFERENT: " + (r2.stdout + r2.stderr).strip().splitlines()[-1]


def order(pair: int) -> tuple[str, str]:
    return TOOLS if pair % 2 == 0 else TOOLS[::-1]


CASES = ("seed-1t", "seed-64t", "compressed")
VIEW_KINDS = ("read", "seek", "map", "mount")


def empty_samples() -> dict:
    return {c: {t: [] for t in TOOLS} for c in CASES}


def empty_view_samples() -> dict:
    return {k: {t: [] for t in TOOLS} for k in VIEW_KINDS}


def run_converts(imgs: images.Images, work: Path, cache: Cache, pairs: int) -> tuple[dict, dict]:
    cases = {
        "seed-1t": (imgs.top_small, False),
        "seed-64t": (imgs.top_big, False),
        "compressed": (imgs.comp, True),
    }
    samples = empty_samples()
    checks: dict = {}
    for pair in range(pairs + 1):
        warm = pair == 0
        log(f"  convert pair {pair}/{pairs}" + (" (warm-up)" if warm else ""))
        for case, (src, comp) in cases.items():
            for tool in order(pair):
                r = convert_once(tool, src, work, comp, cache, keep_output=warm)
                if not warm:
                    samples[case][tool].append(r)
                log(
                    f"    {case:10} {tool:6} wall {r['wall']:7.3f} s  durable {r['durable']:7.3f} s  "
                    f"cpu {r['cpu']:7.3f} s  rss {r['rss_mib']:6.1f} MiB  "
                    f"(others' cpu {r['other_cpu']:.1f} s)"
                )
            if warm:
                checks[f"convert {case}: flatfs output vs qemu-img output"] = compare_outputs(work)
                for t in TOOLS:
                    (work / f"out-{t}.qcow2").unlink(missing_ok=True)
    return samples, checks


# -- views ----------------------------------------------------------------------------


def run_views(
    imgs: images.Images,
    work: Path,
    cache: Cache,
    pairs: int,
    layout: images.Layout,
    seek_budget: float,
    map_timeout: float,
) -> tuple[dict, dict]:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    views: dict[tuple[str, str], View] = {}
    samples = empty_view_samples()
    checks: dict = {}
    classes = {"flatfs": FlatfsView, "qemu": QsdView}
    try:
        # Time to readable: cold cache every time, interleaved pairs (one mount is too noisy)
        for pair in range(max(pairs, MOUNT_PAIRS) if pairs > 1 else 1):  # --quick: one
            for tool in order(pair):
                cache.reset()
                v = classes[tool](imgs.top_small, work / f"view-{tool}-t.raw", logs / f"{tool}-t.log")
                v.start()
                samples["mount"][tool].append(
                    {"view": "1t", "seconds": v.mount_seconds, "options": v.options}
                )
                v.stop()
            log(
                f"  mount until readable: flatfs {samples['mount']['flatfs'][-1]['seconds']:.3f} s, "
                f"qemu-storage-daemon {samples['mount']['qemu'][-1]['seconds']:.3f} s"
            )
        for tool, cls in classes.items():
            for size, img in (("1t", imgs.top_small), ("64t", imgs.top_big)):
                cache.reset()
                v = cls(img, work / f"view-{tool}-{size}.raw", logs / f"{tool}-{size}.log")
                views[(tool, size)] = v
                v.start()
                log(f"  mounted {tool} {size} view in {v.mount_seconds:.3f} s ({v.options})")

        # Warm-up: checksums, map outputs, a full flatfs walk, a capped QEMU walk.
        crcs, maps = {}, {}
        for tool in TOOLS:
            v = views[(tool, "1t")]
            _, n, crcs[tool] = read_sequential(v.mountpoint, layout.read_bytes, checksum=True)
            out = work / f"map-{tool}.txt"
            with open(out, "wb") as f:
                run_child(
                    ["qemu-img", "map", "-f", "raw", v.mountpoint.name],
                    cwd=work,
                    stdout=f,
                    timeout=map_timeout,
                )
            maps[tool] = out.read_text().replace(v.mountpoint.name, "VIEW")
        checks["view read: crc32 of the bytes read"] = (
            "identical" if crcs["flatfs"] == crcs["qemu"] else f"DIFFERENT: {crcs}"
        )
        checks["qemu-img map -f raw of the 1 TiB views"] = (
            "identical" if maps["flatfs"] == maps["qemu"] else "DIFFERENT"
        )
        ref = seek_walk(views[("flatfs", "64t")].mountpoint, budget=600)
        qwarm = seek_walk(views[("qemu", "64t")].mountpoint, budget=seek_budget)
        ext_f, ext_q = ref["extents"], qwarm["extents"]
        same = ext_q == ext_f[: len(ext_q)]
        checks["SEEK_DATA/SEEK_HOLE walk of the 64 TiB views"] = (
            ("identical" if qwarm["complete"] else f"identical over the {len(ext_q)} extents QEMU reached")
            if same
            else "DIFFERENT"
        )
        tail = ref["calls"][-1][1] if ref["complete"] and ref["calls"][-1][0] == os.SEEK_DATA else None
        log(
            f"  64 TiB view: {len(ext_f)} data extents, {len(ref['calls'])} lseek calls "
            f"(flatfs walk {ref['seconds']:.2f} s; QEMU reached {len(qwarm['calls'])} calls in "
            f"{qwarm['seconds']:.2f} s{'' if qwarm['complete'] else ', capped'})"
        )

        for pair in range(pairs):
            log(f"  view pair {pair + 1}/{pairs}")
            for tool in order(pair):
                v1, v64 = views[(tool, "1t")], views[(tool, "64t")]
                # sequential read, 1 MiB reads
                cache.reset()
                c0, b0, p0 = proc_cpu(v1.pid), busy_seconds(), time.process_time()
                secs, n, _ = read_sequential(v1.mountpoint, layout.read_bytes)
                cpu = proc_cpu(v1.pid) - c0
                other = max(0.0, busy_seconds() - b0 - cpu - (time.process_time() - p0))
                samples["read"][tool].append(
                    {
                        "seconds": secs,
                        "bytes": n,
                        "mibps": n / MiB / secs,
                        "daemon_cpu": cpu,
                        "other_cpu": other,
                    }
                )
                # SEEK walk of the 64 TiB view, then the tail call alone
                cache.reset()
                w = seek_walk(v64.mountpoint, budget=600 if tool == "flatfs" else seek_budget)
                tail_s = None
                if tail is not None:
                    tail_s, res = seek_once(v64.mountpoint, tail, os.SEEK_DATA)
                    if res is not None:
                        checks[f"{tool}: SEEK_DATA past the last data"] = f"DIFFERENT: returned {res}"
                samples["seek"][tool].append(
                    {
                        "calls": len(w["calls"]),
                        "complete": w["complete"],
                        "seconds": w["seconds"],
                        "per_call": [round(c[2], 7) for c in w["calls"]],
                        "tail": tail_s,
                    }
                )
                # qemu-img map -f raw of the 1 TiB view
                cache.reset()
                with open(os.devnull, "wb") as null:
                    r = run_child(
                        ["qemu-img", "map", "-f", "raw", v1.mountpoint.name],
                        cwd=work,
                        stdout=null,
                        timeout=map_timeout,
                    )
                samples["map"][tool].append({"seconds": r.wall})
                s = samples["seek"][tool][-1]
                log(
                    f"    {tool:6} read {n / MiB / secs:7.0f} MiB/s (daemon cpu {cpu:.2f} s)  "
                    f"seek {s['seconds'] / max(1, s['calls']) * 1e3:8.3f} ms/call over {s['calls']} calls"
                    f"{'' if s['complete'] else ' (capped)'}  "
                    f"tail {0 if tail_s is None else tail_s * 1e3:.1f} ms"
                    f"  map {r.wall:.3f} s"
                )
    finally:
        for v in views.values():
            try:
                v.stop()
            except Exception as exc:  # keep stopping the others
                log(f"  warning: stopping {v.tool} at {v.mountpoint}: {exc}")
    return samples, checks


# -- figures --------------------------------------------------------------------------


def med(runs: list[dict], key: str) -> float | None:
    return summary([r[key] for r in runs])["median"] if runs else None


def rng(xs: list[float | None]) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else None


def paired(f: list[float | None], q: list[float | None]) -> float | None:
    """Median over the pairs of flatfs/QEMU within each pair (both ran back to back)."""
    rs = pair_ratios(f, q)
    return statistics.median(rs) if rs else None


def with_ranges(figs: list[Figure], conv: dict, view: dict, layout: images.Layout) -> None:
    """Attach min–max and the median of the within-pair ratios to the figures that are medians."""
    c = {
        "convert_wall": ("seed-1t", "durable"),
        "convert_wall_exit": ("seed-1t", "wall"),
        "convert_cpu": ("seed-1t", "cpu"),
        "convert_rss": ("seed-1t", "rss_mib"),
        "convert64_wall": ("seed-64t", "durable"),
        "comp_wall": ("compressed", "durable"),
        "comp_cpu": ("compressed", "cpu"),
    }
    v = {
        "read_throughput": ("read", "mibps"),
        "map_1t": ("map", "seconds"),
        "mount_time": ("mount", "seconds"),
    }
    for f in figs:
        if f.key in c:
            case, key = c[f.key]
            xs, ys = [r[key] for r in conv[case]["flatfs"]], [r[key] for r in conv[case]["qemu"]]
        elif f.key in v:
            kind, key = v[f.key]
            xs, ys = [r[key] for r in view[kind]["flatfs"]], [r[key] for r in view[kind]["qemu"]]
        else:
            continue
        f.flatfs_range, f.qemu_range, f.pair_ratio = rng(xs), rng(ys), paired(xs, ys)


def noise(conv: dict, cores: int) -> str | None:
    """How busy the rest of the machine was during the convert runs."""
    runs = [r for case in conv.values() for t in TOOLS for r in case[t] if "other_cpu" in r]
    if not runs:
        return None
    share = [r["other_cpu"] / max(r["wall"], 1e-9) / cores for r in runs]
    return (
        f"other processes kept a median {statistics.median(share):.0%} (max {max(share):.0%}) of the "
        f"machine's {cores} cores busy during the convert runs (from /proc/stat)"
    )


def div(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def figures(conv: dict, view: dict, layout: images.Layout) -> list[Figure]:
    s1, s64, sc = conv["seed-1t"], conv["seed-64t"], conv["compressed"]
    figs = [
        Figure(
            "convert_wall",
            "convert, 1 TiB seed: wall to durable (s)",
            "s",
            med(s1["flatfs"], "durable"),
            med(s1["qemu"], "durable"),
            target=("ratio<=", 1.0),
            note="process wall + an fsync of the output after exit (qemu-img convert does not flush)",
        ),
        Figure(
            "convert_wall_exit",
            "convert, 1 TiB seed: wall to exit (s)",
            "s",
            med(s1["flatfs"], "wall"),
            med(s1["qemu"], "wall"),
            note="as a user sees it: flatfs fsyncs before exit, qemu-img leaves dirty pages",
        ),
        Figure(
            "convert_cpu",
            "convert, 1 TiB seed: CPU user+sys (s)",
            "s",
            med(s1["flatfs"], "cpu"),
            med(s1["qemu"], "cpu"),
            target=("ratio<=", 1.2),
        ),
        Figure(
            "convert_rss",
            "convert, 1 TiB seed: peak RSS (MiB)",
            "MiB",
            med(s1["flatfs"], "rss_mib"),
            med(s1["qemu"], "rss_mib"),
            target=("flatfs<=", 80.0),
        ),
        Figure(
            "convert64_wall",
            "convert, 64 TiB seed: wall to durable (s)",
            "s",
            med(s64["flatfs"], "durable"),
            med(s64["qemu"], "durable"),
        ),
    ]
    ratios = {}
    for t in TOOLS:
        a, b = med(s64[t], "durable"), med(s1[t], "durable")
        ratios[t] = a / b if a and b else None
    figs.append(
        Figure(
            "size_ratio_64_1",
            "convert wall, 64 TiB / 1 TiB",
            "x",
            ratios["flatfs"],
            ratios["qemu"],
            target=("flatfs<=", 1.10),
        )
    )
    figs += [
        Figure(
            "comp_wall",
            "compressed convert (-c): wall to durable (s)",
            "s",
            med(sc["flatfs"], "durable"),
            med(sc["qemu"], "durable"),
            target=("ratio<=", 1.0),
        ),
        Figure(
            "comp_cpu",
            "compressed convert (-c): CPU user+sys (s)",
            "s",
            med(sc["flatfs"], "cpu"),
            med(sc["qemu"], "cpu"),
        ),
        Figure(
            "comp_size",
            "compressed convert (-c): output size (MiB)",
            "MiB",
            div(med(sc["flatfs"], "file_size"), MiB),
            div(med(sc["qemu"], "file_size"), MiB),
        ),
    ]
    rd = view["read"]
    rf = [r["bytes"] / MiB / r["seconds"] for r in rd["flatfs"]]
    rq = [r["bytes"] / MiB / r["seconds"] for r in rd["qemu"]]
    gib = layout.read_bytes / GiB
    figs += [
        Figure(
            "read_throughput",
            f"view: sequential read, 1 MiB reads, {layout.read_bytes / MiB:.0f} MiB (MiB/s)",
            "MiB/s",
            summary(rf)["median"],
            summary(rq)["median"],
            target=("ratio>=", 1.0),
        ),
        Figure(
            "read_cpu",
            "view: daemon CPU per GiB read (s/GiB)",
            "s/GiB",
            div(med(rd["flatfs"], "daemon_cpu"), gib),
            div(med(rd["qemu"], "daemon_cpu"), gib),
        ),
    ]
    sk = view["seek"]

    # A typical call: the median call among the first k calls of both walks, k = the
    # calls QEMU made within its budget, leaving out the last call of a complete walk
    # (SEEK_DATA over the empty tail, which has its own row).
    def body(s: dict) -> list[float]:
        return s["per_call"][:-1] if s["complete"] else s["per_call"]

    k = min(len(body(s)) for s in sk["qemu"] + sk["flatfs"]) if sk["qemu"] and sk["flatfs"] else 0
    pf = [statistics.median(body(s)[:k]) * 1e3 for s in sk["flatfs"]] if k else []
    pq = [statistics.median(body(s)[:k]) * 1e3 for s in sk["qemu"]] if k else []
    q_complete = all(s["complete"] for s in sk["qemu"])
    total_calls = sk["flatfs"][0]["calls"] if sk["flatfs"] else 0
    wf = [s["seconds"] / s["calls"] * 1e3 for s in sk["flatfs"] if s["calls"]]
    wq = [s["seconds"] / s["calls"] * 1e3 for s in sk["qemu"] if s["calls"] and s["complete"]]
    figs += [
        Figure(
            "seek_walk",
            f"view: SEEK_DATA/SEEK_HOLE walk of 64 TiB, whole ({total_calls} calls), ms/call",
            "ms",
            summary(wf)["median"],
            summary(wq)["median"] if q_complete else None,
            qemu_note="" if q_complete else "capped, not timed",
            target=("flatfs<=", 5.0),
        ),
        Figure(
            "seek_typical",
            f"view: same walk, median call of the first {k} (ms)",
            "ms",
            summary(pf)["median"],
            summary(pq)["median"],
            note="per-request cost: the same calls on both views, the empty-tail call left out",
        ),
        Figure(
            "seek_tail",
            "view: one SEEK_DATA over the empty tail of 64 TiB (ms)",
            "ms",
            summary([s["tail"] * 1e3 for s in sk["flatfs"] if s["tail"] is not None])["median"],
            summary([s["tail"] * 1e3 for s in sk["qemu"] if s["tail"] is not None])["median"],
        ),
        Figure(
            "map_1t",
            "view: qemu-img map -f raw of 1 TiB (s)",
            "s",
            med(view["map"]["flatfs"], "seconds"),
            med(view["map"]["qemu"], "seconds"),
            target=("ratio<=", 1.0),
        ),
        Figure(
            "mount_time",
            "view: time to mount until readable (s)",
            "s",
            med(view["mount"]["flatfs"], "seconds"),
            med(view["mount"]["qemu"], "seconds"),
            target=("flatfs<=", 0.10),
        ),
    ]
    return figs


# -- output --------------------------------------------------------------------------------


def markdown(res: dict, figs: list[Figure]) -> str:
    m, lay = res["machine"], res["layout"]
    lines = [
        f"Run of {res['date']} on {m['cores']} cores ({m['cpu'] or 'unknown CPU'}, {m['mem_gib']} GiB RAM, "
        f"Linux {m['kernel']}), {res['versions']['qemu']}, flatfs {res['versions']['flatfs_commit']}, "
        f"Python {m['python']}. Scale {res['scale']}{' (quick)' if res['quick'] else ''}: "
        f"{lay['data'] / GiB:.2f} GiB of data in a {lay['base_size'] / GiB:.2f} GiB base, "
        f"{lay['comp_data'] / MiB:.0f} MiB for the compressed scenario. "
        f"Medians of {res['pairs']} interleaved pairs after a warm-up, **{res['cache']} cache** "
        f"for both tools. Load average {res['load_start'][0]:.2f} at the start, "
        f"{res['load_end'][0]:.2f} at the end (anything else running shows up as noise).",
        "",
        table_markdown(figs),
        "",
        "Spread over the pairs:",
        "",
        spread_markdown(figs),
        "",
    ]
    notes = [f"- {f.label}: {f.note}" for f in figs if f.note]
    if res.get("seek_budget_note"):
        notes.append(f"- {res['seek_budget_note']}")
    if res.get("noise"):
        notes.append(f"- {res['noise']}")
    for k, v in res["checks"].items():
        notes.append(f"- check, {k}: {v}")
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply the data sizes (10 for 20 GiB of data); default 1"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny images (64 MiB of data) and one pair: a smoke test, not a measurement",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="timed A/B pairs after the warm-up (default 5; 1 with --quick)",
    )
    ap.add_argument(
        "--out",
        default="/var/tmp/flatfs-bench",
        help="results (bench.json, bench.md) go here, images under OUT/work",
    )
    ap.add_argument("--keep", action="store_true", help="keep OUT/work (the images) afterwards")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the images a --keep run left in OUT/work (same scale), do not rebuild",
    )
    ap.add_argument(
        "--only",
        choices=("convert", "vmdk", "vhdx", "views", "fragmented", "tmpfs", "reflink", "writers"),
        default=None,
        help="run one phase only (the other's figures show as —)",
    )
    ap.add_argument("--warm", action="store_true", help="do not drop caches (warm cache for both)")
    ap.add_argument(
        "--writers",
        default=None,
        help="writer cases to run, comma-separated (default: all: " + ",".join(writers.LIKE_FOR_LIKE) + ")",
    )
    ap.add_argument(
        "--frag-pairs",
        type=int,
        default=None,
        help="pairs for the fragmented-disk scenario (default 11; 1 with --quick)",
    )
    ap.add_argument(
        "--tmpfs", default="/dev/shm", help="memory-backed folder of the tmpfs scenario (default /dev/shm)"
    )
    ap.add_argument(
        "--tmpfs-pairs",
        type=int,
        default=None,
        help="pairs for the tmpfs and reflink scenarios (default 11; 1 with --quick)",
    )
    ap.add_argument(
        "--seek-budget",
        type=float,
        default=None,
        help="seconds of QEMU's SEEK walk per run (default 15; 2 with --quick)",
    )
    ap.add_argument(
        "--map-timeout", type=float, default=600.0, help="give up on one qemu-img map after this many seconds"
    )
    args = ap.parse_args(argv)

    missing = check_tools()
    if missing:
        print(f"bench: missing {', '.join(missing)} (make deps-test installs them)", file=sys.stderr)
        return 2
    layout = images.Layout.make(args.scale, args.quick)
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 5)
    if pairs < 1:
        print("bench: --pairs must be at least 1", file=sys.stderr)
        return 2
    seek_budget = args.seek_budget if args.seek_budget is not None else (2.0 if args.quick else 15.0)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    stamp = work / "layout.json"
    want = json.dumps({k: v for k, v in vars(layout).items() if isinstance(v, int)}, sort_keys=True)
    reuse = args.reuse and stamp.exists() and stamp.read_text() == want
    if args.reuse and not reuse:
        print("bench: nothing to reuse (no --keep run of this scale in OUT/work); building", file=sys.stderr)
    if work.exists() and not reuse:
        shutil.rmtree(work)
    free = shutil.disk_usage(out).free
    need = layout.disk_needed() if not reuse else 2 * layout.data + (512 << 20)
    if free < need:
        print(
            f"bench: {out} has {free / GiB:.1f} GiB free; this run needs about {need / GiB:.1f} GiB "
            f"(3x the data). Use --out on a bigger file system or a smaller --scale.",
            file=sys.stderr,
        )
        return 2

    r = subprocess.run(flatfs_cmd() + ["--version"], capture_output=True, text=True)
    if r.returncode != 0:
        print(
            f"bench: cannot run {' '.join(flatfs_cmd())}: run it with the venv's python "
            f"(.venv/bin/python bench/run.py, or make bench)",
            file=sys.stderr,
        )
        return 2
    # flatfs runs with its bytecode cached, as an installed package does, even
    # where PYTHONDONTWRITEBYTECODE is set; the cache lives in the scratch folder.
    work.mkdir(parents=True, exist_ok=True)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    cache = Cache(
        not args.warm,
        warm_cmds=[
            [
                sys.executable,
                "-c",
                "import flatfs.cli, flatfs.convert, "
                "flatfs.chain, flatfs.formats.qcow2, flatfs.fuse.mount, "
                "concurrent.futures, zlib",
            ],
            flatfs_cmd() + ["convert", "--help"],
            ["qemu-img", "--version"],
            ["qemu-img", "convert", "--help"],
        ],
    )
    res: dict = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "cache": cache.mode,
        "scale": args.scale,
        "quick": args.quick,
        "pairs": pairs,
        "seek_budget": seek_budget,
        "layout": {k: v for k, v in vars(layout).items() if isinstance(v, int)},
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }
    log(
        f"flatfs bench: {res['machine']['cores']} cores, {cache.mode} cache, scale {args.scale}"
        f"{' (quick)' if args.quick else ''}, {pairs} pairs; images in {work}"
    )
    t0 = time.monotonic()
    try:
        tb = time.monotonic()
        if reuse:
            log("reusing images")
            imgs = images.existing(work)
        else:
            log("building images")
            imgs = images.build(work, layout, log=log)
            stamp.write_text(want)
        res["images"] = {
            "base_data_bytes": imgs.data_bytes,
            "base_extents_written": imgs.base_extents,
            "build_seconds": round(time.monotonic() - tb, 1),
        }
        log(
            f"  done in {res['images']['build_seconds']} s "
            f"({imgs.data_bytes / GiB:.2f} GiB allocated in the base)"
        )
        conv, view, checks = empty_samples(), empty_view_samples(), {}
        if args.only in (None, "convert"):
            log("convert (flatfs convert vs qemu-img convert -O qcow2)")
            conv, checks = run_converts(imgs, work, cache, pairs)
        if args.only in (None, "convert", "vmdk"):
            log("vmdk (flatfs convert vs qemu-img convert -O qcow2, VMware sources)")
            srcs = vmdk.build(work, imgs.base, imgs.comp, layout.overlay_small, layout.overlay_writes())
            res["vmdk"] = vmdk.run(
                srcs,
                work,
                pairs,
                lambda t, src, keep: convert_once(t, src, work, False, cache, keep),
                lambda: compare_outputs(work),
                log,
            )
        if args.only in (None, "vhdx"):
            log(
                "vhdx (flatfs convert vs qemu-img convert -O qcow2; a differencing chain at 2 TiB and 64 GiB)"
            )
            srcs = vhdx.build(work, imgs.base, args.quick, log)
            res["vhdx"] = vhdx.run(
                srcs,
                work,
                pairs,
                lambda t, src, keep: convert_once(t, src, work, False, cache, keep),
                lambda: compare_outputs(work),
                log,
            )
        if args.only in (None, "writers"):
            log("writers (flatfs convert -O FORMAT vs qemu-img convert -O FORMAT, like-for-like options)")
            cases = args.writers.split(",") if args.writers else None
            res["writers"] = writers.run(imgs.top_small, work, pairs, flatfs_cmd(), cache, log, cases)
        mem_pairs = args.tmpfs_pairs if args.tmpfs_pairs is not None else (1 if args.quick else 11)
        if args.only in (None, "tmpfs"):
            log("tmpfs (flatfs convert vs qemu-img convert -O qcow2, images and target in memory)")
            res["tmpfs"] = tmpfs.scenario(Path(args.tmpfs), imgs, mem_pairs, flatfs_cmd(), log)
        if args.only in (None, "reflink"):
            log("reflink XFS (flatfs convert -C vs qemu-img convert -C, loop-mounted XFS, reflink=1)")
            res["reflink"] = reflink.scenario(work, imgs, mem_pairs, flatfs_cmd(), log)
        if args.only in (None, "fragmented"):
            log("fragmented disk (flatfs map/mount vs qemu-img map; warm cache)")
            top = fragmented.build(work, args.quick, log)
            frag_pairs = args.frag_pairs if args.frag_pairs is not None else (1 if args.quick else 11)
            res["fragmented"] = fragmented.run(top, work, frag_pairs, flatfs_cmd(), log)
        if args.only in (None, "views"):
            log("views (flatfs mount vs qemu-storage-daemon --export type=fuse)")
            view, vchecks = run_views(imgs, work, cache, pairs, layout, seek_budget, args.map_timeout)
            checks.update(vchecks)
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    res["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    res["checks"] = checks
    figs = figures(conv, view, layout)
    assert [f.key for f in figs] == list(FIGURE_KEYS), "FIGURE_KEYS is out of date"
    with_ranges(figs, conv, view, layout)
    res["noise"] = noise(conv, res["machine"]["cores"] or 1)
    if any(not s["complete"] for s in view["seek"]["qemu"]):
        res["seek_budget_note"] = (
            f"QEMU's SEEK walk of the 64 TiB view was capped at {seek_budget:g} s "
            "per run; its whole-walk figure is not timed, the prefix and tail rows are"
        )
    res["figures"] = [f.as_dict() for f in figs]
    res["samples"] = {"convert": conv, "view": view}

    print()
    print(
        f"Medians of {pairs} pairs, {cache.mode} cache, {res['machine']['cores']} cores, "
        f"{res['date']} (total {res['elapsed_seconds']:.0f} s, load average {res['load_start'][0]:.2f} "
        f"at the start, {res['load_end'][0]:.2f} at the end)"
    )
    print(table_text(figs))
    for k, v in checks.items():
        print(f"check: {k}: {v}")
    if res.get("vmdk"):
        print("\n".join(vmdk.lines(res["vmdk"])))
    if res.get("vhdx"):
        print("\n".join(vhdx.lines(res["vhdx"])))
    if res.get("writers"):
        print("\n".join(writers.lines(res["writers"])))
    for name, mod in (("tmpfs", tmpfs), ("reflink", reflink)):
        if res.get(name):
            print("\n".join(mod.lines(res[name])))
    if res.get("fragmented"):
        print("\n".join(fragmented.lines(res["fragmented"])))
    if res.get("seek_budget_note"):
        print("note: " + res["seek_budget_note"])
    if res.get("noise"):
        print("note: " + res["noise"])
    (out / "bench.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(res, figs))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    for name in ("tmpfs", "reflink", "writers"):
        checks.update(res.get(name, {}).get("checks", {}))
    bad = [k for k, v in checks.items() if str(v).startswith("DIFFERENT")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
