"""`flatfs serve`: the flattened chain as a read-only NBD export, served by nbdkit.

flatfs writes no NBD server. nbdkit (its Python plugin) runs ``plugin.py``, a
thin glue over :class:`export.Export`, which answers reads and block status
from the chain's one read path and one composer. ``launch.py`` checks that
nbdkit and its Python plugin are there and builds nbdkit's command line.
No FUSE and no click here.
"""
