"""Managed-disk grants over the Blob REST endpoint: `grant-access` hands out
URLs to /ACCOUNT/md-XXXXXXXXXXXX/abcd (stamp.access); this module serves them.

Rules kept:
- a container named `md-...` is a grant's (stamp.disks.Disks.grant_for); one
  no grant holds (never made, or revoked) is 404 ContainerNotFound, as is
  any blob other than `abcd`;
- only the SAS the grant handed out opens it (one naming the grant's stored
  policy, `si`): no Shared Key, no other SAS the account's key signs (an
  account SAS, a service SAS of its own window), no anonymous access;
  revoking the grant drops the policy, so the next request is refused;
- only as the account the grant was issued for (its SAS signed with that
  account's key): under another account's URL the container does not exist
  (404 ContainerNotFound, as another account's containers), so no other
  account's key can sign a SAS that opens it; an x-ms-previous-snapshot-url
  names the same account's grant;
- only what an upload or a download needs: Get Blob, Get Blob Properties,
  Get Page Ranges (a diff only by x-ms-previous-snapshot-url, between two
  grants of one disk's snapshots, in guest offsets: Disks.grant_diff's
  answer, streamed by Disks.iter_diff) and, for a Write grant, Put Page
  (update and clear). Anything else is 403
  AuthorizationPermissionMismatch, before any body is read;
- the request is then the page blob operation on the stamp blob the grant
  names (at its snapshot for an incremental snapshot's grant); a Put Page
  lands only if the blob's UPLOAD_MARK still names the grant, checked in
  the write's transaction (a revoke that began after the request was let
  in refuses it: 404 ContainerNotFound, as a revoked grant's).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp import web

from ..access import BLOB, CONTAINER_PREFIX, Grant
from ..disks import Disks
from . import auth, pagelist
from . import headers as hd
from . import pageblobs as pb
from .call import Call, Service
from .errors import RestError, header_error, query_error

ALLOWED = {"GetBlob": False, "GetBlobProperties": False, "GetPageRanges": False, "PutPage": True}  # -> writes


def is_managed(container: str | None) -> bool:
    return container is not None and container.startswith(CONTAINER_PREFIX)


def disks_of(svc: Service) -> Disks:
    """The server's Disks (one per process, made on first use: it rolls back dead creates)."""
    disks = getattr(svc, "_disks", None)
    if disks is None:
        disks = Disks(svc.stamp)
        svc._disks = disks  # type: ignore[attr-defined]
    return disks


async def grant_of(svc: Service, account: str, container: str) -> Grant:
    """The grant served as `account`/`container`, or 404 ContainerNotFound."""
    grant = await svc.run(disks_of(svc).grant_for, container)
    if grant is None or grant.account != account:
        raise RestError(404, "ContainerNotFound")
    return grant


async def admit(svc: Service, call: Call, areq: auth.Request, op: auth.Op) -> Grant:
    """Check a request to a grant's container and point `call` at the stamp
    blob it serves (raises the service's error otherwise)."""
    assert call.container is not None
    if op.name not in ALLOWED:
        raise RestError(403, "AuthorizationPermissionMismatch")
    grant = await grant_of(svc, call.account, call.container)
    if call.blob != BLOB:
        raise RestError(404, "BlobNotFound")
    if not any(k == "sig" for k, _ in areq.query) or "Authorization" in areq.headers or \
            [v for k, v in areq.query if k == "si"] != [grant.policy_id]:  # not another SAS the account key signed
        raise RestError(403, "AuthenticationFailed", AuthenticationErrorDetail="A managed disk's blob is reached "
                        "with the SAS its grant-access gave, and nothing else.")
    if "snapshot" in call.query or "prevsnapshot" in call.query:
        raise query_error("snapshot" if "snapshot" in call.query else "prevsnapshot",
                          call.query.get("snapshot", call.query.get("prevsnapshot", "")),
                          "A managed disk's grant serves one blob; diffs take x-ms-previous-snapshot-url.")
    call.auth = auth.authorize(areq, svc.accounts, op, None, grant.policies)
    call.container, _, call.blob = grant.stamp_blob.partition("/")
    call.granted = True
    call.grant_id = grant.policy_id
    if grant.snapshot is not None:
        call.query["snapshot"] = grant.snapshot
    return grant


async def serve(svc: Service, call: Call, handler: Any, areq: auth.Request, op: auth.Op) -> web.StreamResponse:
    grant = await admit(svc, call, areq, op)
    if op.name == "GetPageRanges" and "x-ms-previous-snapshot-url" in call.headers:
        return await managed_diff(svc, call, grant)
    return await handler(svc, call)


async def managed_diff(svc: Service, c: Call, target: Grant) -> web.StreamResponse:
    """Get Page Ranges between the grant of an older snapshot (the header's
    URL, its SAS checked) and this grant: guest offsets, as Disks.grant_diff."""
    url = c.headers["x-ms-previous-snapshot-url"]
    previous = await _previous_grant(svc, c, url)
    disks = disks_of(svc)
    base, later = await svc.run(disks.grant_diff_ends, target, previous)
    limit = hd.query_int(c.query, "maxresults", 1, 2 ** 31)
    marker = c.query.get("marker", "")
    if marker and not hd.digits(marker):
        raise query_error("marker", marker)
    info = await pb.describe(svc, c, c.snapshot)
    lo, hi = 0, target.size
    window = hd.parse_range(c.headers)
    if window is not None:
        _, start, end = window
        lo, hi = start, min(target.size, (end + 1) if end is not None else target.size)
    offset, length = pagelist.aligned(max(lo, int(marker or 0)), hi)

    def source() -> pagelist.Source:  # lazily, in guest order (stamp.guestdiff), from the marker on
        yield from disks.iter_diff(base, later, offset, length)

    return await pagelist.answer(svc, c.request, source, limit, {
        "ETag": pb.etag(info), "Last-Modified": hd.http_date(pb.modified(info)),
        "x-ms-blob-content-length": str(info.size)})


async def _previous_grant(svc: Service, c: Call, url: str) -> Grant:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise header_error("x-ms-previous-snapshot-url", url) from None
    segments = parts.path.split("/", 3)
    if parts.scheme not in ("http", "https") or len(segments) < 4 or not is_managed(unquote(segments[2])):
        raise RestError(409, "PreviousSnapshotOperationNotSupported",
                        "x-ms-previous-snapshot-url names the grant URL of an earlier snapshot of the same disk.")
    container, blob = unquote(segments[2]), unquote(segments[3])
    try:
        previous = await grant_of(svc, c.account, container)
    except RestError:
        raise RestError(409, "PreviousSnapshotNotFound") from None
    if blob != BLOB:
        raise RestError(409, "PreviousSnapshotNotFound")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if [v for k, v in query if k == "si"] != [previous.policy_id]:
        raise RestError(403, "AuthenticationFailed", AuthenticationErrorDetail="x-ms-previous-snapshot-url takes "
                        "the URL its grant-access gave, its SAS included.")
    src = auth.Request("GET", parts.path, query, {}, unquote(segments[1]), container, blob, None,
                       c.request.remote or "", parts.scheme == "https")
    auth.verify_sas(src, svc.accounts, auth.Op("GetPageRanges", "object", "r", "blob"), previous.policies)
    return previous
