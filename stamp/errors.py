"""The stamp's errors. Page blob rule violations carry the Azure Storage
error code name (`code`), as the REST API would return it; everything else is
a StampError with a one-line message."""

from __future__ import annotations


class StampError(Exception):
    """Base class for everything the stamp raises on purpose."""


class AzureError(StampError):
    """A request the Azure page blob API would refuse; `code` is its error code."""

    code = "InvalidOperation"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.code}: {message}")


class InvalidPageRange(AzureError):
    """Offset or length not a multiple of 512, or outside the blob."""

    code = "InvalidPageRange"
    status = 416


class RequestBodyTooLarge(AzureError):
    """More than 4 MiB in one page write."""

    code = "RequestBodyTooLarge"
    status = 413


class InvalidHeaderValue(AzureError):
    """A blob size that is not a multiple of 512 or is out of range."""

    code = "InvalidHeaderValue"


class BlobNotFound(AzureError):
    code = "BlobNotFound"
    status = 404


class BlobAlreadyExists(AzureError):
    code = "BlobAlreadyExists"
    status = 409


class SnapshotNotFound(AzureError):
    """Azure answers BlobNotFound for a missing snapshot; the class says which."""

    code = "BlobNotFound"
    status = 404


class LeaseAlreadyPresent(AzureError):
    code = "LeaseAlreadyPresent"
    status = 409


class LeaseIdMismatch(AzureError):
    """A write or lease change named a lease other than the blob's."""

    code = "LeaseIdMismatchWithBlobOperation"
    status = 412


class LeaseIdMissing(AzureError):
    """The blob is leased and the request named no lease."""

    code = "LeaseIdMissing"
    status = 412


class NotEnoughNodes(StampError):
    """Fewer healthy extent nodes in distinct fault domains than replicas."""


class DataLost(StampError):
    """No replica holds a good copy of a record (all corrupt or gone)."""


class CorruptStamp(StampError):
    """Metadata that cannot be right (check() names what)."""


class MetadataFull(StampError):
    """The disk holding the stamp's metadata has no space for it to grow."""
