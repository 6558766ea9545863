"""``--for PLATFORM``: each platform's published import rules, as data.

A profile names the target format, the ``-o`` options it fixes, a size rule
(the virtual size rounded up to a whole unit; the extra reads zeros), and
the source of those rules; ``docs/man/flatfs-convert.1`` cites them. A
profile never silently overrides the user: ``-O`` or an ``-o`` key that
contradicts it is refused (a usage error); ``-o`` keys it leaves open
(``adapter_type`` for vsphere...) stay the user's.
"""

from __future__ import annotations

from typing import NamedTuple

MiB, GiB = 1 << 20, 1 << 30


class Profile(NamedTuple):
    name: str
    format: str
    options: tuple[tuple[str, str], ...]
    align: int  # the virtual size is rounded up to a multiple of this (1: kept)
    package: str | None  # "tar.gz": disk.raw in a gzip-compressed GNU sparse tar
    source: str  # where the rules are published


PROFILES: tuple[Profile, ...] = (
    Profile(
        "azure",
        "vpc",
        (("subformat", "fixed"),),
        MiB,
        None,
        "Microsoft Learn, 'Prepare a Windows VHD or VHDX to upload to Azure': a fixed VHD whose "
        "virtual size is a whole number of MiB",
    ),
    Profile(
        "aws",
        "vmdk",
        (("subformat", "streamOptimized"),),
        1,
        None,
        "AWS VM Import/Export User Guide, 'Image formats': stream-optimized ESX VMDK",
    ),
    Profile(
        "vsphere",
        "vmdk",
        (("subformat", "streamOptimized"),),
        1,
        None,
        "VMware Virtual Disk Format 5.0, 'Stream-Optimized Compressed Sparse Extents' (OVF import)",
    ),
    Profile("hyperv", "vhdx", (("subformat", "dynamic"),), 1, None, "MS-VHDX 1.0; Hyper-V's default disk"),
    Profile(
        "virtualbox", "vdi", (("subformat", "dynamic"),), 1, None, "VirtualBox manual, 'Disk Image Files'"
    ),
    Profile(
        "gcp",
        "raw",
        (),
        GiB,
        "tar.gz",
        "Google Cloud, 'Manually import boot disks': disk.raw in a gzip-compressed tar "
        "(tar --format=oldgnu -Sczf), its size a whole number of GiB",
    ),
)


def names() -> tuple[str, ...]:
    return tuple(p.name for p in PROFILES)


def lookup(name: str) -> Profile | None:
    return next((p for p in PROFILES if p.name == name), None)
