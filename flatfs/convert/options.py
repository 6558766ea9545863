"""What a conversion is asked to do (ConvertOptions, checked up front) and what it did (Summary)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .. import formats
from ..errors import ConvertError
from ..formats.api import OptionValue, TargetWriter, WriterOption
from .capability import qcow2_writer

DEFAULT_SPARSE_SIZE = 4096  # qemu-img's default -S
# qemu-img's -o keys of qcow2, and the ConvertOptions field each one sets (today's flags stay)
QCOW2_KEYS = {
    "compat": "compat",
    "cluster_size": "cluster_size",
    "extended_l2": "extended_l2",
    "compression_type": "compression_type",
}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(ConvertError):
    """Options that do not go together, or a bad option value: the CLI exits 2 for it."""


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
    target_options: tuple[tuple[str, str], ...] = ()  # -o KEY=VALUE of a writer format, as given
    platform: str | None = None  # --for: a profile (convert/profiles.py) fixing format, options, size
    size_align: int = 1  # the target's virtual size rounded up to a multiple of this (from --for)
    package: str | None = None  # "tar.gz": disk.raw in a GNU sparse tar, gzipped (from --for gcp)
    target_cache: str = "writeback"  # -t: "writeback" (the page cache) or "none" (O_DIRECT)


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


def target_writer(name: str) -> TargetWriter | None:
    """The writer capability of target format ``name`` (None for qcow2, whose writer is its ``target``)."""
    fmt = formats.lookup(name)
    return fmt.writer() if fmt is not None and fmt.writer is not None else None


def split_options(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``-o`` arguments (each ``KEY=VALUE[,KEY=VALUE...]``, a bare KEY meaning ``on``) as pairs."""
    out: list[tuple[str, str]] = []
    for arg in values:
        for item in arg.split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            out.append((key.strip(), value.strip() if eq else "on"))
    return tuple(out)


def parse_size(text: str) -> int | None:
    """A byte count as qemu-img takes it (512, 64k, 2M, 2MiB), or None."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtTbB]?)(?:i?[bB])?\s*", text)
    return int(m.group(1)) * _UNITS[m.group(2).lower()] if m else None


def _value(fmt: str, opt: WriterOption, text: str) -> OptionValue:
    if opt.choices:
        if text not in opt.choices:
            raise UsageError(f"-o {opt.key}: {text!r} is not one of {', '.join(opt.choices)} (-O {fmt})")
        return text
    if opt.size:
        n = parse_size(text)
        if n is None:
            raise UsageError(f"-o {opt.key}: {text!r} is not a size (examples: 512, 64k, 2M)")
        return n
    if isinstance(opt.default, bool):
        if text not in ("on", "off"):
            raise UsageError(f"-o {opt.key}: {text!r} is not on or off")
        return text == "on"
    return text


def writer_values(fmt: str, writer: TargetWriter, pairs: Sequence[tuple[str, str]]) -> dict[str, OptionValue]:
    """The writer's option values: its defaults, overridden by ``-o``; unknown keys refused."""
    known = {o.key: o for o in writer.options}
    values: dict[str, OptionValue] = {o.key: o.default for o in writer.options}
    for key, text in pairs:
        opt = known.get(key)
        if opt is None:
            if not known:
                raise UsageError(f"-o {key}: -O {fmt} has no -o options")
            keys = ", ".join(known)
            raise UsageError(f"-o {key}: unknown option of -O {fmt} (its keys: {keys}; -o help lists them)")
        values[key] = _value(fmt, opt, text)
    if writer.check is not None:
        writer.check(values)
    return values


def options_help(fmt: str) -> list[str]:
    """The lines ``-o help`` prints for target format ``fmt``: each key and its values, then what it does."""
    writer = target_writer(fmt)
    if writer is not None and not writer.options:
        return [f"-O {fmt} has no -o options"]
    if writer is None:
        if fmt != "qcow2":
            return [f"-O {fmt} has no -o options"]
        keys = [
            ("compat=0.10|1.1", "qcow2 version (default 1.1; also --compat)"),
            ("cluster_size=SIZE", "512 to 2M (default 64k; also --cluster-size)"),
            ("extended_l2=on|off", "32 subclusters per cluster (also --extended-l2)"),
            ("compression_type=zlib|zstd", "with -c (also --compression-type)"),
        ]
    else:
        keys = []
        for o in writer.options:
            if o.choices:
                kind = "|".join(o.choices)
            elif o.size:
                kind = "SIZE"
            elif isinstance(o.default, bool):
                kind = "on|off"
            else:
                kind = "TEXT"
            keys.append((f"{o.key}={kind}", o.help))
    return [line for key, what in keys for line in (key, f"    {what}")]


def with_platform(opts: ConvertOptions) -> ConvertOptions:
    """``--for``'s profile applied: its format, its ``-o`` options, its size rule and packaging.

    ``-O`` left at its default (qcow2, never a profile's format) takes the profile's; any other
    ``-O``, or an ``-o`` key the profile fixes to another value, is refused.
    """
    if opts.platform is None:
        return opts
    from .profiles import lookup, names

    prof = lookup(opts.platform)
    if prof is None:
        raise UsageError(f"--for {opts.platform}: not a platform (one of {', '.join(names())})")
    if opts.target_format not in ("qcow2", prof.format):
        raise UsageError(f"--for {prof.name} writes -O {prof.format}; it contradicts -O {opts.target_format}")
    fixed = dict(prof.options)
    for key, value in opts.target_options:
        if key in fixed and fixed[key] != value:
            raise UsageError(f"--for {prof.name} sets -o {key}={fixed[key]}; it contradicts -o {key}={value}")
    given = {k for k, _ in opts.target_options}
    extra = tuple(kv for kv in prof.options if kv[0] not in given)
    return opts._replace(
        target_format=prof.format,
        target_options=extra + opts.target_options,
        size_align=prof.align,
        package=prof.package,
        platform=None,
    )


