"""The flatfs exception tree.

Every error a user can cause is a :class:`FlatfsError`. Each one formats
itself as a single line, ``<file>: <what> (at 0x<offset>)``, which is what the
CLI prints. Anything that is not a FlatfsError is a bug.
"""

from __future__ import annotations

import errno as _errno
import os


class FlatfsError(Exception):
    """Base of every error flatfs raises on purpose."""

    errno: int = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ImageError(FlatfsError):
    """Something is wrong with one image file."""

    def __init__(self, path: str | os.PathLike[str], reason: str, offset: int | None = None) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.offset = offset
        text = f"{self.path}: {reason}"
        if offset is not None:
            text += f" (at 0x{offset:x})"
        super().__init__(text)


class CorruptImage(ImageError):
    """The image violates its format's specification."""


class UnsupportedImage(ImageError):
    """A valid image that uses a feature flatfs does not implement."""

    errno = _errno.EOPNOTSUPP


class ParentMismatch(ImageError):
    """A parent's recorded identity (VMDK CID, VHD/VHDX/VDI UUID) is not the one the child names."""


class ImageIOError(ImageError):
    """The host file could not be opened or read."""

    @classmethod
    def from_oserror(
        cls, path: str | os.PathLike[str], exc: OSError, offset: int | None = None
    ) -> ImageIOError:
        err = cls(path, exc.strerror or str(exc), offset)
        err.errno = exc.errno or _errno.EIO
        return err


class ChainError(FlatfsError):
    """The backing chain cannot be assembled (loop, too deep, refused file)."""


class MountError(FlatfsError):
    """Mounting or unmounting failed."""


class ConvertError(FlatfsError):
    """A conversion cannot be carried out (target exists, target in chain, ...)."""


class ServeError(FlatfsError):
    """An NBD export cannot be started (nbdkit or its Python plugin missing, a bad option)."""


class MissingParent(ChainError):
    """A parent is neither where its child records it nor in any --search-dir.

    ``looked_for`` says what was sought (a file name, or an identity), ``tried``
    every path or folder looked in, in order.
    """

    def __init__(self, child: str, looked_for: str, tried: list[str] | tuple[str, ...]) -> None:
        self.child = child
        self.looked_for = looked_for
        self.tried = tuple(tried)
        super().__init__(
            f"{child}: {looked_for} not found (looked in {', '.join(self.tried) or 'no folder'}); "
            "name its folder with --search-dir DIR, or read this image alone with --no-backing"
        )
