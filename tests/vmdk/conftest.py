"""Fixtures of the VMDK tests: the FUSE ``mounter`` of tests/fuse."""

from ..fuse.conftest import mounter  # noqa: F401  (a fixture)
