"""`flatfs info` and `flatfs map`: the chain's facts and its flattened map."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import click

from ..chain import Chain, OpenOptions, open_chain, open_partial_chain
from ..extents import KINDS, Kind
from ..formats import lookup
from ..units import human_size
from .common import chain_options


def _plain(value: object) -> object:
    """A list inside a record as words ("a b"), not as Python writes it ("['a', 'b']")."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else value


def _echo_row(label: str, value: object) -> None:
    """One fact of a row: a list gets one line per item (a record as "k: v, ..."), a flag yes or no."""
    items = value if isinstance(value, list) else [value]
    for n, item in enumerate(items):
        if isinstance(item, bool):
            text: object = "yes" if item else "no"
        elif isinstance(item, dict):
            text = ", ".join(f"{k}: {_plain(v)}" for k, v in item.items())
        else:
            text = item
        click.echo(f"    {label + ':' if n == 0 else '':<14} {text}")


@click.command()
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@chain_options()
def info(image: str, output: str, options: OpenOptions) -> None:
    """Describe IMAGE and its backing chain, top first. Manual: flatfs(1)."""
    from .. import picture
    from .info import chain_info

    # info shows a parent whose identity (a VMDK's CID...) differs from what its
    # child records, and flags it; map, mount and convert refuse such a chain
    options = options._replace(ignore_parent_id=True)
    # a chain with a missing link: show what was found, then the missing one, and fail
    chain, missing = open_partial_chain(image, options)
    with chain:
        rows = chain_info(chain)
        strips = (
            [picture.strip_and_resolution(chain, d) for d in range(len(chain.layers))]
            if output == "human"
            else []
        )
    if missing is not None:
        rows.append({"depth": len(rows), "missing": missing.looked_for, "looked-in": list(missing.tried)})
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        _echo_info(rows, strips)
    if missing is not None:
        raise missing


def _echo_info(rows: list[dict[str, Any]], strips: list[tuple[str, bool]]) -> None:
    for i, r in enumerate(rows):
        if i:
            click.echo("")
        if "missing" in r:
            click.echo(f"[{r['depth']}] MISSING: {r['missing']}")
            _echo_row("looked in", r["looked-in"])
            continue
        click.echo(f"[{r['depth']}] {r['filename']}")
        click.echo(f"    format:        {r['format']}")
        if r.get("probed"):
            click.echo(f"    probed:        {r['probed']}")
        click.echo(f"    virtual size:  {human_size(r['virtual-size'])} ({r['virtual-size']} bytes)")
        click.echo(f"    disk size:     {human_size(r['actual-size'])}")
        fmt_entry = lookup(r["format"])
        for key, label in fmt_entry.info_rows if fmt_entry is not None else ():
            if r.get(key) is not None:
                _echo_row(label, r[key])
        if r.get("backing-filename"):
            fmt = r.get("backing-filename-format") or "(not recorded)"
            click.echo(f"    backing file:  {r['backing-filename']} (format: {fmt})")
        if r.get("backing-found-by"):
            click.echo(f"    found by:      {r['backing-found-by']}")
        if r.get("backing-resolved-from"):
            click.echo(f"    resolved from: {r['backing-resolved-from']}")
        pid = r.get("parent-identity")
        if pid is not None:
            verdict = (
                "matches" if pid["match"] else "MISMATCH: map, mount and convert refuse (--ignore-parent-id)"
            )
            click.echo(
                f"    parent id:     {pid['kind']} {pid['recorded']}, parent has {pid['found']}: {verdict}"
            )
        if r.get("features"):
            click.echo(f"    features:      {', '.join(r['features'])}")
        if r.get("snapshot"):
            sn = r["snapshot"]
            click.echo(f"    read at:       snapshot {_printable(sn['id'])} ({_printable(sn['name'])})")
        cells, exact = strips[i]
        click.echo(f"    data map:      [{cells}]" + ("" if exact else " (coarse: from the top tables only)"))
        if isinstance(r.get("snapshots"), list) and r["snapshots"]:
            _echo_snapshots(r["snapshots"])


def _echo_snapshots(snapshots: list[dict[str, object]]) -> None:
    """The internal snapshots, in ``qemu-img snapshot -l``'s columns."""
    click.echo("    Snapshot list:")
    click.echo("    " + _SNAP_ROW % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"))
    for sn in snapshots:
        secs = int(str(sn["vm-clock-sec"]))
        ms = int(str(sn["vm-clock-nsec"])) // 1_000_000
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(str(sn["date-sec"]))))
        size = human_size(int(str(sn["vm-state-size"])))
        ident, name = (_printable(str(sn[k])) for k in ("id", "name"))
        click.echo("    " + _SNAP_ROW % (ident, name, size, date, clock, sn.get("icount", "")))


def _printable(text: str) -> str:
    """A name from an image, printable: bytes that are not UTF-8 as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_SNAP_ROW = "%-9s %-17s %7s %19s %12s %10s"


@click.command("map")
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json", "svg"]), default="human")
@chain_options()
def map_(image: str, output: str, options: OpenOptions) -> None:
    """Print the flattened allocation map of IMAGE's chain. Manual: flatfs(1)."""
    with open_chain(image, options) as chain:
        if output == "svg":
            from .. import picture

            sys.stdout.write(picture.svg(chain))
            return
        if output == "json":
            _write_json(chain, sys.stdout)
        else:
            _write_human(chain, sys.stdout)


def _flag(v: bool) -> str:
    return "true" if v else "false"


# Per kind code: the end of a JSON record, and the human map's words
_JSON_TAIL = tuple(
    f'"present": {_flag(k.present)}, "zero": {_flag(k is not Kind.DATA)}, "data": {_flag(k.is_data)}}}'
    for k in KINDS
)
_HUMAN_KIND = tuple(
    {
        Kind.DATA: "data",
        Kind.ALLOC_ZERO: "data (reads as zeros)",
        Kind.ZERO: "zero",
        Kind.ABSENT: "unallocated (zeros)",
    }[k]
    for k in KINDS
)


def _write_json(chain: Chain, out: TextIO) -> None:
    """qemu-img map's records, one piece of the chain's map at a time: no Python object or
    json call per record."""
    out.write("[")
    sep = ""
    for p in chain.pieces():
        d = p.depth
        records = (
            f'{{"start": {s}, "length": {e - s}, "depth": {d}, {_JSON_TAIL[k]}'
            for s, e, k in zip(p.starts, p.ends, p.kinds)
        )
        out.write(sep + ",\n".join(records))
        sep = ",\n"
    if not sep:
        # An empty disk: qemu-img prints one zero-length entry, so a
        # comparison of the two maps must not need a special case.
        out.write('{"start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}')
    out.write("]\n")


def _write_human(chain: Chain, out: TextIO) -> None:
    out.write(f"{'Offset':>20}  {'Length':>20}  {'Depth':>5}  Kind\n")
    for p in chain.pieces():
        d = p.depth
        lines = (
            f"{s:#20x}  {e - s:#20x}  {d:>5}  {_HUMAN_KIND[k]}\n"
            for s, e, k in zip(p.starts, p.ends, p.kinds)
        )
        out.write("".join(lines))
