"""Open an image and its chain of parents, under one policy.

Every file a chain reads is opened here: the top image, each parent a layer
names through its :class:`ParentRef`, and each related file a format asks
for (a qcow2 data file, a VMDK extent). One policy applies to all of them:
the ``--backing-dir`` fence, no special files unless allowed, no URLs,
probing (raw only when allowed), a depth limit, loop detection, parent
identity checks, and QEMU's image locks. A file an image names as raw data
(a FLAT extent, a raw backing file, a qcow2 data file) must not look like a
host text file (``--allow-text-data`` reads one).
"""

from __future__ import annotations

import errno
import ntpath
import os
import re
import stat
from typing import NamedTuple

from ..errors import (
    ChainError,
    FlatfsError,
    ImageIOError,
    MissingParent,
    ParentMismatch,
    UnsupportedImage,
)
from ..formats import lookup, probe, probe_tail
from ..formats.api import PROBE_SIZE, TAIL_SIZE, Format, Layer, ParentRef
from ..hostio import host_size, lock_shared_readonly
from .compose import Chain, LayerFacts
from .files import TEXT_PROBE, identity, looks_like_text, open_checked, open_regular, room_for, scan_head

# A chain deeper than this is refused unless --max-depth says otherwise. QEMU
# sets no limit; incremental-backup chains reach hundreds of images, and a
# hostile image set could otherwise make us open files without end.
MAX_CHAIN_DEPTH = 1000

# File descriptors kept free beyond the chain's own (FUSE, pools, the target)
_SPARE_FDS = 64

# The whole chain, all layers and extents together, holds at most this many
# extent files and this many bytes of tables decoded at open (grain
# directories, block tables). A hostile descriptor can name one file many
# times; each would otherwise bring its own copy of a table it lies about.
MAX_CHAIN_EXTENTS = 4096
MAX_CHAIN_TABLES = 256 << 20

# whitespace a text file may hold besides printable characters

# Files a search for a parent by identity reads the head of, per folder, at most
MAX_SCAN_FILES = 4096

# A name with a scheme ("nbd://", "http://", "json:{...}") is not a local file
_URL = re.compile(r"^(json:|[A-Za-z][A-Za-z0-9+.-]*://)")
_WINDOWS = re.compile(r"^([A-Za-z]:|\\\\|\.\\)|\\")


class OpenOptions(NamedTuple):
    """How to open a chain. The defaults are the safe ones."""

    format: str | None = None  # format of the top image; None = probe
    backing_dir: str | None = None  # refuse backing/data files that resolve outside it
    no_backing: bool = False  # show the top layer alone
    allow_probe_raw: bool = False  # let an unrecorded backing format be probed as raw
    allow_special: bool = False  # allow backing/data files that are devices or FIFOs
    force_share: bool = False  # skip QEMU-compatible image locking
    ignore_parent_id: bool = False  # read a parent whose identity does not match the child's record
    search_dirs: tuple[str, ...] = ()  # more folders to search for a parent named by identity
    max_depth: int = MAX_CHAIN_DEPTH
    readahead: bool = True  # False: POSIX_FADV_RANDOM on every file, before its first read
    snapshot: str | None = None  # -l: read the top image at this internal snapshot (ID or name)
    allow_text_data: bool = False  # read raw data an image names even if it looks like a text file


