"""Direct upload and download of managed disks: the pure rules behind
`grant-access` and `revoke-access` (stamp.disks keeps the records).

Rules kept (as the platform does; messages quoted from it where marked):
- an upload disk is declared by the VHD file's size: virtual size plus the
  512-byte footer, the virtual size a multiple of 1 MiB, from 20 MiB + 512
  (20,972,032) to 32,767 GiB + 512 (35,183,298,347,520) bytes; otherwise 400
  BadRequest "The upload size in bytes N - 512 bytes for the VHD footer (M in
  this case) must be a multiple of MiB." [platform text];
- a grant is a SAS on a blob of its own: container `md-` plus 12 random
  lower-case letters and digits, blob `abcd` (the platform's shape), signed
  with the key of the endpoint's account, which the grant records: only
  that account's URL serves it (another account's, even with a SAS its own
  key signed naming the grant's policy, finds no such container), and
  naming a stored access policy (`si`)
  that the stamp keeps with the resource: revoking the grant removes the
  policy, so the SAS stops working at once, as the platform's does. The
  policy holds the window (start, expiry) and the permission: `r` for Read,
  `rw` for Write (an upload client reads the page list, then writes);
- Write is granted only to a disk waiting for its upload (ReadyToUpload ->
  ActiveUpload; again on ActiveUpload gives a new SAS); Read to an
  unattached disk (-> ActiveSAS), to a disk of a deallocated VM (Reserved ->
  ActiveSAS, as the platform allows: the VM cannot start until access is
  revoked, which gives the disk back its Reserved state; a detach meanwhile
  leaves it Unattached after the revoke) or a snapshot; a disk attached to a
  running (or stopped, not deallocated) VM is refused (409
  OperationNotAllowed "Access not permitted because disk NAME is currently
  attached to running VM VM." [platform text]);
- revoking an upload checks the blob's footer: cookie (400 InvalidVhd "The
  specified cookie value in VHD footer indicates that disk 'NAME' with blob
  URL is not a supported VHD. Disk is expected to have cookie value
  'conectix'." [platform text]), checksum, disk type fixed, and virtual size
  = upload size - 512 (InvalidVhd, our words). A refused revoke leaves the
  disk ActiveUpload with its SAS working, so the upload can be fixed and the
  revoke tried again (or the disk deleted);
- a grant past its expiry refuses requests (its policy's window ends) and
  ends, as the platform ends it by itself when its duration is over: here
  lazily, when the record is next read or used (stamp.disks._end_expired:
  a read, an attach, a VM start, a grant, the endpoint meeting its URL), no
  timer; a Read grant's disk gets its state back (Unattached or Reserved),
  an expired upload's disk is ReadyToUpload again with what was uploaded
  kept ("if the SAS expires during the upload, get a new one with
  grant-access", as the platform's guide says); a revoke takes the SAS away before it
  checks the upload, so no write lands while the footer is read: the
  blob's properties hold the open Write grant's id (UPLOAD_MARK), which the
  revoke's first transaction drops and every Put Page through a grant
  checks inside its own transaction (one let in before the revoke, its body
  still coming, is refused too);
- every later step of a grant or revoke changes the record only if it still
  holds that grant (its id; for a revoke, the revoke's own mark), in the
  step's transaction: a revoke, delete or new disk of the name made by
  another process meanwhile is never undone (the old SAS never reaches a
  new disk), and a mark a killed revoke left is cleared by the next revoke
  (refused or not) or grant.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from vhd import footer as ft
from vhd.errors import ChecksumError, FormatError

from . import sas
from .errors import ComputeError, InvalidVhd, OperationNotAllowed

MIB = 1 << 20
FOOTER = ft.SIZE
UPLOAD_MIN = 20 * MIB + FOOTER  # 20,972,032
UPLOAD_MAX = 32767 * (1 << 30) + FOOTER  # 35,183,298,347,520: the platform's "32 TiB" is 32,767 GiB
MAX_DURATION = 2 ** 31 - 1  # durationInSeconds is an int32
BLOB = "abcd"  # the blob name of every grant, as the platform's SAS URLs have it
CONTAINER_PREFIX = "md-"
UPLOAD_MARK = "upload_grant"  # blob property: the id of the Write grant whose SAS may write the blob now
PERMISSION = {"Read": "r", "Write": "rw"}
DEFAULT_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
DEFAULT_ACCOUNT = "devstoreaccount1"  # the account of grants made before grants recorded theirs
DEVSTORE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass(frozen=True)
class Grant:
    """An active grant, as the REST endpoint needs it to serve `container`/`abcd`.

    Serve `stamp_blob` (at stamp snapshot `snapshot` when not None); accept
    page writes to it only when `writable`; verify the request's SAS with
    `policies={policy_id: policy}`. `size` is the blob's size (a fixed VHD:
    the disk's bytes then its footer)."""

    kind: str  # "disk" or "snapshot"
    name: str
    access: str  # "Read" or "Write"
    account: str  # the account whose key signed its SAS: only its URL serves the grant
    container: str
    policy_id: str
    policy: sas.AccessPolicy
    stamp_blob: str
    snapshot: str | None
    size: int

    @property
    def writable(self) -> bool:
        return self.access == "Write"

    @property
    def policies(self) -> dict[str, sas.AccessPolicy]:
        return {self.policy_id: self.policy}


