"""Running flatfs on hostile images inside limits, and the canary files they point at.

Every run is a subprocess under RLIMIT_AS and a wall-clock limit, so a memory
or CPU bomb fails its test instead of swapping the machine or hanging the
suite. A canary is a host text file with secrets in it that an image names as
its parent or extent: none of its lines may ever reach flatfs's output.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from .cli import ONE_LINE

MEMORY = 512 << 20  # RLIMIT_AS of every bounded run, as in the hostile-image campaign
WALL = 30  # seconds

# Host text files with secrets in them; each line a secret of its own. The second
# carries the VMDK descriptor signature, the third QEMU's "version=1" rule: both get
# past the "does it look like a VMDK" check and must then fail without quoting a line.
CANARY_SECRETS = (
    "root:$6$CANARYxSALT$Q1w2e3r4t5y6:20228:0:99999:7:::",
    "CANARY-PASSWORD=hunter2-canary",
    'createType="CANARYtype"',
    "RW ² FLAT CANARYfile 0",
)
CANARIES = {
    "plain": "\n".join(CANARY_SECRETS) + "\n",
    "signed": "# Disk DescriptorFile\n" + "\n".join(CANARY_SECRETS) + "\n",
    "version": "version=1\n" + "\n".join(CANARY_SECRETS) + "\n",
}
# substrings none of which may appear anywhere flatfs writes
NEEDLES = ("CANARY", "hunter2", "Q1w2e3r4", "20228")


def _limits(memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def bounded_run(
    argv: list[str], *, memory: int = MEMORY, wall: float = WALL, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``argv`` under RLIMIT_AS ``memory`` and ``wall`` seconds; a hang fails the test."""
    try:
        return subprocess.run(
            argv,
            text=True,
            capture_output=True,
            timeout=wall,
            preexec_fn=lambda: _limits(memory),
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, argv))} ran longer than {wall} s")


def bounded(
    *args: str | os.PathLike[str], memory: int = MEMORY, wall: float = WALL
) -> subprocess.CompletedProcess[str]:
    """``flatfs *args`` under the limits."""
    return bounded_run([sys.executable, "-m", "flatfs", *map(str, args)], memory=memory, wall=wall)


def assert_clean(r: subprocess.CompletedProcess[str]) -> None:
    """Success, or exit 1 with exactly one ``flatfs:`` line (never a traceback, never killed)."""
    assert r.returncode in (0, 1), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr[-2000:]
    if r.returncode == 1:
        assert ONE_LINE(r.stderr), r.stderr


def refused(*args: str | os.PathLike[str], memory: int = MEMORY, wall: float = WALL) -> str:
    """``flatfs *args`` under the limits must fail with one line; returns it."""
    r = bounded(*args, memory=memory, wall=wall)
    assert r.returncode == 1, (args, r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert_clean(r)
    return r.stderr.strip()


def write_canary(path: Path, kind: str = "plain") -> Path:
    path.write_text(CANARIES[kind])
    return path


def assert_no_canary(*texts: str | bytes) -> None:
    for t in texts:
        b = t.encode() if isinstance(t, str) else t
        for n in NEEDLES:
            assert n.encode() not in b, (n, b[:300])