class Opener:
    """Opens host files for one chain under the policy in OpenOptions; owns every fd.

    It is the :class:`~flatfs.formats.api.OpenContext` formats see.
    """

    def __init__(self, options: OpenOptions) -> None:
        self.options = options
        self.fds: list[int] = []
        # child path -> how its parent was found: "name" (a name the child
        # records, or a registry names) or "search by <kind>" (a folder scan)
        self.found_by: dict[str, str] = {}
        # child path -> the recorded name that found its parent
        self.resolved_from: dict[str, str] = {}
        self.top: str | None = None  # the top image's path, once open_chain names it
        self.snapshot_taken = False  # a format asked for options.snapshot
        self.extents = 0  # files opened through open_related, over the whole chain
        self.tables = 0  # bytes charged by the layers, over the whole chain
        self.by_file: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> its one fd
        # path -> what probing saw beyond the head (a fixed VHD's footer), for info
        self.probe_notes: dict[str, str] = {}

    # -- names -----------------------------------------------------------------
    @staticmethod
    def check_local(referrer: str, name: str, what: str) -> None:
        if _URL.match(name):
            raise UnsupportedImage(referrer, f"{what} {name!r} is not a local file")

    def resolve(self, referrer: str, name: str, what: str) -> str:
        """A name as QEMU resolves it: absolute, or relative to the referrer's folder."""
        self.check_local(referrer, name, what)
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(referrer), name)

    def candidates(self, referrer: str, ref: ParentRef, what: str) -> list[tuple[str, str]]:
        """The paths to try for ``ref``, in order, without duplicates, each with the recorded
        name it comes from (for ``info``: which name found the parent)."""
        folder = os.path.dirname(referrer)
        out: list[tuple[str, str]] = []
        for name in ref.candidates:
            if not name:
                continue
            self.check_local(referrer, name, what)
            if ref.loose and _WINDOWS.search(name):
                # A Windows path: drive letters and UNC hosts mean nothing here;
                # a relative one (.\sub\disk.vhd) is relative to the child.
                drive, rest = ntpath.splitdrive(name)
                parts = [p for p in rest.replace("\\", "/").split("/") if p not in ("", ".")]
                if drive or rest.startswith(("\\", "/")):
                    parts = parts[-1:]
                if parts:
                    out.append((os.path.join(folder, *parts), name))
            else:
                out.append((self.resolve(referrer, name, what), name))
        if ref.loose:
            for name in ref.candidates:
                bare = ntpath.basename(name.replace("/", "\\"))
                if bare:
                    out.append(
                        (os.path.join(folder, bare), f"{bare} (the bare file name, in the image's folder)")
                    )
        first = dict(reversed(out))  # path -> the first name that gives it
        return [(p, first[p]) for p in dict.fromkeys(p for p, _ in out)]

    def inside_fence(self, path: str) -> bool:
        """True when ``path`` resolves (symlinks included) inside --backing-dir, or there is none."""
        bdir = self.options.backing_dir
        if bdir is None:
            return True
        root = os.path.realpath(bdir)
        return os.path.commonpath([os.path.realpath(path), root]) == root

    def check_dir(self, referrer: str, path: str, what: str) -> None:
        if not self.inside_fence(path):
            raise ChainError(
                f"{referrer}: {what} {path!r} resolves to {os.path.realpath(path)!r}, "
                f"outside --backing-dir {self.options.backing_dir!r}"
            )

    # -- files -----------------------------------------------------------------
    def open(self, path: str, *, top: bool, referrer: str | None = None, what: str = "backing file") -> int:
        def check(st: os.stat_result) -> None:
            if stat.S_ISDIR(st.st_mode):
                raise ImageIOError(path, "is a directory")
            if self.options.allow_special:
                return
            # The user named the top image, so a block device is fine there; a file
            # an image names must be a regular file unless explicitly allowed.
            if top and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageIOError(path, "not a regular file or block device")
            if not top and not stat.S_ISREG(st.st_mode):
                raise ChainError(
                    f"{referrer}: {what} {path!r} is not a regular file "
                    "(use --allow-special to allow devices)"
                )

        room_for(len(self.fds) + _SPARE_FDS)
        try:
            fd = open_checked(path, check)
        except OSError as exc:
            if referrer is not None and exc.errno == errno.ENOENT:
                raise ChainError(f"{referrer}: {what} {path!r} not found") from None
            if exc.errno == errno.EMFILE:
                raise ChainError(
                    f"{path}: too many open files after {len(self.fds)} (raise the hard limit, ulimit -Hn)"
                ) from None
            raise ImageIOError.from_oserror(path, exc) from None
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise ImageIOError.from_oserror(path, exc) from None
        same = self.by_file.get((st.st_dev, st.st_ino))
        if same is not None:
            # A file named again (4096 extents of one file): one descriptor and one set of
            # locks, since every lock and close scans the locks a file's descriptors hold
            os.close(fd)
            return same
        self.by_file[st.st_dev, st.st_ino] = fd
        self.fds.append(fd)
        os.set_blocking(fd, True)
        if not self.options.readahead:
            # Before the first read: even the 4 KiB probe of the header would
            # otherwise start a readahead of several MiB. Readahead past a data
            # extent fills the page cache over the unwritten extents next to
            # it, and ext4's SEEK_DATA then reports those as data: reads through
            # a long-lived view would change what `qemu-img map` says about the
            # image, and stop matching the view's SEEK walk, computed at mount.
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        if not self.options.force_share:
            lock_shared_readonly(fd, path)
        return fd

    def open_related(self, referrer: str, name: str, what: str, raw_at: int | None = None) -> tuple[str, int]:
        """Open a file an image refers to (its data file, an extent), under the same policy;
        ``raw_at``: the file is raw data the image reads from that offset on."""
        path = self.resolve(referrer, name, what)
        self.check_dir(referrer, path, what)
        self.extents += 1
        if self.extents > MAX_CHAIN_EXTENTS:
            raise ChainError(
                f"{referrer}: the chain names more than {MAX_CHAIN_EXTENTS} extent and data files "
                "(MAX_CHAIN_EXTENTS)"
            )
        fd = self.open(path, top=False, referrer=referrer, what=what)
        if raw_at is not None:
            self.check_raw_data(referrer, path, fd, what, raw_at)
        return path, fd

    def check_raw_data(self, referrer: str, path: str, fd: int, what: str, at: int) -> None:
        """Refuse a file an image names as raw data when its first 4 KiB there look like a
        host text file (/etc/shadow named as a FLAT extent would be the disk's bytes, as in
        QEMU). Read once at open, before any read of the data; the message quotes nothing."""
        if self.options.allow_text_data:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or at >= st.st_size:
                return  # a device let through by --allow-special; or nothing there to read
            head = os.pread(fd, TEXT_PROBE, at)
        except OSError as exc:
            raise ImageIOError.from_oserror(path, exc, at) from None
        if looks_like_text(head):
            raise ChainError(
                f"{referrer}: {what} {path!r} looks like a text file, not disk data (refused: "
                "a hostile image can name a host file; --allow-text-data reads it)"
            )

    def charge(self, referrer: str, what: str, nbytes: int) -> None:
        self.tables += nbytes
        if self.tables > MAX_CHAIN_TABLES:
            raise ChainError(
                f"{referrer}: {what} would take the chain's tables past "
                f"{MAX_CHAIN_TABLES >> 20} MiB (MAX_CHAIN_TABLES)"
            )

    def read_sidecar(self, referrer: str, name: str, max_bytes: int) -> bytes | None:
        """A small file an image may consult (a .vbox registry), or None if it is refused or absent.

        The --backing-dir fence applies; anything but a regular file is
        skipped without being opened (a FIFO would block the open); a file
        larger than ``max_bytes`` is skipped rather than read.
        """
        try:
            path = self.resolve(referrer, name, "registry")
        except FlatfsError:
            return None
        if not self.inside_fence(path):
            return None
        fd = open_regular(path)
        if fd is None:
            return None
        try:
            if os.fstat(fd).st_size > max_bytes:
                return None
            out = bytearray()
            while len(out) <= max_bytes:
                chunk = os.pread(fd, max_bytes + 1 - len(out), len(out))
                if not chunk:
                    break
                out += chunk
        except OSError:
            return None
        finally:
            os.close(fd)
        return bytes(out) if len(out) <= max_bytes else None

    def snapshot_for(self, path: str) -> str | None:
        """options.snapshot for the top image, once; None for any other file."""
        if path != self.top or self.snapshot_taken:
            return None
        self.snapshot_taken = True
        return self.options.snapshot

    def close(self) -> None:
        self.by_file.clear()
        while self.fds:
            try:
                os.close(self.fds.pop())
            except OSError:
                pass


