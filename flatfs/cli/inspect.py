"""`flatfs info` and `flatfs map`: the chain's facts and its flattened map."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from ..chain import OpenOptions, open_chain
from ..extents import Kind
from ..formats import lookup
from .common import chain_options, human_size


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, dict) for x in v):  # records (VMDK extents): one line each
            return "".join("\n        - " + ", ".join(f"{k}: {_value(y)}" for k, y in x.items()) for x in v)
        return ", ".join(str(x) for x in v)
    return str(v)


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
    options = dataclasses.replace(options, ignore_parent_id=True)
    with open_chain(image, options) as chain:
        rows = chain_info(chain)
        strips = [picture.strip(chain, d) for d in range(len(chain.layers))] if output == "human" else []
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for i, r in enumerate(rows):
        if i:
            click.echo("")
        click.echo(f"[{r['depth']}] {r['filename']}")
        click.echo(f"    format:        {r['format']}")
        click.echo(f"    virtual size:  {human_size(r['virtual-size'])} ({r['virtual-size']} bytes)")
        click.echo(f"    disk size:     {human_size(r['actual-size'])}")
        fmt_entry = lookup(r["format"])
        for key, label in fmt_entry.info_rows if fmt_entry is not None else ():
            if key in r:
                click.echo(f"    {label + ':':<14} {_value(r[key])}")
        if r.get("backing-filename"):
            fmt = r.get("backing-filename-format") or "(not recorded)"
            click.echo(f"    backing file:  {r['backing-filename']} (format: {fmt})")
        pid = r.get("parent-id")
        if pid is not None:
            verdict = (
                "matches" if pid["match"] else "MISMATCH: map, mount and convert refuse (--ignore-parent-id)"
            )
            click.echo(
                f"    parent id:     {pid['kind']} {pid['recorded']}, parent has {pid['found']}: {verdict}"
            )
        if r.get("features"):
            click.echo(f"    features:      {', '.join(r['features'])}")
        click.echo(f"    data map:      [{strips[i]}]")


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
            out = sys.stdout
            out.write("[")
            first = True
            for e in chain.extents():
                rec = {
                    "start": e.start,
                    "length": e.length,
                    "depth": e.depth,
                    "present": e.kind.present,
                    "zero": e.kind is not Kind.DATA,
                    "data": e.kind.is_data,
                }
                out.write(("" if first else ",\n") + json.dumps(rec))
                first = False
            if first:
                # An empty disk: qemu-img prints one zero-length entry, so a
                # comparison of the two maps must not need a special case.
                out.write(
                    json.dumps(
                        {"start": 0, "length": 0, "depth": 0, "present": False, "zero": False, "data": False}
                    )
                )
            out.write("]\n")
            return
        click.echo(f"{'Offset':>20}  {'Length':>20}  {'Depth':>5}  Kind")
        for e in chain.extents():
            what = {
                Kind.DATA: "data",
                Kind.ALLOC_ZERO: "data (reads as zeros)",
                Kind.ZERO: "zero",
                Kind.ABSENT: "unallocated (zeros)",
            }[e.kind]
            click.echo(f"{e.start:#20x}  {e.length:#20x}  {e.depth:>5}  {what}")
