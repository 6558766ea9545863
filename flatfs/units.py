"""Byte counts for people: one formatter for info, the progress bar and the pictures."""

from __future__ import annotations


def human_size(n: float, spec: str = ".3g") -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 GiB`` (``spec`` formats the number)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:{spec}} {unit}"
        n /= 1024
    raise AssertionError