def check_upload_size(n: int) -> None:
    virtual = n - FOOTER
    if n % MIB != FOOTER % MIB or not UPLOAD_MIN <= n <= UPLOAD_MAX:
        if n % MIB != FOOTER:
            raise ComputeError(f"The upload size in bytes {n} - 512 bytes for the VHD footer ({virtual} in this "
                               "case) must be a multiple of MiB.")
        raise ComputeError(f"The upload size in bytes {n} must be between {UPLOAD_MIN} (20 MiB + 512 bytes for "
                           f"the VHD footer) and {UPLOAD_MAX} (32,767 GiB + 512 bytes for the VHD footer).")


def check_access(access: str, duration: int) -> None:
    if access not in PERMISSION:
        raise ComputeError(f"access must be Read or Write, not {access!r}")
    if not 0 < duration <= MAX_DURATION:
        raise ComputeError(f"durationInSeconds must be from 1 to {MAX_DURATION}, not {duration}")


def new_container() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return CONTAINER_PREFIX + "".join(secrets.choice(alphabet) for _ in range(12))


def new_policy(access: str, duration: int, now: datetime) -> sas.AccessPolicy:
    start = now.astimezone(UTC).replace(microsecond=0)
    return sas.AccessPolicy(start=sas.format_time(start), expiry=sas.format_time(start + timedelta(seconds=duration)),
                            permission=PERMISSION[access])


def account_of(endpoint: str) -> str:
    """The account of a path-style endpoint (`http://127.0.0.1:10000/ACCOUNT`)."""
    parts = urlsplit(endpoint)
    account = parts.path.strip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or not account or "/" in account:
        raise ComputeError(f"endpoint {endpoint!r}: give the blob endpoint as http(s)://HOST:PORT/ACCOUNT "
                           f"(default {DEFAULT_ENDPOINT})")
    return account


def sas_url(endpoint: str, key: bytes, container: str, policy_id: str) -> str:
    """The URL a grant hands out: the blob, and a SAS naming the grant's policy."""
    token = sas.generate_blob_sas(account_of(endpoint), key, container, BLOB, permission="", expiry=None,
                                  policy_id=policy_id)
    return f"{endpoint.rstrip('/')}/{container}/{BLOB}?{token}"


def check_uploaded_footer(raw: bytes, blob_size: int, upload_size: int, disk: str, where: str) -> ft.Footer:
    """The footer at the end of an uploaded blob, if it is one the platform takes."""
    at = blob_size - FOOTER
    if blob_size != upload_size:
        raise InvalidVhd(f"The blob of disk '{disk}' is {blob_size} bytes; the upload size declared is "
                         f"{upload_size}.")
    if raw[:8] != ft.COOKIE:
        raise InvalidVhd(f"The specified cookie value in VHD footer indicates that disk '{disk}' with blob {where} "
                         "is not a supported VHD. Disk is expected to have cookie value 'conectix'.")
    try:
        footer = ft.Footer.unpack(raw, at)
    except ChecksumError:
        raise InvalidVhd(f"The VHD footer of disk '{disk}' with blob {where} has a wrong checksum: the footer "
                         "was damaged or not fully uploaded.") from None
    except FormatError as e:
        raise InvalidVhd(f"The VHD footer of disk '{disk}' with blob {where} is not valid: {e}.") from None
    if footer.disk_type is not ft.DiskType.FIXED:
        raise InvalidVhd(f"Disk '{disk}' with blob {where} is a {footer.disk_type.name.lower()} VHD: only fixed "
                         "VHDs can be uploaded (convert it first: vhd convert IN OUT --to fixed).")
    if footer.current_size != upload_size - FOOTER:
        raise InvalidVhd(f"The VHD footer of disk '{disk}' with blob {where} gives a virtual size of "
                         f"{footer.current_size} bytes; the upload size {upload_size} - 512 bytes for the VHD "
                         f"footer is {upload_size - FOOTER}.")
    return footer


def not_allowed(operation: str, kind: str, name: str, state: str) -> OperationNotAllowed:
    return OperationNotAllowed(f"Operation '{operation}' is not allowed on {kind} '{name}' since the {kind} is in "
                               f"'{state}' state.")
