"""qcow2 support: importing this package registers the format."""

from . import layer  # noqa: F401
