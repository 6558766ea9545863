"""Fuzz worker: opens mutant images under a memory cap and reports one JSON line each.

Run as ``python -m tests.fuzz.worker MEMORY_BYTES``; reads image paths from stdin.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import traceback

READ_CAP = 64 << 20
MAP_CAP = 100_000


def examine(path: str) -> dict:
    from flatfs import FlatfsError, OpenOptions, open_chain

    try:
        with open_chain(path, OpenOptions(force_share=True)) as chain:
            extents = []
            for e in chain.extents():
                extents.append((e.start, e.length, e.kind.value, e.depth))
                if len(extents) >= MAP_CAP:
                    break
            h = hashlib.sha256()
            buf = bytearray(1 << 20)
            pos, end = 0, min(chain.size, READ_CAP)
            while pos < end:
                n = chain.readinto(pos, memoryview(buf)[: min(len(buf), end - pos)])
                h.update(memoryview(buf)[:n])
                pos += n
            return {"ok": True, "size": chain.size, "sha": h.hexdigest(), "extents": len(extents)}
    except FlatfsError as exc:
        text = str(exc)
        return {"ok": False, "error": text, "oneline": "\n" not in text, "type": type(exc).__name__}
    except BaseException:
        return {"bug": traceback.format_exc()}


def main() -> None:
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import flatfs.formats.qcow2  # noqa: F401  (import before the first image, under the cap)

    for line in sys.stdin:
        print(json.dumps(examine(line.rstrip("\n"))), flush=True)


if __name__ == "__main__":
    main()
