#!/usr/bin/env python3
"""Profile flatfs with py-spy on the benchmark's images, and summarize where the time goes.

    python bench/spy.py [--scale N | --quick] [--out DIR] [--rate HZ] [--top N]

Needs py-spy (``.venv/bin/pip install py-spy``) and root (ptrace, drop_caches).
Uses the images a ``bench/run.py --keep`` run left in OUT/work (or builds
them, and removes them afterwards unless ``--keep``), and records four profiles, as collapsed stacks
(``OUT/profiles/*.txt``, for flamegraph.pl or speedscope) with a summary
(``OUT/profiles/summary.md``, also printed):

* ``convert``: ``flatfs convert`` of the 1 TiB seed chain, cold cache,
  ``--idle`` (wall time: waiting in preadv/pwrite/fsync shows up);
* ``convert-c``: ``flatfs convert -c`` of the compressed scenario, all threads;
* ``view-read``: the mounted view's daemon while 1 MiB reads stream the
  read region twice (cold cache); CPU samples only;
* ``view-seek``: the daemon while the 64 TiB view is walked with
  SEEK_DATA/SEEK_HOLE repeatedly and ``qemu-img map -f raw`` runs on the
  1 TiB view; CPU samples only.

Self time is where the sampled thread was (the innermost Python function,
including the C calls it made); inclusive time counts every function on
the stack once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import images  # noqa: E402
from timing import Cache  # noqa: E402
from views import FlatfsView, flatfs_cmd, read_sequential, seek_walk  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


def _short(path: str) -> str:
    for mark in ("site-packages/", "/lib/python3"):
        if mark in path:
            path = path.split(mark, 1)[1]
            if mark != "site-packages/":
                path = path.split("/", 1)[-1]
            break
    return path


def parse(path: Path) -> list[tuple[list[str], int]]:
    """Collapsed stacks: ([frame, ...] outermost first, samples)."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        out.append((stack.split(";"), int(n)))
    return out


def frame_key(frame: str, with_line: bool = False) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = _short(m["file"])
    return f"{m['func']} ({f}:{m['line']})" if with_line and m["line"] else f"{m['func']} ({f})"


# Leaves where a thread waits rather than works: counted apart, left out of the tables.
WAITING = (
    "Condition.wait",
    "_worker (concurrent/futures/thread.py)",
    "FUSE.__init__ (mfusepy",
    "Event.wait",
    "Thread.join",
    "Semaphore.acquire",
    "Lock.acquire",
)


