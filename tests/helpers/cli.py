"""Running the flatfs command line as a user would, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
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


def error_line(*args: str | os.PathLike[str], prefix: tuple[str, ...] = ()) -> str:
    """Run flatfs (under ``prefix``); it must fail with exactly one line and no traceback."""
    if prefix:
        r = subprocess.run(
            [*prefix, sys.executable, "-m", "flatfs", *map(str, args)], text=True, capture_output=True
        )
    else:
        r = flatfs(*args, check=False)
    assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatfs: "), r.stderr
    return lines[0]


def assert_words(line: str, words: list[str]) -> None:
    """Every one of ``words`` is in ``line``."""
    for w in words:
        assert w in line, (w, line)


def one_line_error(args: list[Any], *needles: str) -> str:
    """``flatfs *args`` fails with one line holding every one of ``needles``; returns the line."""
    line = error_line(*args)
    assert_words(line, list(needles))
    return line
