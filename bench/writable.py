"""Writable views: `flatfs mount --writable` against qemu-storage-daemon's writable FUSE export of a
qcow2 overlay on the same chain (`qemu-img create -b` then `--export type=fuse,writable=on`).

    .venv/bin/python bench/writable.py [--quick] [--pairs N] [--out DIR] [--seq-mib N]

Per pair (flatfs and QSD back to back, order alternating, each on a fresh mount of the same chain):
fio random 4 KiB writes (O_DIRECT, psync), then random 4 KiB reads of the same range, then a
sequential 1 MiB-block write of ``--seq-mib`` MiB (1024 by default: the issue's 1 GiB). The
statistic is the median of the within-pair ratios flatfs / QSD of each throughput, with their
min-max. Also with ``--overlay`` (flatfs keeping the writes as a qcow2, as QSD does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from views import flatfs_cmd, force_unmount, mount_entry

MiB = 1 << 20


def _fio(path: Path, rw: str, bs: str, size_mib: int, io_mib: int) -> float:
    """MiB/s of one fio job on ``path``."""
    out = subprocess.run(
        ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--size={size_mib}M"]
        + [f"--io_size={io_mib}M", "--direct=1", "--ioengine=psync", "--randseed=42", "--output-format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return float(side["bw_bytes"]) / MiB


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (mount_entry(path) or ("",))[0].startswith("fuse"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path}: the view did not come up")
        time.sleep(0.02)


def _flatfs(work: Path, chain: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    mp = work / "flatfs.raw"
    mp.touch()
    proc = subprocess.Popen(
        [*flatfs_cmd(), "mount", "--foreground", "--writable", *extra, str(chain), str(mp)]
    )
    _wait_mounted(mp, proc)
    return proc, mp


def _qsd(work: Path, chain: Path) -> tuple[subprocess.Popen[bytes], Path]:
    overlay = work / "qsd-overlay.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(chain), "-F", "qcow2", str(overlay)], check=True
    )
    mp = work / "qsd.raw"
    mp.touch()
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={overlay}"]
        + ["--blockdev", "driver=qcow2,node-name=q,file=f"]
        + ["--export", f"type=fuse,id=e,node-name=q,mountpoint={mp},writable=on"]
    )
    _wait_mounted(mp, proc)
    return proc, mp


def _stop(proc: subprocess.Popen[bytes], mp: Path) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    force_unmount(mp)


def _one(start, work: Path, chain: Path, rand_mib: int, seq_mib: int) -> dict[str, float]:
    proc, mp = start(work, chain)
    try:
        return {
            "randwrite": _fio(mp, "randwrite", "4k", rand_mib * 4, rand_mib),
            "randread": _fio(mp, "randread", "4k", rand_mib * 4, rand_mib),
            "seqwrite": _fio(mp, "write", "1M", seq_mib, seq_mib),
        }
    finally:
        _stop(proc, mp)
        for p in work.glob("*overlay*"):
            p.unlink()


def scenario(work: Path, pairs: int, rand_mib: int, seq_mib: int, log) -> dict:
    chain = work / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(chain), f"{max(seq_mib, 4 * rand_mib) * 2}M"]
    )
    subprocess.run(
        ["qemu-io", "-c", f"write -P 0x5a 0 {rand_mib * 2}M", str(chain)], check=True, capture_output=True
    )
    tools = {
        "flatfs": lambda w, c: _flatfs(w, c, ["--scratch-dir", str(w)]),
        "flatfs-overlay": lambda w, c: _flatfs(w, c, ["--overlay", str(w / "flatfs-overlay.qcow2")]),
        "qsd": _qsd,
    }
    samples: dict[str, list[dict[str, float]]] = {t: [] for t in tools}
    for i in range(pairs):
        order = list(tools) if i % 2 == 0 else list(reversed(tools))
        for t in order:
            samples[t].append(_one(tools[t], work, chain, rand_mib, seq_mib))
            log(
                f"pair {i + 1}/{pairs} {t}: "
                + ", ".join(f"{k} {v:.1f} MiB/s" for k, v in samples[t][-1].items())
            )
    out: dict = {"pairs": pairs, "rand_mib": rand_mib, "seq_mib": seq_mib, "samples": samples, "ratios": {}}
    for t in ("flatfs", "flatfs-overlay"):
        for k in ("randwrite", "randread", "seqwrite"):
            r = [a[k] / b[k] for a, b in zip(samples[t], samples["qsd"]) if b[k]]
            out["ratios"][f"{t}/{k}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def lines(res: dict) -> list[str]:
    out = [f"writable views ({res['pairs']} pairs; MiB/s medians; ratio = median of flatfs/QSD within pairs)"]
    for t in ("flatfs", "flatfs-overlay"):
        for k in ("randwrite", "randread", "seqwrite"):
            f = statistics.median(s[k] for s in res["samples"][t])
            q = statistics.median(s[k] for s in res["samples"]["qsd"])
            r = res["ratios"][f"{t}/{k}"]
            spread = f"({r['min']:.2f}-{r['max']:.2f})"
            out.append(f"  {t:15} {k:10} {f:8.1f} vs QSD {q:8.1f}  ratio {r['median']:.2f}x {spread}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 MiB random, 64 MiB sequential, 1 pair")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rand-mib", type=int, default=32, help="MiB of random 4 KiB writes, then reads")
    ap.add_argument("--seq-mib", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="keep bench-writable.json here")
    args = ap.parse_args()
    for tool in ("fio", "qemu-img", "qemu-io", "qemu-storage-daemon", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"bench/writable.py: {tool} is not installed", file=sys.stderr)
            return 2
    if args.quick:
        args.pairs, args.rand_mib, args.seq_mib = 1, 16, 64
    work = Path(tempfile.mkdtemp(prefix="flatfs-bench-writable-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        res = scenario(work, args.pairs, args.rand_mib, args.seq_mib, lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines(res)))
    if args.out:
        (args.out / "bench-writable.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
