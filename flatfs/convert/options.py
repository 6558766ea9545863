"""What a conversion is asked to do (ConvertOptions, checked up front) and what it did (Summary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import ConvertError
from .capability import qcow2_writer

DEFAULT_SPARSE_SIZE = 4096  # qemu-img's default -S
TARGET_FORMATS = ("qcow2", "raw")


class ConvertOptions(NamedTuple):
    target_format: str = "qcow2"  # "qcow2" or "raw"
    sparse_size: int = DEFAULT_SPARSE_SIZE  # 0: write every byte of the data extents
    compat: str | None = None  # "0.10" or "1.1" (default)
    cluster_size: int | None = None  # default 64 KiB
    compress: bool = False
    compression_type: str | None = None  # "zlib" (default) or "zstd"
    extended_l2: bool = False
    backing: str | None = None  # stored as given; resolved against TARGET's folder
    backing_format: str | None = None  # default: the backing image's own format
    force: bool = False  # overwrite an existing TARGET
    threads: int | None = None  # compression threads (default: CPUs, at most 8)
    no_create: bool = False  # -n: write into an existing file or block device, from byte 0
    target_is_zero: bool = False  # with -n: the target already reads as zeros; zero nothing
    copy_offload: bool = False  # -C: data runs copied by the kernel (copy_file_range), not read


@dataclass
class Summary:
    source: str
    target: str
    target_format: str
    virtual_size: int = 0
    data_read: int = 0  # bytes read from the source (and backing) chains
    bytes_written: int = 0  # bytes written to the target file
    zero_clusters_skipped: int = 0  # granules of data that were all zeros, not written
    granularity: int = 0  # size of those granules (cluster, or -S for raw)
    same_as_backing: int = 0  # clusters not written because they equal the backing
    data_clusters: int = 0
    compressed_clusters: int = 0
    zero_clusters: int = 0
    file_size: int = 0
    seconds: float = 0.0
    removed_stale: list[str] = field(default_factory=list)
    copied: int = 0  # -C: bytes the kernel copied (or shared), not counted in data_read
    zeroed: int = 0  # -n: bytes of the target made to read zeros
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "target": self.target,
            "format": self.target_format,
            "virtual-size": self.virtual_size,
            "data-read": self.data_read,
            "bytes-written": self.bytes_written,
            "zero-clusters-skipped": self.zero_clusters_skipped,
            "granularity": self.granularity,
            "seconds": round(self.seconds, 3),
            "copied": self.copied,
            "file-size": self.file_size,
        }
        if self.target_format == "qcow2":
            d.update(
                {
                    "data-clusters": self.data_clusters,
                    "compressed-clusters": self.compressed_clusters,
                    "zero-clusters": self.zero_clusters,
                    "same-as-backing-clusters": self.same_as_backing,
                }
            )
        return d


def validate(opts: ConvertOptions) -> None:
    """Refuse options that do not go together, before any file is opened."""
    if opts.target_format not in TARGET_FORMATS:
        raise ConvertError(f"unknown target format {opts.target_format!r}")
    if opts.target_is_zero and not opts.no_create:
        raise ConvertError("--target-is-zero needs -n (it describes an existing target)")
    if opts.no_create and opts.force:
        raise ConvertError("-n writes into TARGET in place and replaces nothing; --force does not apply")
    if opts.copy_offload and opts.compress:
        raise ConvertError("-C/--copy-offload copies data as it lies; it cannot compress it (-c)")
    if opts.copy_offload and opts.backing:
        raise ConvertError(
            "-C/--copy-offload does not read the data, and -B/--backing needs it to compare with BACKING"
        )
    if opts.sparse_size < 0 or opts.sparse_size % 512:
        raise ConvertError(f"--sparse-size must be 0 or a multiple of 512, not {opts.sparse_size}")
    if opts.target_format == "raw":
        for flag, given in (
            ("-c/--compress", opts.compress),
            ("-B/--backing", opts.backing),
            ("--extended-l2", opts.extended_l2),
            ("--compat", opts.compat),
            ("--cluster-size", opts.cluster_size),
            ("--compression-type", opts.compression_type),
        ):
            if given:
                raise ConvertError(f"{flag} needs a qcow2 target (-O qcow2)")
        return
    if opts.compat not in (None, "0.10", "1.1"):
        raise ConvertError(f"--compat must be 0.10 or 1.1, not {opts.compat!r}")
    writer = qcow2_writer()
    writer.check_cluster_size(opts.cluster_size or writer.DEFAULT_CLUSTER_SIZE)
    if opts.compression_type not in (None, "zlib", "zstd"):
        raise ConvertError(f"unknown compression type {opts.compression_type!r}")
    if opts.backing_format is not None and not opts.backing:
        raise ConvertError("-F/--backing-format needs -B/--backing")
