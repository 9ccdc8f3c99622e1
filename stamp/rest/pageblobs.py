"""Page blob operations of the Blob REST protocol, over stamp.PageBlobs.

A blob `B` of container `C` is the stamp's page blob `C/B`. What the service
reports beyond pages (content headers, metadata, sequence number, last
modified, copy state) lives in the blob's properties under "rest"; a
snapshot records the same, frozen, in its metadata. Rules:
- the ETag is made of the blob's id, size, content version (which every
  write, clear and resize moves on, in the stamp's own transaction) and the
  properties' revision, so it changes with every change and only then;
  snapshots and leases leave it;
- Put Page bodies are at most 4 MiB and read only after the byte budget
  grants them; Get Blob sends 4 MiB at a time, each read when the budget
  allows and given back once written to the client;
- a Put Page's conditions (If-*, sequence numbers, lease) are checked
  inside the stamp's write transaction (a PageBlobs hook), which also sets
  Last-Modified, so the check and the write are one atomic step even across
  processes; the write and the state its answer reports take one pool call;
  every other conditional write (Put Blob, properties, metadata, leases,
  snapshot, delete, copy destinations) checks its conditions again inside
  the transaction that makes the change (`guarded`, PageBlobs.atomically);
- blob types other than PageBlob are refused with 409 InvalidBlobType
  before any body is read; an incremental copy's destination refuses writes
  (409 OperationNotAllowedOnIncrementalCopyBlob).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp import web

from ..access import UPLOAD_MARK
from ..containers import SYSTEM, blob_name
from ..errors import BlobNotFound, SnapshotNotFound, StampError
from ..pageblob import MAX_BLOB, MAX_WRITE, BlobInfo, LeaseState
from . import auth, conditions, pagelist
from . import headers as hd
from .call import MAX_CHUNK, Call, Service
from .errors import RestError, header_error, missing_header, query_error

log = logging.getLogger("stamp.rest")
T = TypeVar("T")
SEQ_MAX = 2 ** 63 - 1
ID_HEADER, VERSION_HEADER = "x-diskstamp-blob-id", "x-diskstamp-content-version"
DISKS = "disks"  # the container of managed disks' blobs (a host writes them under its writer lease)
CONTENT = {  # header -> property
    "x-ms-blob-content-type": "content_type", "x-ms-blob-content-encoding": "content_encoding",
    "x-ms-blob-content-language": "content_language", "x-ms-blob-content-md5": "content_md5",
    "x-ms-blob-cache-control": "cache_control", "x-ms-blob-content-disposition": "content_disposition",
}
RESPONSE = {"content_type": "Content-Type", "content_encoding": "Content-Encoding",
            "content_language": "Content-Language", "content_md5": "Content-MD5",
            "cache_control": "Cache-Control", "content_disposition": "Content-Disposition"}
LIST_PROPS = {"content_type": "Content-Type", "content_encoding": "Content-Encoding",
              "content_language": "Content-Language", "content_md5": "Content-MD5",
              "cache_control": "Cache-Control", "content_disposition": "Content-Disposition"}


# -- state ------------------------------------------------------------------------------------

def stamp_name(c: Call) -> str:
    assert c.container is not None and c.blob is not None
    return blob_name(c.container, c.blob)


def rest_props(info: BlobInfo) -> dict[str, Any]:
    return dict(info.properties.get("rest") or {})


def etag(info: BlobInfo) -> str:
    """The blob's ETag (a snapshot keeps the one its blob had when taken)."""
    if info.snapshot is not None:
        return str(info.properties.get("etag", '"0x0"'))
    return etag_of(info.id, info.size, info.version, int(rest_props(info).get("rev", 0)))


def etag_of(blob_id: int, size: int, version: int, rev: int) -> str:
    digest = hashlib.blake2b(f"{blob_id}:{size}:{version}:{rev}".encode(), digest_size=7).hexdigest()
    return f'"0x8{digest.upper()}"'


def modified(info: BlobInfo) -> float:
    """Last-Modified: the later of the properties' last change and the last change of the pages or size."""
    if info.snapshot is not None:
        return float(info.properties.get("mod", info.created))
    return max(float(rest_props(info).get("mod", info.created)), info.touched)


def _props(info: BlobInfo) -> dict[str, Any]:
    return rest_props(info) if info.snapshot is None else dict(info.properties)


async def describe(svc: Service, c: Call, snapshot: str | None = None) -> BlobInfo:
    """The blob (or snapshot), or BlobNotFound (also for a missing snapshot),
    or ContainerNotFound when its container is missing, as the service says."""
    try:
        return await svc.run(svc.stamp.blobs.describe, stamp_name(c), snapshot)
    except SnapshotNotFound:
        raise RestError(404, "BlobNotFound") from None
    except BlobNotFound:
        await container_exists(svc, c)
        raise


