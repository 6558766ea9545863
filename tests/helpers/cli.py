"""Running the flatfs command line as a user would, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def flatfs(*args: str | os.PathLike[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "flatfs", *map(str, args)], text=True, capture_output=True, check=check, **kw
    )


ONE_LINE: Callable[[str], bool] = lambda err: (
    len(err.strip().splitlines()) == 1 and err.startswith("flatfs: ") and "Traceback" not in err
)
"""True when ``err`` (a command's stderr) is exactly one ``flatfs: ...`` line and no traceback."""


def error_line(*args: str | os.PathLike[str], prefix: tuple[str, ...] = (), status: int = 1) -> str:
    """Run flatfs (under ``prefix``); it must fail (``status``: 1, or 2 for a usage error) with
    exactly one line and no traceback."""
    if prefix:
        r = subprocess.run(
            [*prefix, sys.executable, "-m", "flatfs", *map(str, args)], text=True, capture_output=True
        )
    else:
        r = flatfs(*args, check=False)
    assert r.returncode == status, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatfs: "), r.stderr
    return lines[0]


def assert_words(line: str, words: list[str]) -> None:
    """Every one of ``words`` is in ``line``."""
    for w in words:
        assert w in line, (w, line)


def one_line_error(args: list[Any], *needles: str, status: int = 1) -> str:
    """``flatfs *args`` fails with one line holding every one of ``needles``; returns the line."""
    line = error_line(*args, status=status)
    assert_words(line, list(needles))
    return line


TEMP_MARK = ".flatfs-tmp-"  # in the names of convert's temporary files


def background_convert(*args: str | os.PathLike[str], delay: float) -> subprocess.Popen[str]:
    """``flatfs convert *args`` started in the background and slowed down: it sleeps ``delay``
    seconds after each chunk (flatfs's test hook), so that a test can act while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "flatfs", "convert", *map(str, args)],
        env=dict(os.environ, FLATFS_CONVERT_TEST_DELAY=str(delay)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def leftovers(folder: Path) -> list[str]:
    """The names of convert's temporary files in ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


def wait_for_temp(folder: Path, proc: subprocess.Popen[str], within: float) -> None:
    """Wait until ``proc`` (a convert) has made its temporary file in ``folder``; fail if it
    exits first or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while not leftovers(folder):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never started"
        time.sleep(0.01)
