"""Container and service operations of the Blob REST protocol, over
stamp.Containers: create, delete, properties, metadata, access policy, list
containers, list blobs, account information.

Rules: listings page with `marker` (the name to start from, returned as
NextMarker) and `maxresults` (1 to 5,000; default 5,000), and a page holds
at most `maxresults` entries; a blob's snapshots are listed just before it,
oldest first, and a page never splits a blob from its snapshots unless they
alone overflow it: then the page is the first of them and its NextMarker
points into the blob's snapshot list (`snapshot_marker`, opaque as the
service's), so a blob with 100,000 snapshots is listed a page at a time;
with `delimiter`, names with the delimiter past the prefix fold into one
BlobPrefix each. Container
leases are not supported (a clear error). A conditional change (set
metadata, delete) checks its If-(Un)Modified-Since again in the transaction
that makes it (`guarded`), so two servers on one stamp cannot both pass.

Accounts: a container belongs to the account that created it (the record's
`account`; none: the default account, devstoreaccount1). Another account
neither lists it nor reaches it or its blobs (404 ContainerNotFound, checked
after authorization: `check_owner`), though names stay unique across the
stamp: creating a name another account holds is 409 ContainerAlreadyExists.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from aiohttp import web

from ..errors import BlobNotFound, ContainerNotFound
from ..pageblob import BlobInfo
from . import headers as hd
from . import pageblobs, xmlbody
from .auth import DEVSTORE_ACCOUNT
from .call import Call, Service
from .errors import RestError, header_error, query_error

MAX_LIST = 5000
_B64 = re.compile(r"[A-Za-z0-9_-]+=*")
T = TypeVar("T")


def container_etag(record: dict[str, Any]) -> str:
    digest = hashlib.blake2b(f"{record['name']}:{record['created']}:{record['rev']}".encode(),
                             digest_size=7).hexdigest()
    return f'"0x8{digest.upper()}"'


def _headers(record: dict[str, Any]) -> dict[str, str]:
    return {"ETag": container_etag(record), "Last-Modified": hd.http_date(record["modified"])}


def public_access(c: Call) -> str | None:
    value = c.headers.get("x-ms-blob-public-access")
    if value is not None and value not in ("blob", "container"):
        raise header_error("x-ms-blob-public-access", value)
    return value


def owner(record: dict[str, Any]) -> str:
    """The account a container belongs to: the one that created it (records
    without one, the system containers' included, are the default account's)."""
    return str(record.get("account") or DEVSTORE_ACCOUNT)


async def check_owner(svc: Service, account: str, container: str) -> None:
    """404 ContainerNotFound unless `container` (if it exists) is `account`'s.
    Free while the server knows one account only."""
    if list(svc.accounts.keys) == [account]:
        return
    try:
        record = await svc.run(svc.stamp.containers.get, container)
    except ContainerNotFound:
        return
    if owner(record) != account:
        raise RestError(404, "ContainerNotFound")


async def create(svc: Service, c: Call) -> web.StreamResponse:
    record = await svc.run(svc.stamp.containers.create, c.container, hd.metadata(c.headers), public_access(c),
                           None if c.account == DEVSTORE_ACCOUNT else c.account)
    return web.Response(status=201, headers=_headers(record))


async def guarded(svc: Service, c: Call, act: Callable[[], T]) -> T:
    """act() after the container's conditions are checked, in one stamp
    transaction with what act changes (as pageblobs.guarded for blobs)."""
    assert c.container is not None
    name = c.container

    def run() -> T:
        with svc.stamp.meta.atomic() as txn:
            pageblobs.conditions.check(c.headers, None, svc.stamp.containers.get_in(txn, name)["modified"])
            return act()

    return await svc.run(run)


async def delete(svc: Service, c: Call) -> web.StreamResponse:
    if "x-ms-lease-id" in c.headers:
        raise RestError(400, "UnsupportedHeader", "Container leases are not supported by this endpoint.",
                        HeaderName="x-ms-lease-id")
    record = await svc.run(svc.stamp.containers.get, c.container)
    pageblobs.conditions.check(c.headers, None, record["modified"])
    await guarded(svc, c, lambda: svc.stamp.containers.delete(c.container or ""))
    return web.Response(status=202)


async def properties(svc: Service, c: Call) -> web.StreamResponse:
    record = await svc.run(svc.stamp.containers.get, c.container)
    out = _headers(record)
    out.update({f"x-ms-meta-{k}": v for k, v in record["metadata"].items()})
    out.update({"x-ms-lease-state": "available", "x-ms-lease-status": "unlocked",
                "x-ms-has-immutability-policy": "false", "x-ms-has-legal-hold": "false",
                "x-ms-default-encryption-scope": "$account-encryption-key",
                "x-ms-deny-encryption-scope-override": "false"})
    if record.get("public_access"):
        out["x-ms-blob-public-access"] = record["public_access"]
    return web.Response(status=200, headers=out)


async def set_metadata(svc: Service, c: Call) -> web.StreamResponse:
    meta = hd.metadata(c.headers)
    record = await svc.run(svc.stamp.containers.get, c.container)
    pageblobs.conditions.check(c.headers, None, record["modified"])
    record = await guarded(svc, c, lambda: svc.stamp.containers.update(c.container or "", meta))
    return web.Response(status=200, headers=_headers(record))


async def get_acl(svc: Service, c: Call) -> web.StreamResponse:
    record = await svc.run(svc.stamp.containers.get, c.container)
    out = _headers(record)
    if record.get("public_access"):
        out["x-ms-blob-public-access"] = record["public_access"]
    body = xmlbody.signed_identifiers(record.get("policies", {}))
    return web.Response(status=200, body=body, content_type="application/xml", headers=out)


async def set_acl(svc: Service, c: Call) -> web.StreamResponse:
    access = public_access(c)
    n = c.request.content_length
    if n is None and c.request.body_exists:
        raise RestError(411, "MissingContentLengthHeader", "Content-Length HTTP header is missing.")
    if n and n > xmlbody.MAX_XML:
        raise RestError(413, "RequestBodyTooLarge", MaxLimit=str(xmlbody.MAX_XML))
    body = await svc.read_body(c.request, n) if n else b""
    policies = xmlbody.parse_signed_identifiers(body)
    record = await svc.run(svc.stamp.containers.update, c.container, None, access, policies)
    return web.Response(status=200, headers=_headers(record))


async def account_info(svc: Service, c: Call) -> web.StreamResponse:
    return web.Response(status=200, headers={"x-ms-sku-name": "Standard_LRS", "x-ms-account-kind": "StorageV2",
                                             "x-ms-is-hns-enabled": "false"})


def _limit(c: Call) -> int:
    limit = hd.query_int(c.query, "maxresults", 1, 2 ** 31)
    return MAX_LIST if limit is None else min(limit, MAX_LIST)


def _includes(c: Call) -> set[str]:
    return {s.strip().lower() for s in c.query.get("include", "").split(",") if s.strip()}


def endpoint(c: Call) -> str:
    return f"{c.request.scheme}://{c.request.host}/{c.account}/"


async def list_containers(svc: Service, c: Call) -> web.StreamResponse:
    prefix, marker, limit = c.query.get("prefix", ""), c.query.get("marker", ""), _limit(c)
    records, next_marker = await svc.run(svc.stamp.containers.names, prefix, marker, limit)
    out = []
    for r in records:
        if owner(r) != c.account:
            continue
        props = {"Last-Modified": hd.http_date(r["modified"]), "Etag": container_etag(r).strip('"'),
                 "LeaseStatus": "unlocked", "LeaseState": "available"}
        if r.get("public_access"):
            props["PublicAccess"] = r["public_access"]
        props.update({"HasImmutabilityPolicy": "false", "HasLegalHold": "false"})
        out.append({"name": r["name"], "properties": props, "metadata": r["metadata"]})
    body = xmlbody.container_list(endpoint(c), prefix, marker, limit if "maxresults" in c.query else None, out,
                                  "metadata" in _includes(c), next_marker)
    return web.Response(status=200, body=body, content_type="application/xml")


async def list_blobs(svc: Service, c: Call) -> web.StreamResponse:
    prefix, marker, limit = c.query.get("prefix", ""), c.query.get("marker", ""), _limit(c)
    delimiter = c.query.get("delimiter", "")
    include = _includes(c)
    known = {"snapshots", "metadata", "copy", "deleted", "uncommittedblobs", "tags", "versions", "immutabilitypolicy",
             "legalhold", "deletedwithversions", "permissions"}
    if include - known:
        raise query_error("include", c.query.get("include", ""))
    entries, prefixes, next_marker = await svc.run(_page, svc, c, prefix, marker, delimiter, limit, include)
    body = xmlbody.blob_list(endpoint(c), c.container or "", prefix, marker,
                             limit if "maxresults" in c.query else None, delimiter, entries, prefixes, next_marker)
    return web.Response(status=200, body=body, content_type="application/xml")


def _names(svc: Service, c: Call, prefix: str, marker: str, limit: int,
           skip: Callable[[], str]) -> Iterator[str]:
    """Blob names from `marker` on, read `limit` + 1 at a time (one page's
    worth: the listing never holds the container's names); each batch
    after the first starts past the last name read and past `skip()`,
    the folder the page has already rolled up (its other names add nothing)."""
    start = marker
    while True:
        names = svc.stamp.containers.blob_names(c.container or "", prefix, start, limit + 1)
        yield from names
        if len(names) <= limit:
            return
        start = max(names[-1] + "\0", skip())  # no name holds a NUL: the first name after the last one read


def snapshot_marker(name: str, epoch: int) -> str:
    """The NextMarker of a page that ends inside blob `name`'s snapshots: the
    next page lists it from its snapshot of `epoch` on (then the blob). As
    the service's, opaque: "2!" + the length + "!" + base64 of "EPOCH!NAME"."""
    payload = base64.urlsafe_b64encode(f"{epoch}!{name}".encode("utf-8", "surrogatepass")).decode()
    return f"2!{len(payload)}!{payload}"


def parse_marker(marker: str) -> tuple[str, int]:
    """A marker's blob name and the epoch its snapshots are listed from (0:
    all); a marker that is not snapshot_marker's is a blob name. (A blob
    named exactly as a valid snapshot marker would be read as one.)"""
    head, _, payload = marker.partition("!")
    length, _, payload = payload.partition("!")
    if head != "2" or not hd.digits(length) or int(length) != len(payload) or not _B64.fullmatch(payload):
        return marker, 0
    try:
        epoch, bang, name = base64.urlsafe_b64decode(payload).decode("utf-8", "surrogatepass").partition("!")
    except (ValueError, UnicodeDecodeError):
        return marker, 0
    if not bang or not hd.digits(epoch) or not name:
        return marker, 0
    return name, int(epoch)


def _page(svc: Service, c: Call, prefix: str, marker: str, delimiter: str, limit: int,
          include: set[str]) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """One page of a blob listing, at most `limit` entries (runs on the pool:
    it reads each blob, and at most `limit` + 1 of a blob's snapshots)."""
    entries: list[dict[str, Any]] = []
    prefixes: list[str] = []
    count = 0
    blobs = svc.stamp.blobs
    start, since = parse_marker(marker)

    def listed(info: BlobInfo, name: str) -> dict[str, Any]:
        return pageblobs.list_entry(info, name, "metadata" in include, "copy" in include)

    def skip() -> str:  # past every name in the last folder rolled up (U+10FFFF is the last code point)
        return prefixes[-1] + "\U0010ffff" if prefixes else ""

    for name in _names(svc, c, prefix, start, limit, skip):
        if delimiter:
            cut = name.find(delimiter, len(prefix))
            if cut >= 0:
                folder = name[:cut + len(delimiter)]
                if prefixes and prefixes[-1] == folder:
                    continue
                if count == limit:
                    return entries, prefixes, name
                prefixes.append(folder)
                count += 1
                continue
        full, room = f"{c.container}/{name}", limit - count
        epoch = since if name == start else 0
        try:
            snaps = blobs.describe_snapshots(full, epoch, room + 1) if "snapshots" in include else []
            info = blobs.describe(full)
        except BlobNotFound:
            continue  # deleted since the names were read
        if len(snaps) + 1 <= room:
            entries += [listed(s, name) for _, s in snaps] + [listed(info, name)]
            count += len(snaps) + 1
            continue
        if count:  # a blob and its snapshots start a page of their own, unless they alone overflow one
            return entries, prefixes, name
        entries += [listed(s, name) for _, s in snaps[:room]]
        return entries, prefixes, snapshot_marker(name, snaps[room][0] if len(snaps) > room else snaps[-1][0] + 1)
    return entries, prefixes, None