def _head(path: str, fd: int) -> bytes:
    try:
        return os.pread(fd, PROBE_SIZE, 0)
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc) from None


def open_layer(
    path: str, fmt: str | None, opener: Opener, *, top: bool, referrer: str | None = None
) -> Layer:
    """Open one image file as a layer, probing its format when ``fmt`` is None."""
    fd = opener.open(path, top=top, referrer=referrer)
    if fmt is None:
        fmt = probe(path, _head(path, fd))
        if fmt is None:
            fmt = _probe_tail(path, fd, opener)
        if fmt is None:
            if not top and not opener.options.allow_probe_raw:
                raise ChainError(
                    f"{referrer}: backing file {path!r} has no recorded format and does not look like "
                    "any image format; refusing to probe it as raw (use --allow-probe-raw)"
                )
            fmt = "raw"
    entry = lookup(fmt)
    if entry is None:
        raise UnsupportedImage(path, f"unknown or unsupported format {fmt!r}")
    if fmt == "raw" and not top:
        opener.check_raw_data(referrer or path, path, fd, "backing file", 0)
    return entry.open(path, fd, opener)


def _probe_tail(path: str, fd: int, opener: Opener) -> str | None:
    """A format known by its footer alone (a fixed VHD): taken when the file's name says so
    (``*.vhd``), else only noted for ``info``, as QEMU, which probes it as raw, would."""
    try:
        size = host_size(fd, path)
        tail = os.pread(fd, TAIL_SIZE, size - TAIL_SIZE) if size >= TAIL_SIZE else b""
    except OSError as exc:
        raise ImageIOError.from_oserror(path, exc) from None
    found = probe_tail(path, tail, size) if len(tail) == TAIL_SIZE else None
    if found is None:
        return None
    name, suffix = found
    if suffix is not None:
        opener.probe_notes[path] = f"recognised by the {name} footer at its end (its name ends in {suffix})"
        return name
    opener.probe_notes[path] = f"read as raw, but the file ends with a {name} footer: -f {name} reads it"
    return None