async def describe_or_none(svc: Service, c: Call) -> BlobInfo | None:
    try:
        return await describe(svc, c)
    except (BlobNotFound, RestError):
        return None


def check(c: Call, info: BlobInfo | None, read: bool = False) -> None:
    conditions.check(c.headers, None if info is None else etag(info), None if info is None else modified(info),
                     read=read)


def check_write(c: Call, info: BlobInfo | None, creates: bool = False) -> None:
    """The conditions of a write: If-None-Match * on a blob that exists is
    409 BlobAlreadyExists for an operation that `creates` it (Put Blob, Copy
    Blob), then the If-* headers."""
    if creates and info is not None and c.headers.get("If-None-Match", "").strip() == "*":
        raise RestError(409, "BlobAlreadyExists")
    check(c, info)


async def guarded(svc: Service, c: Call, act: Callable[[BlobInfo | None], T], snapshot: str | None = None,
                  missing_ok: bool = False, creates: bool = False) -> T:
    """act(the blob's state) after its conditions are checked again, in one
    stamp transaction with what act changes (PageBlobs.atomically): no other
    writer, in any process, comes between an If-Match and the change it
    guards. `missing_ok`: the blob may be missing (act gets None);
    `creates`: as check_write's."""
    def fn(info: BlobInfo | None) -> T:
        check_write(c, info, creates)
        return act(info)

    try:
        return await svc.run(svc.stamp.blobs.atomically, stamp_name(c), fn, snapshot, missing_ok or creates)
    except SnapshotNotFound:
        raise RestError(404, "BlobNotFound") from None
    except BlobNotFound:
        await container_exists(svc, c)
        raise


def refuse_incremental(info: BlobInfo) -> None:
    if rest_props(info).get("inc"):
        raise RestError(409, "OperationNotAllowedOnIncrementalCopyBlob")


def check_snapshot_lease(c: Call, info: BlobInfo) -> None:
    """Reads and Snapshot need no lease id, but one sent must be the blob's."""
    given = hd.lease_id(c.headers)
    if given is None:
        return
    if info.lease not in (LeaseState.LEASED, LeaseState.BREAKING):
        raise RestError(412, "LeaseNotPresentWithBlobOperation")
    if info.lease_id is None or uuid.UUID(given) != uuid.UUID(info.lease_id):
        raise RestError(412, "LeaseIdMismatchWithBlobOperation")


def blob_headers(info: BlobInfo, *, content: bool = True) -> dict[str, str]:
    props = _props(info)
    out = {"ETag": etag(info), "Last-Modified": hd.http_date(modified(info)),
           "x-ms-creation-time": hd.http_date(info.created), "x-ms-blob-type": "PageBlob",
           "x-ms-blob-sequence-number": str(props.get("seq", 0)), "x-ms-server-encrypted": "true",
           "Accept-Ranges": "bytes", "x-ms-access-tier-inferred": "true"}
    if content:
        out["Content-Type"] = props.get("content_type") or "application/octet-stream"
        for key, header in RESPONSE.items():
            if key != "content_type" and props.get(key):
                out[header] = str(props[key])
    if info.snapshot is None:
        out.update(lease_headers(info))
        out.update(identity_headers(info))
    for k, v in props.get("meta", {}).items():
        out[f"x-ms-meta-{k}"] = str(v)
    cp = props.get("copy")
    if cp:
        out.update({"x-ms-copy-id": cp["id"], "x-ms-copy-source": cp["source"], "x-ms-copy-status": "success",
                    "x-ms-copy-progress": cp["progress"], "x-ms-copy-completion-time": hd.http_date(cp["time"])})
        if cp.get("snapshot"):
            out["x-ms-copy-destination-snapshot"] = cp["snapshot"]
    if props.get("inc"):
        out["x-ms-incremental-copy"] = "true"
    return out


def identity_headers(info: BlobInfo) -> dict[str, str]:
    """diskstamp's own headers (not the service's; clients ignore them): the
    blob's id (a blob made again under its name has another) and its content
    version as PageBlobs.version() reports it, observed: a host's cache over
    the network (stamp.remote) keys its lines by the one and checks them
    against the other, as it does in-process."""
    return {ID_HEADER: str(info.id), VERSION_HEADER: f"{info.size}.{info.version}"}


