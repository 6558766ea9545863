"""`flatfs serve`: the flattened chain as a read-only NBD export through nbdkit (see nbd/launch.py)."""

from __future__ import annotations

import click

from ..chain import OpenOptions
from .common import chain_options


@click.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Listen on this Unix socket (default: one in a new private folder, printed).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Listen on this TCP port.")
@click.option("--address", default=None, help="Listen on this address only (TCP; default port 10809).")
@click.option("--export-name", default="", help="The export's name (default: the empty name).")
@click.option(
    "--tls-certificates",
    type=click.Path(file_okay=False),
    default=None,
    help="Require TLS with the X.509 certificates in DIR (nbdkit --tls=require).",
)
@click.option(
    "--tls-psk", type=click.Path(dir_okay=False), default=None, help="Require TLS with this PSK file."
)
@click.option("--foreground", is_flag=True, help="Stay in the foreground (for systemd).")
@click.option("--run", "run_cmd", default=None, metavar="CMD", help="Run CMD against $uri, then stop.")
@click.option(
    "--pid-file", type=click.Path(dir_okay=False), default=None, help="Write the server's pid here."
)
@chain_options()
def serve(
    image: str,
    socket_path: str | None,
    port: int | None,
    address: str | None,
    export_name: str,
    tls_certificates: str | None,
    tls_psk: str | None,
    foreground: bool,
    run_cmd: str | None,
    pid_file: str | None,
    options: OpenOptions,
) -> None:
    """Serve IMAGE's flattened chain read-only over NBD (nbdkit); print the URI.

    Manual: flatfs-serve(1).
    """
    from ..nbd.launch import ServeRequest
    from ..nbd.launch import serve as do_serve

    rc = do_serve(
        ServeRequest(
            image=image,
            options=options,
            socket=socket_path,
            port=port,
            address=address,
            export_name=export_name,
            tls_certificates=tls_certificates,
            tls_psk=tls_psk,
            foreground=foreground,
            run=run_cmd,
            pid_file=pid_file,
        )
    )
    if rc:
        raise SystemExit(rc)