def _checkidentity(child: Layer, parent: Layer, ref: ParentRef, options: OpenOptions) -> None:
    if ref.identity is None or options.ignore_parent_id:
        return
    kind, want = ref.identity
    got = parent.identity(kind)
    if got != want:
        raise ParentMismatch(
            child.path,
            f"parent {parent.path} has {kind} {got or '(none)'}, but this image was made over "
            f"{kind} {want} (the parent changed since; use --ignore-parent-id to read it anyway)",
        )


def _search_by_id(child: str, ref: ParentRef, opener: Opener, what: str) -> str:
    """Find the one file whose header carries ``ref.by_id``, in the child's folder, the one
    above it and every --search-dir. Only regular files with the format's suffixes are read."""
    assert ref.by_id is not None
    kind, want = ref.by_id
    fmt: Format | None = lookup(ref.format) if ref.format else None
    if fmt is None or fmt.identify is None:
        raise ChainError(f"{child}: cannot search for a parent of format {ref.format!r} by {kind}")
    folder = os.path.dirname(os.path.abspath(child))
    folders = list(dict.fromkeys([folder, os.path.dirname(folder), *opener.options.search_dirs]))
    me = os.path.realpath(child)
    found: list[str] = []
    suffixes = tuple(x.lower() for x in fmt.suffixes) or ("",)
    for d in folders:
        try:
            with os.scandir(d) as it:
                names = sorted(e.name for e in it if e.name.lower().endswith(suffixes))
        except OSError:
            continue
        for name in names[:MAX_SCAN_FILES]:
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or os.path.realpath(path) == me:
                continue  # a FIFO or a device is never opened: the open could block
            head = scan_head(path)
            if head is not None and fmt.probe(head) and fmt.identify(head).get(kind) == want:
                found.append(path)
    found = list(dict.fromkeys(os.path.realpath(p) for p in found))
    if not found:
        raise MissingParent(child, f"{what} with {kind} {want}", folders)
    if len(found) > 1:
        raise ChainError(
            f"{child}: {what} with {kind} {want} is ambiguous: both {found[0]} and {found[1]} have it"
        )
    return found[0]