def lease_headers(info: BlobInfo) -> dict[str, str]:
    out = {"x-ms-lease-state": info.lease.value,
           "x-ms-lease-status": "locked" if info.lease in (LeaseState.LEASED, LeaseState.BREAKING) else "unlocked"}
    if info.lease is LeaseState.LEASED:
        infinite = info.lease_expiry == 0
        out["x-ms-lease-duration"] = "infinite" if infinite else "fixed"
    return out


def list_entry(info: BlobInfo, blob: str, with_metadata: bool, with_copy: bool) -> dict[str, Any]:
    props = _props(info)
    p: dict[str, Any] = {"Creation-Time": hd.http_date(info.created),
                         "Last-Modified": hd.http_date(modified(info)),
                         "Etag": etag(info).strip('"'), "Content-Length": info.size}
    for key, element in LIST_PROPS.items():
        p[element] = props.get(key) or ("application/octet-stream" if key == "content_type" else "")
    p["x-ms-blob-sequence-number"] = props.get("seq", 0)
    p["BlobType"] = "PageBlob"
    if info.snapshot is None:
        lh = lease_headers(info)
        p["LeaseStatus"], p["LeaseState"] = lh["x-ms-lease-status"], lh["x-ms-lease-state"]
        if "x-ms-lease-duration" in lh:
            p["LeaseDuration"] = lh["x-ms-lease-duration"]
    p["ServerEncrypted"] = "true"
    cp = props.get("copy")
    if with_copy and cp:
        p.update({"CopyId": cp["id"], "CopySource": cp["source"], "CopyStatus": "success",
                  "CopyProgress": cp["progress"], "CopyCompletionTime": hd.http_date(cp["time"])})
        if cp.get("snapshot"):
            p["CopyDestinationSnapshot"] = cp["snapshot"]
    if props.get("inc"):
        p["IncrementalCopy"] = "true"
    entry: dict[str, Any] = {"name": blob, "properties": p}
    if info.snapshot:
        entry["snapshot"] = info.snapshot
    if with_metadata:
        entry["metadata"] = props.get("meta", {})
    return entry


def _response(status: int, info: BlobInfo | None = None, **headers: str) -> web.Response:
    out = {} if info is None else {"ETag": etag(info), "Last-Modified": hd.http_date(modified(info))}
    return web.Response(status=status, headers={**out, **headers})


def refuse_system_write(c: Call, host_write: bool = False) -> None:
    """The stamp's own containers (disks, images, snapshots) are read-only
    here: a write, resize, lease or snapshot behind the managed-disk layer's
    back would break what it keeps (a disk's footer, an image its disks are
    made from, a host's cache); a direct upload goes through grant-access.
    One exception, a host over the network (`host_write`: Put Page and a
    resize): a disk's blob takes the account owner's (Shared Key) writes
    that name its writer lease, which only the host API hands out (to the
    host the disk is attached to) and the stamp checks in the write's own
    transaction."""
    if host_write and c.container == DISKS and c.auth.startswith("SharedKey") and hd.lease_id(c.headers):
        return
    if c.container in SYSTEM and not c.granted:
        raise RestError(403, "AuthorizationFailure", "Blobs in the stamp's own containers are read-only over "
                        "REST: the managed-disk commands change them (an upload goes through grant-access).")


def refuse_snapshot(c: Call) -> None:
    if c.snapshot is not None:
        raise query_error("snapshot", c.snapshot, "A snapshot is read-only: this operation needs the base blob.")


# -- Put Blob ---------------------------------------------------------------------------------

def new_properties(c: Call) -> dict[str, Any]:
    props: dict[str, Any] = {k: c.headers[h] for h, k in CONTENT.items() if h in c.headers}
    props["meta"] = hd.metadata(c.headers)
    props["seq"] = hd.integer(c.headers, "x-ms-blob-sequence-number", 0, SEQ_MAX, 0)
    props["mod"], props["rev"] = time.time(), 1
    return props


def check_blob_type(c: Call) -> None:
    kind = c.headers.get("x-ms-blob-type")
    if kind is None:
        raise missing_header("x-ms-blob-type")
    if kind in ("BlockBlob", "AppendBlob"):
        raise RestError(409, "InvalidBlobType", "This endpoint stores page blobs only (x-ms-blob-type: "
                        f"PageBlob); {kind} is not supported.")
    if kind != "PageBlob":
        raise header_error("x-ms-blob-type", kind)


