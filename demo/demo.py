#!/usr/bin/env python3
"""`make demo`: build a backing chain with flatfs itself, look at it, mount it, flatten it.

Needs no qemu-img. Everything goes under ./demo-out/ (gitignored).

1. a sparse 1 GiB raw disk with a few MiB of data at scattered offsets;
2. `flatfs convert` it into base.qcow2;
3. a changed copy of the disk, written as an overlay on base.qcow2 with -B:
   only the clusters that differ are stored;
4. `flatfs info` and `flatfs map` of the chain;
5. if FUSE is there: `flatfs mount` the chain, `ls -ls` the view, convert the
   view itself (a sparse raw file) and unmount;
6. flatten the chain into flat.qcow2 and read it back with flatfs: it must equal
   the changed disk byte for byte;
7. if nbdkit is there: `flatfs serve` the chain for one command, which maps the
   export with `nbdinfo` and copies it with `nbdcopy`: the copy must equal the
   changed disk.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path.cwd() / "demo-out"
K = 1024
M = 1 << 20
G = 1 << 30

sys.path.insert(0, str(ROOT))


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


def rel(p: Path | str) -> str:
    try:
        return str(Path(p).relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def flatfs(*args: object, show: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flatfs", *map(str, args)]
    if show:
        say("$ flatfs " + " ".join(shlex.quote(rel(a) if isinstance(a, Path) else str(a)) for a in args))
    res = subprocess.run(cmd, text=True, capture_output=True, cwd=OUT)
    if check and res.returncode != 0:
        say(res.stdout + res.stderr)
        raise SystemExit(f"demo: `flatfs {args[0]}` failed (exit {res.returncode})")
    return res


def indent(text: str, limit: int | None = None) -> None:
    lines = text.rstrip("\n").splitlines()
    for line in lines[:limit]:
        say("    " + line)
    if limit is not None and len(lines) > limit:
        say(f"    ... ({len(lines) - limit} more lines)")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def usage(p: Path) -> str:
    st = p.stat()
    return f"{human(st.st_size):>10} apparent, {human(st.st_blocks * 512):>10} on disk"


def make_disk(path: Path) -> None:
    """A sparse 1 GiB disk: a boot area, text, random data, and a tail, with holes between."""
    rnd = random.Random(2024)
    text = b"".join(
        f"line {i:06d}: the quick brown fox jumps over the lazy dog\n".encode() for i in range(40000)
    )
    with open(path, "wb") as f:
        f.truncate(G)
        f.seek(0)
        f.write(rnd.randbytes(M))  # "boot sector" area
        f.seek(100 * M)
        f.write(text[: 2 * M])  # compressible text
        f.seek(300 * M)
        f.write(rnd.randbytes(512 * K) + bytes(256 * K) + rnd.randbytes(256 * K))  # zeros inside data
        f.seek(640 * M + 12345)
        f.write(b"unaligned data " * 4000)
        f.seek(G - 512 * K)
        f.write(rnd.randbytes(512 * K))  # the very end


def change_disk(path: Path) -> None:
    rnd = random.Random(7)
    with open(path, "r+b") as f:
        f.seek(100 * M + 64 * K)
        f.write(b"CHANGED " * 8192)  # 64 KiB rewritten
        f.seek(300 * M)
        f.write(bytes(128 * K))  # zeros over old data
        f.seek(800 * M)
        f.write(rnd.randbytes(M))  # new data in a hole


def same_content(chain, raw_path: Path) -> bool:
    """Compare a flatfs chain with a raw file, reading only where either has data."""
    from flatfs import OpenOptions, open_chain

    with open_chain(raw_path, OpenOptions(format="raw")) as raw:
        if raw.size != chain.size:
            return False
        ranges = sorted(
            [(e.start, e.end) for e in chain.extents() if e.kind.must_read]
            + [(e.start, e.end) for e in raw.extents() if e.kind.must_read]
        )
        pos = 0
        for start, end in ranges:
            start = max(start, pos)
            while start < end:
                n = min(4 * M, end - start)
                if chain.pread(start, n) != raw.pread(start, n):
                    return False
                start += n
            pos = max(pos, end)
    return True


def main() -> None:
    from flatfs import open_chain

    mnt = OUT / "mnt"
    if mnt.exists():
        flatfs("umount", "-q", mnt, show=False, check=False)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    say(f"flatfs demo: everything goes under {rel(OUT)}/")

    step("1. A sparse 1 GiB raw disk with a few MiB of data")
    disk = OUT / "disk.raw"
    make_disk(disk)
    say(f"disk.raw: {usage(disk)}")

    step("2. Convert it into a qcow2 base image (only the data is read)")
    base = OUT / "base.qcow2"
    res = flatfs("convert", "--output=json", disk, base)
    s = json.loads(res.stdout)
    say(
        f"    read {human(s['data-read'])} of data, wrote {human(s['bytes-written'])}, "
        f"skipped {s['zero-clusters-skipped']} all-zero clusters, in {s['seconds']:.2f} s"
    )
    say(f"base.qcow2: {usage(base)}")

    step("3. Change a copy of the disk and write only the difference, as an overlay")
    changed = OUT / "changed.raw"
    flatfs("convert", "-O", "raw", disk, changed)  # a sparse copy
    change_disk(changed)
    say("changed.raw: 64 KiB rewritten at 100 MiB, 128 KiB zeroed at 300 MiB, 1 MiB new at 800 MiB")
    overlay = OUT / "overlay.qcow2"
    res = flatfs("convert", "--output=json", "-B", "base.qcow2", "-F", "qcow2", changed, overlay)
    s = json.loads(res.stdout)
    say(
        f"    {s['data-clusters']} data clusters and {s['zero-clusters']} zero clusters stored; "
        f"{s['same-as-backing-clusters']} clusters left to base.qcow2"
    )
    say(f"overlay.qcow2: {usage(overlay)}")

    step("4. Look at the chain")
    indent(flatfs("info", overlay).stdout)
    say()
    indent(flatfs("map", overlay).stdout, limit=24)

    step("5. Mount the chain as one raw file")
    have_fuse = os.path.exists("/dev/fuse") and shutil.which("fusermount3")
    has_mount = "mount" in flatfs("--help", show=False).stdout
    if not (have_fuse and has_mount):
        say("    (skipped: no /dev/fuse, fusermount3 or `flatfs mount` here)")
    else:
        mnt.mkdir()
        res = flatfs("mount", overlay, mnt, check=False)
        if res.returncode != 0:
            say(f"    (skipped: mount failed: {res.stderr.strip()})")
        else:
            try:
                view = mnt / "overlay.raw"
                ls = subprocess.run(["ls", "-ls", str(mnt)], text=True, capture_output=True)
                say(f"$ ls -ls {rel(mnt)}")
                indent(ls.stdout)
                say("    (1 GiB apparent, only the data allocated: holes are real holes)")
                from_view = OUT / "from-view.qcow2"
                res = flatfs("convert", "--output=json", "-f", "raw", view, from_view)
                s = json.loads(res.stdout)
                say(f"    the view is a sparse raw file: converting it read {human(s['data-read'])}")
            finally:
                flatfs("umount", mnt)

    step("6. Flatten the chain into one standalone qcow2 and check it")
    flat = OUT / "flat.qcow2"
    t0 = time.monotonic()
    res = flatfs("convert", "--output=json", overlay, flat)
    s = json.loads(res.stdout)
    say(
        f"    read {human(s['data-read'])}, wrote {human(s['bytes-written'])} "
        f"in {time.monotonic() - t0:.2f} s"
    )
    say(f"flat.qcow2: {usage(flat)}")
    with open_chain(flat) as chain:
        assert len(chain.layers) == 1, "flat.qcow2 must not have a backing file"
        ok = same_content(chain, changed)
    say(
        f"    flat.qcow2 has no backing file and reads {'exactly as' if ok else 'DIFFERENTLY from'} "
        "changed.raw"
    )
    if not ok:
        raise SystemExit("demo: flattened image differs from changed.raw")
    from_view = OUT / "from-view.qcow2"
    if from_view.exists():
        with open_chain(from_view) as chain:
            ok = same_content(chain, changed)
        say(
            f"    from-view.qcow2 (converted from the mounted view) reads "
            f"{'exactly as' if ok else 'DIFFERENTLY from'} changed.raw"
        )
        if not ok:
            raise SystemExit("demo: the image converted from the view differs from changed.raw")

    step("7. Serve the chain over NBD (nbdkit) for one command")
    served = OUT / "served.raw"
    if not all(shutil.which(t) for t in ("nbdkit", "nbdinfo", "nbdcopy")):
        say("    (skipped: nbdkit, nbdinfo or nbdcopy is not installed)")
    else:
        cmd = f'nbdinfo --map "$uri" | head -8; nbdcopy "$uri" {served.name}'
        res = flatfs("serve", overlay, "--run", cmd, check=False)
        indent(res.stdout + res.stderr)
        if res.returncode != 0:
            raise SystemExit("demo: flatfs serve failed")
        with open_chain(served) as chain:
            ok = same_content(chain, changed)
        say(
            f"    served.raw (copied by nbdcopy from the export) reads "
            f"{'exactly as' if ok else 'DIFFERENTLY from'} changed.raw; {usage(served)}"
        )
        if not ok:
            raise SystemExit("demo: the copy of the NBD export differs from changed.raw")

    step("Done")
    for p in (disk, changed, base, overlay, flat):
        say(f"    {p.name:<15} {usage(p)}")


if __name__ == "__main__":
    main()