def _search_paths(lay: Layer, ref: ParentRef, opener: Opener) -> list[tuple[str, str]]:
    """Where each --search-dir would hold the parent: the file name of each recorded
    name, in each folder, in the order given."""
    out: list[tuple[str, str]] = []
    for d in opener.options.search_dirs:
        for name in ref.candidates:
            bare = ntpath.basename(name.replace("/", "\\")) if ref.loose else os.path.basename(name)
            if bare:
                out.append((os.path.join(d, bare), f"{bare} (in --search-dir {d})"))
    return out


def _open_parent(lay: Layer, ref: ParentRef, opener: Opener) -> Layer:
    """The parent ``ref`` names: where the child records it, else by its file name in each
    --search-dir (its identity must then match), else, for a parent named by identity
    only, by a scan of the folders for it."""
    what = "backing file"
    named = opener.candidates(lay.path, ref, what)
    searched = _search_paths(lay, ref, opener)
    tried = list(dict.fromkeys(p for p, _ in named + searched))
    for i, (path, source) in enumerate(named + searched):
        from_search = i >= len(named)
        if not os.path.lexists(path):
            continue
        opener.check_dir(lay.path, path, what)
        parent = open_layer(path, ref.format, opener, top=False, referrer=lay.path)
        want = ref.by_id or (ref.identity if from_search and not opener.options.ignore_parent_id else None)
        if want is not None and parent.identity(want[0]) != want[1]:
            parent.close()
            continue  # a file of that name, but not the parent: keep looking
        opener.found_by[lay.path] = "name"
        opener.resolved_from[lay.path] = source
        return parent
    if ref.by_id is None:
        raise MissingParent(lay.path, f"{what} {ref.name!r}", tried)
    path = _search_by_id(lay.path, ref, opener, what)
    opener.check_dir(lay.path, path, what)
    parent = open_layer(path, ref.format, opener, top=False, referrer=lay.path)
    opener.found_by[lay.path] = f"search by {ref.by_id[0]}"
    return parent


def open_chain(path: str | os.PathLike[str], options: OpenOptions | None = None) -> Chain:
    """Open ``path`` and every parent below it."""
    chain, missing = open_partial_chain(path, options)
    if missing is not None:
        chain.close()
        raise missing
    return chain


def open_partial_chain(
    path: str | os.PathLike[str], options: OpenOptions | None = None
) -> tuple[Chain, MissingParent | None]:
    """Open ``path`` and every parent below it that can be found.

    A missing parent ends the chain early instead of failing it: the chain
    of what was resolved comes back with the :class:`MissingParent` error
    (for ``info``, which shows both). Every other error is raised.
    """
    options = options or OpenOptions()
    path = os.fspath(path)
    opener = Opener(options)
    layers: list[Layer] = []
    seen: dict[tuple[int, int], str] = {}
    missing: MissingParent | None = None
    try:
        opener.top = path
        lay = open_layer(path, options.format, opener, top=True)
        if options.snapshot is not None and not opener.snapshot_taken:
            lay.close()
            raise UnsupportedImage(path, f"{lay.format} images have no internal snapshots (-l/--snapshot)")
        while True:
            ident = identity(lay.host_files()[0].fd)
            if ident in seen:
                raise ChainError(f"{layers[-1].path}: backing chain loops back to {seen[ident]!r}")
            seen[ident] = lay.path
            if layers:
                _checkidentity(layers[-1], lay, layers[-1].parent, options)  # type: ignore[arg-type]
            layers.append(lay)
            ref = lay.parent
            if ref is None or options.no_backing:
                break
            if len(layers) >= options.max_depth:
                raise ChainError(
                    f"{path}: backing chain is deeper than {options.max_depth} images "
                    "(--max-depth N reads deeper chains)"
                )
            try:
                lay = _open_parent(lay, ref, opener)
            except MissingParent as exc:
                missing = exc
                break
    except FlatfsError:
        for done in layers:
            done.close()
        opener.close()
        raise
    except BaseException:
        opener.close()
        raise
    facts = tuple(
        LayerFacts(
            opener.found_by.get(lay.path),
            opener.resolved_from.get(lay.path),
            opener.probe_notes.get(lay.path),
        )
        for lay in layers
    )
    return Chain(tuple(layers), facts, opener.close), missing