async def put_blob(svc: Service, c: Call) -> web.StreamResponse:
    check_blob_type(c)
    refuse_snapshot(c)
    refuse_system_write(c)
    if c.request.content_length not in (None, 0):
        raise header_error("Content-Length", str(c.request.content_length))
    size = hd.integer(c.headers, "x-ms-blob-content-length", 0, 2 ** 63, required=True)
    assert size is not None
    if size % 512 or size > MAX_BLOB:
        raise header_error("x-ms-blob-content-length", str(size))
    props = new_properties(c)
    await container_exists(svc, c)
    info = await describe_or_none(svc, c)
    check_write(c, info, creates=True)
    lease = hd.lease_id(c.headers)

    def act(now: BlobInfo | None) -> None:
        if now is not None:
            refuse_incremental(now)
        svc.stamp.blobs.recreate(stamp_name(c), size, {"rest": props}, lease)

    await guarded(svc, c, act, creates=True)
    info = await describe(svc, c)
    return _response(201, info, **{"x-ms-request-server-encrypted": "true"})


async def container_exists(svc: Service, c: Call) -> dict[str, Any]:
    assert c.container is not None
    return await svc.run(svc.stamp.containers.get, c.container)


# -- Put Page ---------------------------------------------------------------------------------

async def put_page(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c, host_write=True)
    refuse_snapshot(c)
    if "x-ms-copy-source" in c.headers:
        raise RestError(400, "UnsupportedHeader", "Put Page From URL is not supported by this endpoint.",
                        HeaderName="x-ms-copy-source")
    action = c.headers.get("x-ms-page-write")
    if action is None:
        raise missing_header("x-ms-page-write")
    if action not in ("update", "clear"):
        raise header_error("x-ms-page-write", action)
    offset, length = hd.page_range(c.headers)
    body_len = c.request.content_length
    if action == "update":
        if body_len is None:
            raise RestError(411, "MissingContentLengthHeader", "Content-Length HTTP header is missing.")
        if body_len > MAX_WRITE:
            raise RestError(413, "RequestBodyTooLarge", MaxLimit=str(MAX_WRITE))
        if body_len != length:
            raise header_error("Content-Length", str(body_len))
    elif body_len not in (None, 0):
        raise header_error("Content-Length", str(body_len))
    lease = hd.lease_id(c.headers)
    name = stamp_name(c)
    extra: dict[str, str] = {}
    hook = _page_hook(c)
    blobs = svc.stamp.blobs

    def clear() -> BlobInfo:
        return blobs.clear_described(name, offset, length, lease, hook)

    def write(data: bytes) -> BlobInfo:
        return blobs.write_described(name, offset, data, lease, hook)

    if action == "clear":
        info = await _on_blob(svc, c, clear)
    else:
        await svc.budget.take(length)
        try:
            data = await svc.read_body(c.request, length)
            md5 = c.headers.get("Content-MD5")
            if md5 is not None:
                if base64.b64encode(hashlib.md5(data).digest()).decode() != md5.strip():
                    raise RestError(400, "Md5Mismatch")
                extra["Content-MD5"] = md5.strip()
            info = await _on_blob(svc, c, write, data)
        finally:
            await svc.budget.give(length)
        extra["x-ms-request-server-encrypted"] = "true"
    return _response(201, info, **{"x-ms-blob-sequence-number": str(rest_props(info).get("seq", 0)), **extra})


async def _on_blob(svc: Service, c: Call, fn: Callable[..., BlobInfo], *args: Any) -> BlobInfo:
    """One pool call on the blob; a missing blob of a missing container is ContainerNotFound."""
    try:
        return await svc.run(fn, *args)
    except BlobNotFound:
        await container_exists(svc, c)
        raise


def _page_hook(c: Call) -> Callable[[dict[str, Any], int, int, int, float], None]:
    """The conditions of a Put Page, checked inside the stamp's write
    transaction (so no other writer comes between the check and the write);
    the stamp records the write's time there too (Last-Modified, as for any write)."""
    def hook(props: dict[str, Any], blob_id: int, size: int, version: int, touched: float) -> None:
        if c.granted and props.get(UPLOAD_MARK) != c.grant_id:  # its grant was revoked since it was let in
            raise RestError(404, "ContainerNotFound")
        rest = props.get("rest") or {}
        if rest.get("inc"):
            raise RestError(409, "OperationNotAllowedOnIncrementalCopyBlob")
        conditions.check(c.headers, etag_of(blob_id, size, version, int(rest.get("rev", 0))),
                         max(float(rest.get("mod", 0)), touched))
        conditions.check_sequence(c.headers, int(rest.get("seq", 0)))
    return hook


# -- Get Page Ranges --------------------------------------------------------------------------

