"""Timing primitives: a child's wall/CPU/peak RSS, cache control, statistics."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DROP_CACHES = "/proc/sys/vm/drop_caches"


class Cache:
    """Cold cache (sync + drop_caches, root only) or warm cache (sync only)."""

    def __init__(self, want_cold: bool = True, warm_cmds: list[list[str]] | None = None) -> None:
        self.cold = want_cold and self._can_drop()
        self.warm_cmds = warm_cmds or []

    @staticmethod
    def _can_drop() -> bool:
        if os.geteuid() != 0 or not os.path.exists(DROP_CACHES):
            return False
        try:
            with open(DROP_CACHES, "w") as f:
                f.write("3\n")
            return True
        except OSError:
            return False

    @property
    def mode(self) -> str:
        return "cold" if self.cold else "warm"

    def reset(self, programs: bool = True) -> None:
        """Before every timed run, on both sides alike: sync, drop caches.

        Cold means cold *data*: with ``programs``, the tools' own code (the
        interpreter and flatfs's modules, qemu-img and its libraries) is
        loaded again right after the drop, so that neither side's figure
        includes reading its program from disk.
        """
        os.sync()
        if self.cold:
            with open(DROP_CACHES, "w") as f:
                f.write("3\n")
            if programs:
                for cmd in self.warm_cmds:
                    subprocess.run(
                        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )


@dataclass
class ChildRun:
    wall: float  # seconds from spawn to exit
    cpu: float  # user + sys of the child (all its threads)
    user: float
    sys: float
    maxrss_mib: float  # peak resident set of the child
    returncode: int


LAUNCHER = Path(__file__).resolve().parent / "launch.py"


def run_child(
    cmd: list[str],
    cwd: Path | None = None,
    stdout=subprocess.DEVNULL,
    timeout: float | None = None,
    env: dict | None = None,
) -> ChildRun:
    """Run ``cmd`` through launch.py: wall, CPU and peak RSS of the command alone."""
    import json
    import signal
    import tempfile

    fd, report = tempfile.mkstemp(prefix="flatfs-bench-", suffix=".json")
    os.close(fd)
    try:
        p = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), report, *map(str, cmd)],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise TimeoutError(f"{cmd[0]} took longer than {timeout:.0f} s") from None
        except BaseException:  # Ctrl-C: the command is in its own session
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        if p.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} failed ({p.returncode}): {err.decode(errors='replace').strip()}"
            )
        with open(report) as f:
            r = json.load(f)
    finally:
        os.unlink(report)
    return ChildRun(r["wall"], r["user"] + r["sys"], r["user"], r["sys"], r["maxrss_kib"] / 1024, 0)


def fsync_path(path: Path) -> float:
    """fsync a file; returns the seconds it took (dirty data left by the writer)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def proc_cpu(pid: int) -> float:
    """user + sys seconds of a running process (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all CPUs), from /proc/stat.

    The difference over a run, minus the run's own CPU, is what everything
    else on the machine used meanwhile: a noise indicator.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def pair_ratios(f: Sequence[float | None], q: Sequence[float | None]) -> list[float]:
    """flatfs / QEMU within each pair (the two ran back to back); a pair with a missing or
    zero figure is left out."""
    return [a / b for a, b in zip(f, q) if a is not None and b]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "samples": [round(x, 6) for x in xs],
    }
