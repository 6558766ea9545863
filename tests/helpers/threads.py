"""Run a function on many threads at once."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(target: Callable[[int], object], n: int) -> None:
    """Run ``target(i)`` for i in range(n) on n threads at once, and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