async def get_page_ranges(svc: Service, c: Call) -> web.StreamResponse:
    limit = hd.query_int(c.query, "maxresults", 1, 2 ** 31)
    marker = c.query.get("marker", "")
    if marker and not hd.digits(marker):
        raise query_error("marker", marker)
    info = await describe(svc, c, c.snapshot)
    check_snapshot_lease(c, info)
    check(c, info, read=True)
    window = hd.parse_range(c.headers)
    lo, hi = 0, info.size
    if window is not None:
        _, start, end = window
        lo, hi = start, min(info.size, (end + 1) if end is not None else info.size)
    offset, length = pagelist.aligned(max(lo, int(marker or 0)), hi)
    prev = await previous_snapshot(svc, c)
    name, blobs = stamp_name(c), svc.stamp.blobs

    end = offset + length

    def source() -> pagelist.Source:  # lazily, from the marker on (pagelist.answer stops at maxresults)
        if prev is None:
            yield from ((o, n, False) for o, n in pagelist.short_reads(
                lambda at: blobs.iter_page_ranges(name, c.snapshot, at, end - at), offset))
        else:
            yield from blobs.iter_diff(name, prev, c.snapshot, offset, length, chunk=pagelist.CHUNK)  # short reads

    return await pagelist.answer(svc, c.request, source, limit, {
        "ETag": etag(info), "Last-Modified": hd.http_date(modified(info)),
        "x-ms-blob-content-length": str(info.size)})


async def previous_snapshot(svc: Service, c: Call) -> str | None:
    """The base of a diff: `prevsnapshot`, or the snapshot named by the
    x-ms-previous-snapshot-url header (a URL of the same blob, its SAS checked)."""
    prev = c.query.get("prevsnapshot")
    url = c.headers.get("x-ms-previous-snapshot-url")
    if url is None:
        return prev
    src = source_of(c, url, "x-ms-previous-snapshot-url")
    if src.snapshot is None:
        raise header_error("x-ms-previous-snapshot-url", url)
    authorize_source(svc, c, src, url)
    if (src.container, src.blob) != (c.container, c.blob):
        raise RestError(409, "PreviousSnapshotOperationNotSupported")
    return src.snapshot


# -- copy sources -----------------------------------------------------------------------------

def source_of(c: Call, url: str, header: str) -> auth.Request:
    """The blob a copy source (or previous-snapshot) URL names, on this server."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise header_error(header, url) from None
    segments = parts.path.split("/", 3)
    if parts.scheme not in ("http", "https") or len(segments) < 4 or not segments[3]:
        raise header_error(header, url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    container, blob = unquote(segments[2]), unquote(segments[3])
    snapshot = dict(query).get("snapshot")
    return auth.Request("GET", parts.path, query, {}, unquote(segments[1]), container, blob, snapshot,
                        c.request.remote or "", parts.scheme == "https")


def authorize_source(svc: Service, c: Call, src: auth.Request, url: str) -> None:
    """A source is readable with its own SAS, or by a Shared Key request of the same account."""
    if any(k == "sig" for k, _ in src.query):
        auth.verify_sas(src, svc.accounts, auth.Op("GetBlob", "object", "r", "blob"), None)
        return
    if c.auth.startswith("SharedKey") and src.account == c.account:
        return
    raise RestError(403, "CannotVerifyCopySource", f"The copy source {url[:200]} cannot be read: give it a SAS.")


async def source_owner(svc: Service, src: auth.Request) -> None:
    """A copy source in another account's container does not exist for this one."""
    from .containers import check_owner  # containers imports this module

    try:
        await check_owner(svc, src.account, src.container or "")
    except RestError:
        raise RestError(404, "CannotVerifyCopySource", "The specified blob does not exist.") from None


# -- Get Blob / properties --------------------------------------------------------------------

