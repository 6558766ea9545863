"""The one-line progress bar of ``flatfs convert --progress``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..units import human_size


def human(n: float) -> str:
    """``n`` bytes in binary units, as the bar shows them."""
    return human_size(n, ".1f")


class Progress:
    """A one-line progress bar on stderr: data bytes done of total, rate, ETA."""

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        total = max(self.total, self.done)
        frac = self.done / total if total else 1.0
        bar = "#" * int(frac * 30)
        elapsed = max(now - self.t0, 1e-6)
        rate = self.done / elapsed
        if self.done >= total:
            eta = "done"
        elif rate > 0:
            secs = int((total - self.done) / rate)
            eta = f"ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        else:
            eta = "ETA --:--:--"
        line = f"  {frac * 100:5.1f}% [{bar:<30}] {human(self.done)} / {human(total)}  {human(rate)}/s  {eta}"
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