def with_qcow2_keys(opts: ConvertOptions) -> ConvertOptions:
    """qcow2's ``-o`` keys folded into the flags they mean (a flag given too must agree)."""
    if opts.target_format != "qcow2" or not opts.target_options:
        return opts
    changes: dict[str, Any] = {}
    for key, text in opts.target_options:
        name = QCOW2_KEYS.get(key)
        if name is None:
            raise UsageError(f"-o {key}: unknown option of -O qcow2 (its keys: {', '.join(QCOW2_KEYS)})")
        value: Any = text
        if key == "cluster_size":
            value = parse_size(text)
            if value is None:
                raise UsageError(f"-o cluster_size: {text!r} is not a size (examples: 512, 64k, 2M)")
        elif key == "extended_l2":
            if text not in ("on", "off"):
                raise UsageError(f"-o extended_l2: {text!r} is not on or off")
            value = text == "on"
        changes[name] = value
    return opts._replace(target_options=(), **changes)


def validate(opts: ConvertOptions) -> ConvertOptions:
    """Refuse options that do not go together, before any file is opened (a :class:`UsageError`).

    Returns the options to convert with (qcow2's ``-o`` keys folded into their flags).
    """
    try:
        opts = with_qcow2_keys(with_platform(opts))
        _validate(opts)
        return opts
    except UsageError:
        raise
    except ConvertError as exc:  # a bad value found by a writer (a cluster size...)
        raise UsageError(str(exc)) from None


def _validate(opts: ConvertOptions) -> None:
    fmt = opts.target_format
    writer = target_writer(fmt)
    if fmt != "qcow2" and writer is None:
        raise UsageError(f"-O {fmt}: not a format flatfs writes")
    _validate_common(opts)
    if opts.package is not None:
        for what, asked in (("-n/--no-create", opts.no_create), ("-C/--copy-offload", opts.copy_offload)):
            if asked:
                raise UsageError(f"{what}: --for gcp writes a new archive; it cannot do it")
    if writer is not None:
        _validate_writer(opts, writer)
        return
    if opts.compat not in (None, "0.10", "1.1"):
        raise UsageError(f"--compat must be 0.10 or 1.1, not {opts.compat!r}")
    if opts.compression_type not in (None, "zlib", "zstd"):
        raise UsageError(f"unknown compression type {opts.compression_type!r}")
    writer_class = qcow2_writer()
    cs = opts.cluster_size or writer_class.DEFAULT_CLUSTER_SIZE
    writer_class.check_cluster_size(cs)
    version = 2 if opts.compat == "0.10" else 3
    writer_class.check_options(cs, version, opts.extended_l2, opts.compression_type or "zlib", "TARGET")
    if opts.backing_format is not None and not opts.backing:
        raise UsageError("-F/--backing-format needs -B/--backing")


def _validate_common(opts: ConvertOptions) -> None:
    if opts.target_cache not in ("writeback", "none"):
        raise UsageError(f"-t/--target-cache must be writeback or none, not {opts.target_cache!r}")
    if opts.target_cache == "none" and opts.no_create:
        raise UsageError("-t none writes a new TARGET past the page cache; -n writes in place through it")
    if opts.target_is_zero and not opts.no_create:
        raise UsageError("--target-is-zero needs -n (it describes an existing target)")
    if opts.no_create and opts.force:
        raise UsageError("-n writes into TARGET in place and replaces nothing; --force does not apply")
    if opts.copy_offload and opts.compress:
        raise UsageError("-C/--copy-offload copies data as it lies; it cannot compress it (-c)")
    if opts.copy_offload and opts.backing:
        raise UsageError(
            "-C/--copy-offload does not read the data, and -B/--backing needs it to compare with BACKING"
        )
    if opts.sparse_size < 0 or opts.sparse_size % 512:
        raise UsageError(f"--sparse-size must be 0 or a multiple of 512, not {opts.sparse_size}")


def _validate_writer(opts: ConvertOptions, writer: TargetWriter) -> None:
    fmt = opts.target_format
    abilities: tuple[tuple[str, object, Callable[[TargetWriter], bool]], ...] = (
        ("-B/--backing", opts.backing, lambda w: w.backing),
        ("-n/--no-create", opts.no_create, lambda w: w.in_place),
        ("-c/--compress", opts.compress, lambda w: w.compression),
        ("-C/--copy-offload", opts.copy_offload, lambda w: w.copy is not None),
    )
    for flag, given, can in abilities:
        if given and not can(writer):
            able = ["qcow2"]  # its writer can do each of them
            able += [f.name for f in formats.FORMATS if f.writer is not None and can(f.writer())]
            raise UsageError(f"{flag} needs a {' or '.join(able)} target (-O {fmt} cannot do it)")
    qcow2_only: tuple[tuple[str, object], ...] = (
        ("--extended-l2", opts.extended_l2),
        ("--compat", opts.compat),
        ("--cluster-size", opts.cluster_size),
        ("--compression-type", opts.compression_type),
        ("-F/--backing-format", opts.backing_format),
    )
    for name, value in qcow2_only:
        if value:
            raise UsageError(f"{name} needs a qcow2 target (-O qcow2)")
    writer_values(fmt, writer, opts.target_options)