async def get_blob(svc: Service, c: Call) -> web.StreamResponse:
    info = await describe(svc, c, c.snapshot)
    check_snapshot_lease(c, info)
    check(c, info, read=True)
    headers = blob_headers(info)
    window = hd.parse_range(c.headers)
    want_md5 = c.headers.get("x-ms-range-get-content-md5", "").lower() == "true"
    start, length, status = 0, info.size, 200
    if window is not None:
        _, start, end = window
        if start >= info.size:
            err = RestError(416, "InvalidRange")
            err.headers["Content-Range"] = f"bytes */{info.size}"
            raise err
        length = (min(end, info.size - 1) if end is not None else info.size - 1) - start + 1
        status = 206
        headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{info.size}"
        if want_md5:
            if length > MAX_WRITE:
                raise RestError(400, "OutOfRangeInput")
            headers.pop("Content-MD5", None)
    elif want_md5:
        raise missing_header("x-ms-range")
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    name = stamp_name(c)
    if want_md5:
        data = await svc.run(svc.stamp.blobs.read, name, start, length, c.snapshot)
        resp.headers["Content-MD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        await resp.prepare(c.request)
        await svc.send(resp, data)
        return resp
    await resp.prepare(c.request)
    await stream(svc, resp, lambda o, n: svc.stamp.blobs.read(name, o, n, c.snapshot), start, length)
    return resp


async def stream(svc: Service, resp: web.StreamResponse, read: Callable[[int, int], bytes], start: int,
                 length: int) -> None:
    """Send [start, start+length) in chunks, each held only while the budget
    allows. The status line is sent already: a stamp error on a later chunk
    (data lost, nodes down) drops the connection, so the client sees a short
    body (and retries) rather than a wrong one."""
    done = 0
    while done < length:
        n = min(MAX_CHUNK, length - done)
        await svc.budget.take(n)
        try:
            data = await svc.run(read, start + done, n)
            await svc.send(resp, data)
        except StampError as e:
            log.warning("read of %s failed after its answer began: %s; the connection is dropped", resp, e)
            raise ConnectionResetError(str(e)) from None
        finally:
            await svc.budget.give(n)
        done += n
    await resp.write_eof()


async def get_properties(svc: Service, c: Call) -> web.StreamResponse:
    info = await describe(svc, c, c.snapshot)
    check_snapshot_lease(c, info)
    check(c, info, read=True)
    resp = web.StreamResponse(status=200, headers=blob_headers(info))
    resp.content_length = info.size  # a HEAD answer: the blob's size, and no body
    await resp.prepare(c.request)
    await resp.write_eof()
    return resp


async def get_metadata(svc: Service, c: Call) -> web.StreamResponse:
    info = await describe(svc, c, c.snapshot)
    check(c, info, read=True)
    meta = {f"x-ms-meta-{k}": str(v) for k, v in _props(info).get("meta", {}).items()}
    return _response(200, info, **meta)


# -- Set properties / metadata ----------------------------------------------------------------

async def set_properties(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c, host_write="x-ms-blob-content-length" in c.headers)
    refuse_snapshot(c)
    info = await describe(svc, c)
    check(c, info)
    lease = hd.lease_id(c.headers)
    size = hd.integer(c.headers, "x-ms-blob-content-length", 0, 2 ** 63)
    action = c.headers.get("x-ms-sequence-number-action")
    seq = hd.integer(c.headers, "x-ms-blob-sequence-number", 0, SEQ_MAX)
    if action not in (None, "max", "update", "increment"):
        raise header_error("x-ms-sequence-number-action", action)
    if (action == "increment" and seq is not None) or (action in ("max", "update") and seq is None):
        raise header_error("x-ms-blob-sequence-number", str(seq)) if seq is not None else \
            missing_header("x-ms-blob-sequence-number")
    content = {k: c.headers.get(h) for h, k in CONTENT.items()}
    set_content = any(v is not None for v in content.values())
    if size is not None:
        refuse_incremental(info)
        if size % 512 or size > MAX_BLOB:
            raise header_error("x-ms-blob-content-length", str(size))

    def change(props: dict[str, Any]) -> None:
        rest = props.setdefault("rest", {})
        if action == "increment":
            if int(rest.get("seq", 0)) >= SEQ_MAX:
                raise RestError(409, "SequenceNumberIncrementTooLarge")
            rest["seq"] = int(rest.get("seq", 0)) + 1
        elif action == "max":
            rest["seq"] = max(int(rest.get("seq", 0)), int(seq or 0))
        elif action == "update":
            rest["seq"] = int(seq or 0)
        if set_content:
            for k, v in content.items():
                rest[k] = v or ""
        rest["mod"], rest["rev"] = time.time(), int(rest.get("rev", 0)) + 1

    def apply(_: BlobInfo | None) -> None:
        if size is not None:
            svc.stamp.blobs.resize(stamp_name(c), size, lease)
        svc.stamp.blobs.update_properties(stamp_name(c), change, lease)

    await guarded(svc, c, apply)
    info = await describe(svc, c)
    return _response(200, info, **{"x-ms-blob-sequence-number": str(rest_props(info).get("seq", 0))})


async def set_metadata(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c)
    refuse_snapshot(c)
    meta = hd.metadata(c.headers)
    info = await describe(svc, c)
    check(c, info)

    def change(props: dict[str, Any]) -> None:
        rest = props.setdefault("rest", {})
        rest["meta"], rest["mod"], rest["rev"] = meta, time.time(), int(rest.get("rev", 0)) + 1

    lease = hd.lease_id(c.headers)
    await guarded(svc, c, lambda _: svc.stamp.blobs.update_properties(stamp_name(c), change, lease))
    info = await describe(svc, c)
    return _response(200, info, **{"x-ms-request-server-encrypted": "true"})


# -- leases -----------------------------------------------------------------------------------

async def lease(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c)
    refuse_snapshot(c)
    action = c.headers.get("x-ms-lease-action")
    if action is None:
        raise missing_header("x-ms-lease-action")
    info = await describe(svc, c)
    check(c, info)
    status, key, act = _lease_action(svc, c, action)
    got = await guarded(svc, c, lambda _: act())
    return _response(status, info, **({key: str(got)} if key else {}))


def _lease_action(svc: Service, c: Call, action: str) -> tuple[int, str, Callable[[], Any]]:
    """A lease request's (status, answer header, stamp call), its headers checked."""
    blobs, name = svc.stamp.blobs, stamp_name(c)
    if action == "acquire":
        duration = hd.integer(c.headers, "x-ms-lease-duration", -1, 60, required=True)
        if duration is None or (duration != -1 and duration < 15):
            raise header_error("x-ms-lease-duration", c.headers.get("x-ms-lease-duration", ""))
        proposed = hd.lease_id(c.headers, "x-ms-proposed-lease-id")
        return 201, "x-ms-lease-id", lambda: blobs.acquire_lease(name, duration, proposed)
    if action == "break":
        period = hd.integer(c.headers, "x-ms-lease-break-period", 0, 60)
        return 202, "x-ms-lease-time", lambda: blobs.break_lease_after(name, period)
    if action not in ("renew", "release", "change"):
        raise header_error("x-ms-lease-action", action)
    held = hd.lease_id(c.headers)
    if held is None:
        raise missing_header("x-ms-lease-id")
    if action == "renew":
        def renew() -> str:
            blobs.renew_lease(name, held)
            return held

        return 200, "x-ms-lease-id", renew
    if action == "release":
        return 200, "", lambda: blobs.release_lease(name, held)
    proposed = hd.lease_id(c.headers, "x-ms-proposed-lease-id")
    if proposed is None:
        raise missing_header("x-ms-proposed-lease-id")
    return 200, "x-ms-lease-id", lambda: blobs.change_lease(name, held, proposed)


# -- snapshots, delete ------------------------------------------------------------------------

async def snapshot(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c)
    refuse_snapshot(c)
    info = await describe(svc, c)
    check_snapshot_lease(c, info)
    check(c, info)
    meta = hd.metadata(c.headers)

    def act(now: BlobInfo | None) -> tuple[BlobInfo, str]:
        assert now is not None
        check_snapshot_lease(c, now)
        frozen = {**rest_props(now), "etag": etag(now), "mod": modified(now)}
        if meta:
            frozen["meta"] = meta
        return now, svc.stamp.blobs.snapshot(stamp_name(c), {"properties": frozen}).id

    info, snap_id = await guarded(svc, c, act)
    return _response(201, info, **{"x-ms-snapshot": snap_id, "x-ms-request-server-encrypted": "false"})


async def delete(svc: Service, c: Call) -> web.StreamResponse:
    refuse_system_write(c)
    info = await describe(svc, c, c.snapshot)
    check(c, info)
    which = c.headers.get("x-ms-delete-snapshots")
    if which not in (None, "include", "only"):
        raise header_error("x-ms-delete-snapshots", which)
    blobs, name, lease = svc.stamp.blobs, stamp_name(c), hd.lease_id(c.headers)
    if c.snapshot is not None:
        if which is not None:
            raise header_error("x-ms-delete-snapshots", which)
        snap = c.snapshot
        await guarded(svc, c, lambda _: blobs.delete_snapshot(name, snap), snapshot=snap)
    else:
        await guarded(svc, c, lambda _: blobs.delete(name, lease, which))
    return web.Response(status=202, headers={"x-ms-delete-type-permanent": "true"})


# -- copies -----------------------------------------------------------------------------------

async def copy_source(svc: Service, c: Call, src: auth.Request, url: str) -> tuple[str, BlobInfo]:
    """A copy's source, checked as the service does (its SAS or account, the
    target's container, the source's owner): its stamp name and description."""
    authorize_source(svc, c, src, url)
    await container_exists(svc, c)
    await source_owner(svc, src)
    source_name = blob_name(src.container or "", src.blob or "")
    try:
        return source_name, await svc.run(svc.stamp.blobs.describe, source_name, src.snapshot)
    except (BlobNotFound, SnapshotNotFound):
        raise RestError(404, "CannotVerifyCopySource", "The specified blob does not exist.") from None


async def copy(svc: Service, c: Call) -> web.StreamResponse:
    refuse_snapshot(c)
    refuse_system_write(c)
    url = c.headers["x-ms-copy-source"]
    src = source_of(c, url, "x-ms-copy-source")
    source_name, src_info = await copy_source(svc, c, src, url)
    info = await describe_or_none(svc, c)
    check_write(c, info, creates=True)
    if info is not None:
        refuse_incremental(info)
    meta = hd.metadata(c.headers)
    props = {**_props(src_info), "seq": 0, "mod": time.time()}
    for key in ("etag", "inc", "copy"):
        props.pop(key, None)
    props["meta"] = meta or _props(src_info).get("meta", {})
    copy_id = str(uuid.uuid4())
    props["copy"] = {"id": copy_id, "source": url.split("?")[0] + (f"?snapshot={src.snapshot}" if src.snapshot
                                                                   else ""),
                     "progress": f"{src_info.size}/{src_info.size}", "time": time.time()}
    lease_id = hd.lease_id(c.headers)

    def apply(now: BlobInfo | None) -> None:
        blobs, name = svc.stamp.blobs, stamp_name(c)
        if now is not None:
            refuse_incremental(now)
        blobs.recreate(name, 0, {"rest": props}, lease_id)
        blobs.copy_into(source_name, name, src.snapshot, lease=lease_id)

    await guarded(svc, c, apply, creates=True)
    info = await describe(svc, c)
    return _response(202, info, **{"x-ms-copy-id": copy_id, "x-ms-copy-status": "success"})


async def incremental_copy(svc: Service, c: Call) -> web.StreamResponse:
    refuse_snapshot(c)
    refuse_system_write(c)
    url = c.headers.get("x-ms-copy-source")
    if url is None:
        raise missing_header("x-ms-copy-source")
    src = source_of(c, url, "x-ms-copy-source")
    if src.snapshot is None:
        raise RestError(409, "IncrementalCopySourceMustBeSnapshot")
    source_name, src_info = await copy_source(svc, c, src, url)
    if _props(src_info).get("inc"):
        raise RestError(409, "CopySourceCannotBeIncrementalCopyBlob")
    origin = url.split("?")[0]
    info = await describe_or_none(svc, c)
    check(c, info)
    assert src.snapshot is not None
    snap_id = src.snapshot
    if info is not None:
        _since(info, origin, snap_id)
    copy_id = str(uuid.uuid4())
    name, blobs = stamp_name(c), svc.stamp.blobs

    def apply(now: BlobInfo | None) -> str:
        base = None if now is None else _since(now, origin, snap_id)
        if now is None:
            props = {k: v for k, v in _props(src_info).items() if k not in ("etag", "copy")}
            props.update(seq=0, mod=time.time(), rev=1, inc={"source": origin, "last": snap_id})
            blobs.recreate(name, 0, {"rest": props})
        elif base is not None:
            try:
                blobs.describe(source_name, base)
            except SnapshotNotFound:
                base = None  # the last copied snapshot is gone: copy it all
        blobs.copy_into(source_name, name, snap_id, since=base)
        record = {"id": copy_id, "source": f"{origin}?snapshot={snap_id}",
                  "progress": f"{src_info.size}/{src_info.size}", "time": time.time()}

        def change(p: dict[str, Any]) -> None:
            rest = p.setdefault("rest", {})
            rest["inc"] = {"source": origin, "last": snap_id}
            rest["copy"], rest["mod"], rest["rev"] = record, time.time(), int(rest.get("rev", 0)) + 1

        blobs.update_properties(name, change)
        now = blobs.describe(name)
        frozen = {**dict(now.properties.get("rest") or {}), "etag": etag(now), "mod": modified(now)}
        snap = blobs.snapshot(name, {"properties": frozen})

        def mark(p: dict[str, Any]) -> None:
            p["rest"]["copy"]["snapshot"] = snap.id

        blobs.update_properties(name, mark)
        return snap.id

    await guarded(svc, c, apply, missing_ok=True)
    info = await describe(svc, c)
    return _response(202, info, **{"x-ms-copy-id": copy_id, "x-ms-copy-status": "success"})


def _since(info: BlobInfo, origin: str, snapshot: str) -> str:
    """The snapshot an incremental copy's destination last copied from `origin`
    (refused if it copies another source, or `snapshot` is not later)."""
    inc = rest_props(info).get("inc")
    if not inc or inc.get("source") != origin:
        raise RestError(409, "IncrementalCopyBlobMismatch")
    if snapshot <= inc["last"]:
        raise RestError(409, "IncrementalCopyOfEarlierVersionSnapshotNotAllowed")
    return str(inc["last"])


async def abort_copy(svc: Service, c: Call) -> web.StreamResponse:
    await describe(svc, c)
    raise RestError(409, "NoPendingCopyOperation", "There is currently no pending copy operation.")
