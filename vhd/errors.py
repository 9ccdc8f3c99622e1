"""The closed set of errors the vhd package raises.

Every failure caused by the bytes of an image, by a missing or wrong parent,
or by a bad request is one of these; a struct.error, IndexError or
UnicodeError escaping the package is a bug.
"""

from __future__ import annotations


class VhdError(Exception):
    """Base class: anything wrong with an image or a request made of it."""


class FormatError(VhdError):
    """A structure in the file is malformed; names the field and its offset."""

    def __init__(self, what: str, field: str, offset: int, detail: str) -> None:
        self.what, self.field, self.offset, self.detail = what, field, offset, detail
        super().__init__(f"{what}: bad {field} at offset {offset}: {detail}")


class FileTypeError(VhdError):
    """A path names a FIFO, a directory, a socket or a symlink loop, not an image file."""


class ChecksumError(FormatError):
    """A footer or dynamic header checksum does not match its bytes."""


class ParentError(VhdError):
    """A differencing image's parent cannot be found or does not match."""


class ParentNotFoundError(ParentError):
    """No locator, name or resolver led to an existing parent file."""


class ParentMismatchError(ParentError):
    """A candidate parent exists but its UUID or timestamp differs."""


class ParentLoopError(ParentError):
    """The chain of parents comes back to an image already in it."""


class ParentOutsideError(ParentError):
    """A locator points outside the folders the caller allows parents in."""


class RangeError(VhdError):
    """A read, write or discard reaches outside the virtual disk."""


class ReadOnlyError(VhdError):
    """A write was attempted on an image opened read-only."""


class BusyError(VhdError):
    """Another process holds the image (an exclusive lock could not be had)."""


class UsageError(VhdError):
    """A request that can never succeed: bad size, block size or option."""
