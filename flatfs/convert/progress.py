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
    """A one-line progress bar on stderr: data bytes done of total, rate, ETA.

    On a terminal the line is redrawn in place (a carriage return); anywhere else (a log
    file, a CI job) a plain line is printed at every 10% instead.
    """

    def __init__(self, total: int, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.interval = interval
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._tenth = 0  # the last 10% step printed, off a terminal

    def add(self, n: int) -> None:
        self.done += n
        if not self.tty:
            self._step()
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _step(self) -> None:
        """Off a terminal: one plain line each time another 10% is done."""
        total = max(self.total, self.done)
        tenth = 10 if not total else self.done * 10 // total
        if tenth > self._tenth:
            self._tenth = tenth
            self.stream.write(self._line(time.monotonic()) + "\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        line = self._line(now)
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def _line(self, now: float) -> str:
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
        return f"  {frac * 100:5.1f}% [{bar:<30}] {human(self.done)} / {human(total)}  {human(rate)}/s  {eta}"

    def close(self) -> None:
        if not self.tty:
            self._step()
            return
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