def summarize(name: str, path: Path, top: int) -> str:
    stacks = parse(path)

    def waits(frames: list[str]) -> bool:
        return bool(frames) and frame_key(frames[-1]).startswith(WAITING)

    waiting = sum(n for frames, n in stacks if waits(frames))
    stacks = [(f, n) for f, n in stacks if len(f) > 1 and not waits(f)]
    # --threads puts "thread (0x...)" first; the main thread is the one running <module>
    groups: dict[str, list[tuple[list[str], int]]] = {}
    for frames, n in stacks:
        body = frames[1:] if frames and frames[0].startswith(("thread ", "process ")) else frames
        if body and body[0].startswith("thread "):
            body = body[1:]
        if any(f.startswith("<module>") for f in body[:2]):
            g = "main thread"
        elif any("_worker (concurrent/futures" in f or "concurrent/futures/thread.py" in f for f in body):
            g = "thread pool"
        elif any("flatfs/fuse/" in f or "mfusepy" in f for f in body):
            g = "FUSE request threads"
        else:
            g = "other threads"
        groups.setdefault(g, []).append((body, n))
    total = sum(n for _, n in stacks)
    lines = [
        f"### {name}: {total} samples working ({waiting} more waiting on locks, queues or "
        f"the FUSE loop, left out)",
        "",
    ]
    if not total:
        return "\n".join(lines)
    for g, items in sorted(groups.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        gt = sum(n for _, n in items)
        selfc: Counter[str] = Counter()
        selfline: dict[str, Counter[str]] = {}
        incl: Counter[str] = Counter()
        for body, n in items:
            if not body:
                continue
            leaf = frame_key(body[-1])
            selfc[leaf] += n
            selfline.setdefault(leaf, Counter())[frame_key(body[-1], True)] += n
            for k in {frame_key(f) for f in body}:
                incl[k] += n
        lines.append(f"{g}: {gt} samples ({gt / total:.0%} of all)")
        lines.append("")
        lines.append("| self | function (hottest line) | | inclusive | function |")
        lines.append("|---:|---|---|---:|---|")
        s_items = selfc.most_common(top)
        # inclusive: skip the entry points (the CLI, click, the interpreter)
        i_items = [
            (k, v)
            for k, v in incl.most_common()
            if v < gt
            and not k.startswith("<module>")
            and not any(x in k for x in ("(click/", "(flatfs/cli", "(threading.py)"))
        ][:top]
        for i in range(max(len(s_items), len(i_items))):
            a = b = ""
            if i < len(s_items):
                k, v = s_items[i]
                hot = selfline[k].most_common(1)[0][0]
                line = hot.rsplit(":", 1)[-1].rstrip(")")
                a = f"{v / gt:5.1%} | {k.replace('|', '/')} :{line}"
            else:
                a = " | "
            if i < len(i_items):
                k, v = i_items[i]
                b = f"{v / gt:5.1%} | {k}"
            else:
                b = " | "
            lines.append(f"| {a} | | {b} |")
        lines.append("")
    return "\n".join(lines)


def attribution(
    imgs: images.Images, v1: FlatfsView, v64: FlatfsView, read_bytes: int, seconds: float = 1.0
) -> str:
    """Per-request cost in-process (the chain alone) against the same work through FUSE.

    Warm cache, no profiler attached: the difference is what the FUSE path
    (kernel, libfuse, mfusepy/ctypes, the View glue) adds to every request.
    """
    from flatfs.chain import open_chain
    from flatfs.chain.dataindex import scan

    def walk_inproc(seek, size: int) -> int:
        off, n = 0, 0
        try:
            while True:
                d = seek(off, os.SEEK_DATA)
                off = seek(d, os.SEEK_HOLE)
                n += 2
                if off >= size:
                    return n
        except OSError:
            return n + 1

    def timed(fn) -> float:  # µs per call
        t0 = time.perf_counter()
        calls = 0
        while time.perf_counter() - t0 < seconds:
            calls += fn()
        return (time.perf_counter() - t0) / calls * 1e6

    with open_chain(str(imgs.top_big)) as chain:
        walk_inproc(chain.seek, chain.size)
        inproc = min(timed(lambda: walk_inproc(chain.seek, chain.size)) for _ in range(3))
        index, _ = scan(chain.size, chain.extents())  # what the mounted view answers from
        assert index is not None
        inindex = min(timed(lambda: walk_inproc(index.seek, chain.size)) for _ in range(3))
    seek_walk(v64.mountpoint)
    fuse = min(timed(lambda: len(seek_walk(v64.mountpoint)["calls"])) for _ in range(3))
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    best_in = best_view = best_cached = float("inf")
    with open_chain(str(imgs.top_small)) as chain:
        for _ in range(4):  # the first pass warms the page cache
            t0 = time.perf_counter()
            for off in range(0, read_bytes, 1 << 20):
                chain.readinto(off, mv)
            best_in = min(best_in, time.perf_counter() - t0)
    for _ in range(3):
        # the view keeps its pages cached (kernel_cache): read once through the
        # daemon (view pages dropped), then once more from the view's own cache
        secs, n, _ = read_sequential(v1.mountpoint, read_bytes)
        best_view = min(best_view, secs)
        secs, n, _ = read_sequential(v1.mountpoint, read_bytes, drop=False)
        best_cached = min(best_cached, secs)
    mib = read_bytes / (1 << 20)
    rin, rview, rcached = mib / best_in, mib / best_view, mib / best_cached
    return "\n".join(
        [
            "Per-request cost, warm cache, no profiler attached:",
            "",
            "| path | in-process (Chain) | through the FUSE view |",
            "|---|---:|---:|",
            f"| SEEK_DATA/SEEK_HOLE walk of the 64 TiB view | {inproc:.1f} µs/call (Chain.seek); "
            f"{inindex:.2f} µs/call (the view's data-run index) | {fuse:.1f} µs/call |",
            f"| 1 MiB reads of the read region (image in page cache), best of 3 | {rin:.0f} MiB/s | "
            f"{rview:.0f} MiB/s (view pages dropped; {rcached:.0f} MiB/s from the view's own page cache) |",
            "",
        ]
    )


class Recorder:
    """py-spy record attached to a running pid, stopped with SIGINT."""

    def __init__(self, spy: str, pid: int, out: Path, rate: int) -> None:
        self.p = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--threads",
                "--rate",
                str(rate),
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let it attach

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="/var/tmp/flatfs-bench")
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seek-seconds", type=float, default=5.0)
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep images this run had to build (images reused from run.py --keep stay anyway)",
    )
    args = ap.parse_args(argv)

    spy = py_spy()
    if spy is None:
        print("spy: py-spy not found (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    layout = images.Layout.make(args.scale, args.quick)
    out = Path(args.out).resolve()
    work = out / "work"
    prof = out / "profiles"
    prof.mkdir(parents=True, exist_ok=True)
    stamp = work / "layout.json"
    want = json.dumps({k: v for k, v in vars(layout).items() if isinstance(v, int)}, sort_keys=True)
    built = False
    if stamp.exists() and stamp.read_text() == want:
        imgs = images.existing(work)
    else:
        if work.exists():
            shutil.rmtree(work)
        print("building images")
        imgs = images.build(work, layout)
        stamp.write_text(want)
        built = True
    try:
        return record_all(args, spy, layout, imgs, work, prof)
    finally:
        if built and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def record_all(
    args: argparse.Namespace, spy: str, layout: images.Layout, imgs: images.Images, work: Path, prof: Path
) -> int:
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    cache = Cache(True, warm_cmds=[flatfs_cmd() + ["convert", "--help"]])
    summaries = [
        f"flatfs py-spy profiles, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{cache.mode} cache, scale {args.scale}{' (quick)' if args.quick else ''}",
        "",
    ]

    # 1-2. convert, convert -c
    for name, src, extra, idle in (
        ("convert", imgs.top_small, [], False),
        ("convert-c", imgs.comp, ["-c"], False),
    ):
        dst = work / "spy-out.qcow2"
        dst.unlink(missing_ok=True)
        subprocess.run(flatfs_cmd() + ["info", str(src)], capture_output=True)  # compile bytecode
        cache.reset()
        raw = prof / f"{name}.txt"
        cmd = [spy, "record", "--threads", "--rate", str(args.rate), "--format", "raw", "-o", str(raw)]
        cmd += (["--idle"] if idle else []) + ["--"] + flatfs_cmd() + ["convert", *extra, src.name, dst.name]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        dst.unlink(missing_ok=True)
        summaries.append(
            f"`flatfs convert {' '.join(extra + [src.name])}`: {wall:.2f} s under py-spy"
            f"{' (--idle: blocked time counted)' if idle else ' (CPU samples only)'}"
        )
        summaries.append("")
        summaries.append(summarize(name, raw, args.top))
        print(f"recorded {name} ({wall:.1f} s)")

    # 3-4. the view's daemon
    v1 = FlatfsView(imgs.top_small, work / "spy-view-1t.raw", work / "spy-view-1t.log")
    v64 = FlatfsView(imgs.top_big, work / "spy-view-64t.raw", work / "spy-view-64t.log")
    try:
        v1.start()
        v64.start()
        summaries.append(attribution(imgs, v1, v64, layout.read_bytes))
        print("measured the in-process / FUSE attribution")
        raw = prof / "view-read.txt"
        rec = Recorder(spy, v1.pid, raw, args.rate)
        try:
            mbps = []
            for _ in range(2):
                cache.reset(programs=False)
                secs, n, _ = read_sequential(v1.mountpoint, layout.read_bytes)
                mbps.append(n / secs / (1 << 20))
        finally:
            rec.stop()
        summaries.append(
            f"view read: {layout.read_bytes >> 20} MiB twice with 1 MiB reads, cold cache, "
            f"{' and '.join(f'{x:.0f}' for x in mbps)} MiB/s under py-spy (CPU samples only)"
        )
        summaries.append("")
        summaries.append(summarize("view-read", raw, args.top))
        print("recorded view-read")

        raw = prof / "view-seek.txt"
        rec64 = Recorder(spy, v64.pid, raw, args.rate)
        rec1 = Recorder(spy, v1.pid, prof / "view-map.txt", args.rate)
        try:
            t0 = time.perf_counter()
            walks = calls = 0
            while time.perf_counter() - t0 < args.seek_seconds:
                w = seek_walk(v64.mountpoint)
                walks += 1
                calls += len(w["calls"])
            seek_ms = (time.perf_counter() - t0) / calls * 1e3
            t1 = time.perf_counter()
            for _ in range(3):
                subprocess.run(
                    ["qemu-img", "map", "-f", "raw", v1.mountpoint.name],
                    cwd=work,
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
            map_s = (time.perf_counter() - t1) / 3
        finally:
            rec64.stop()
            rec1.stop()
        summaries.append(
            f"view seek: {walks} walks of the 64 TiB view ({calls} calls, {seek_ms:.3f} ms/call "
            f"under py-spy), CPU samples only"
        )
        summaries.append("")
        summaries.append(summarize("view-seek", raw, args.top))
        summaries.append(f"qemu-img map -f raw of the 1 TiB view, 3 runs, {map_s:.3f} s each under py-spy")
        summaries.append("")
        summaries.append(summarize("view-map", prof / "view-map.txt", args.top))
        print("recorded view-seek and view-map")
    finally:
        v1.stop()
        v64.stop()
    text = "\n".join(summaries) + "\n"
    (prof / "summary.md").write_text(text)
    print(text)
    print(f"wrote {prof}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
