"""Run one command and report its own rusage: ``python -I -S launch.py OUT CMD...``.

Why a launcher: a child's ``ru_maxrss`` keeps the high-water mark of the
memory it had *before* exec, and a child forked (or vforked) by the benchmark
starts with the benchmark's own resident set, a few hundred MiB of content
pools. This launcher is a small fresh interpreter; the command is its child,
so the peak RSS, CPU and wall it writes to OUT (JSON) belong to the command
alone (plus the launcher's ~8 MiB at fork, a floor far below either tool).
"""

import json
import os
import sys
import time


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kib": ru.ru_maxrss}, f)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
