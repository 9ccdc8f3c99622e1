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


class InvalidRange(AzureError):
    """A read (Get Blob) that starts at or past the end of the blob."""

    code = "InvalidRange"
    status = 416


class InvalidHeaderValue(AzureError):
    """A blob size that is not a multiple of 512 or is out of range, a 0-byte
    page write, a lease duration out of range."""

    code = "InvalidHeaderValue"


class InvalidResourceName(AzureError):
    """A blob name that is empty, longer than 1,024 characters or holds NUL."""

    code = "InvalidResourceName"


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


class SnapshotsPresent(AzureError):
    """Deleting a blob that has snapshots without saying what to do with them."""

    code = "SnapshotsPresent"
    status = 409


class PreviousSnapshotNotFound(AzureError):
    """A diff whose base snapshot does not exist."""

    code = "PreviousSnapshotNotFound"
    status = 409


class PreviousSnapshotCannotBeNewer(AzureError):
    """A diff whose base snapshot is newer than its target."""

    code = "PreviousSnapshotCannotBeNewer"


class LeaseAlreadyPresent(AzureError):
    code = "LeaseAlreadyPresent"
    status = 409


class LeaseIdMismatch(AzureError):
    """A write or lease change named a lease other than the blob's."""

    code = "LeaseIdMismatchWithBlobOperation"
    status = 412


class LeaseNotPresentWithBlobOperation(AzureError):
    """A write named a lease and the blob has none."""

    code = "LeaseNotPresentWithBlobOperation"
    status = 412


class LeaseLost(AzureError):
    """A write named the blob's lease after it expired."""

    code = "LeaseLost"
    status = 412


class LeaseIdMismatchWithLeaseOperation(AzureError):
    """A lease release or change named a lease other than the blob's."""

    code = "LeaseIdMismatchWithLeaseOperation"
    status = 409


class LeaseNotPresentWithLeaseOperation(AzureError):
    """A lease release, change or break on a blob that has no lease."""

    code = "LeaseNotPresentWithLeaseOperation"
    status = 409


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


class ComputeError(StampError):
    """A request the Azure Compute (managed disk) API would refuse; `code` and
    `status` are its error code and HTTP status, and the message starts with
    the code."""

    code = "BadRequest"
    status = 400

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"{self.code}: {message}")


DiskRequestError = ComputeError  # the name stamp/performance.py's callers know


class BadRequest(ComputeError):
    """Provisioned IOPS or MB/s out of the range the disk's type and size allow."""

    code = "BadRequest"


class InvalidParameter(ComputeError):
    """A setting the disk's type does not take (a tier on an Ultra disk, IOPS on a
    Premium SSD), or a tier the disk's size does not allow."""

    code = "InvalidParameter"


class InvalidVhd(ComputeError):
    """An uploaded disk whose blob is not a fixed VHD of the declared size."""

    code = "InvalidVhd"


class OperationNotAllowed(ComputeError):
    """A disk operation its state forbids (a grant on an attached disk, an
    attach or a delete while a SAS is active), or a change made too soon (a
    tier downgrade within 12 hours of the last, a fifth performance change of
    an Ultra or Premium SSD v2 disk in 24 hours)."""

    code = "OperationNotAllowed"
    status = 409


class ContainerNotFound(AzureError):
    code = "ContainerNotFound"
    status = 404


class ContainerAlreadyExists(AzureError):
    code = "ContainerAlreadyExists"
    status = 409


class InvalidContainerName(AzureError):
    """A container name that is not 3 to 63 lower-case letters, digits and
    single hyphens, starting and ending with a letter or digit."""

    code = "InvalidResourceName"


class AuthorizationFailure(AzureError):
    """An operation the stamp keeps for itself: creating, deleting or
    listing the blobs of the managed-disk resources' containers."""

    code = "AuthorizationFailure"
    status = 403


class LeaseIsBreakingAndCannotBeAcquired(AzureError):
    code = "LeaseIsBreakingAndCannotBeAcquired"
    status = 409


class LeaseIsBreakingAndCannotBeChanged(AzureError):
    code = "LeaseIsBreakingAndCannotBeChanged"
    status = 409


class LeaseIsBrokenAndCannotBeRenewed(AzureError):
    code = "LeaseIsBrokenAndCannotBeRenewed"
    status = 409
