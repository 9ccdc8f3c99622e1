"""stamp: a storage stamp on one machine.

The stream layer keeps append-only extents of checksummed records, each on 3
extent nodes in distinct fault domains; the partition layer keeps page blobs
(512-byte pages) as a range index in LMDB over those extents, with O(1)
snapshots and exact snapshot diffs. Imports vhd (the block device protocol);
never hostcache.

    st = stamp.Stamp.create("st")               # or Stamp.open("st")
    st.blobs.create("disk", 64 << 20)
    st.blobs.write("disk", 0, b"x" * 4096)
    snap = st.blobs.snapshot("disk")
    st.blobs.diff("disk", snap.id)              # Diff(written=[...], cleared=[...])
    with st.blob("disk", writable=True) as dev: # a vhd.BlockDevice
        dev.write(100, b"any offset")
"""

from .errors import (
                     AzureError,
                     BadRequest,
                     BlobAlreadyExists,
                     BlobNotFound,
                     CorruptStamp,
                     DataLost,
                     DiskRequestError,
                     InvalidHeaderValue,
                     InvalidPageRange,
                     InvalidRange,
                     InvalidResourceName,
                     LeaseAlreadyPresent,
                     LeaseIdMismatch,
                     LeaseIdMismatchWithLeaseOperation,
                     LeaseIdMissing,
                     LeaseLost,
                     LeaseNotPresentWithBlobOperation,
                     LeaseNotPresentWithLeaseOperation,
                     MetadataFull,
                     NotEnoughNodes,
                     OperationNotAllowed,
                     PreviousSnapshotCannotBeNewer,
                     PreviousSnapshotNotFound,
                     RequestBodyTooLarge,
                     SnapshotNotFound,
                     SnapshotsPresent,
                     StampError,
)
from .pageblob import Diff, PageBlobs, Snapshot
from .stamp import BlobDevice, CheckReport, Stamp

__all__ = [
    "AzureError", "BlobAlreadyExists", "BlobDevice", "BlobNotFound", "CheckReport", "CorruptStamp",
    "DataLost", "Diff", "InvalidHeaderValue", "InvalidPageRange", "LeaseAlreadyPresent",
    "LeaseIdMismatch", "LeaseIdMissing", "MetadataFull", "NotEnoughNodes", "PageBlobs", "RequestBodyTooLarge",
    "Snapshot", "SnapshotNotFound", "Stamp", "StampError",
    "InvalidRange", "InvalidResourceName", "LeaseIdMismatchWithLeaseOperation", "LeaseLost",
    "LeaseNotPresentWithBlobOperation", "LeaseNotPresentWithLeaseOperation", "PreviousSnapshotCannotBeNewer",
    "PreviousSnapshotNotFound", "SnapshotsPresent", "BadRequest", "DiskRequestError", "OperationNotAllowed",
]
