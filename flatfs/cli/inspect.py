"""`flatfs info` and `flatfs map`: the chain's facts and its flattened map."""

from __future__ import annotations

import json
import sys

import click

from ..chain import OpenOptions, open_chain
from ..extents import Kind
from .common import chain_options, human_size


@click.command()
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@chain_options()
def info(image: str, output: str, options: OpenOptions) -> None:
    """Describe IMAGE and its backing chain, top first. Manual: flatfs(1)."""
    from .info import chain_info

    with open_chain(image, options) as chain:
        rows = chain_info(chain)
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
        if "cluster-size" in r:
            click.echo(f"    cluster size:  {r['cluster-size']}")
        if "compat" in r:
            click.echo(f"    compat:        {r['compat']}")
        if r.get("backing-filename"):
            fmt = r.get("backing-filename-format") or "(not recorded)"
            click.echo(f"    backing file:  {r['backing-filename']} (format: {fmt})")
        if r.get("features"):
            click.echo(f"    features:      {', '.join(r['features'])}")
        for key, value in r.items():
            if key not in _SHOWN:
                _echo_extra(key, value)


# Keys printed above, or left to --output json; any other key a layer reports is printed generically
_SHOWN = frozenset(
    "depth filename format virtual-size actual-size cluster-size compat backing-filename "
    "backing-filename-format full-backing-filename features compression-type refcount-bits "
    "snapshots data-file".split()
)


def _echo_extra(key: str, value: object) -> None:
    label = key.replace("-", " ") + ":"
    if isinstance(value, dict):
        click.echo(f"    {label}")
        for k, v in value.items():
            click.echo(f"        {k}: {v}")
    elif isinstance(value, (list, tuple)):
        click.echo(f"    {label:<14} {', '.join(map(str, value))}")
    else:
        click.echo(f"    {label:<14} {value}")


@click.command("map")
@click.argument("image", type=click.Path())
@click.option("--output", type=click.Choice(["human", "json"]), default="human")
@chain_options()
def map_(image: str, output: str, options: OpenOptions) -> None:
    """Print the flattened allocation map of IMAGE's chain. Manual: flatfs(1)."""
    with open_chain(image, options) as chain:
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
