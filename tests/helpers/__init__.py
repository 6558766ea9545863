"""Helper modules shared by tests (not tests themselves).

bench/ builds some of its images with a few of them, deliberately, through bench/shared.py
only: those modules are listed here, and must stay importable outside pytest's run (no
fixtures, no conftest), since the benchmark runs them as a plain script.
"""

BENCH_SHARED = ("chains", "esxi_writer", "images", "loopfs", "needs", "qemu", "vhdx_writer")
