"""The host API: diskstamp's own JSON API (not Azure's) for hosts over the network.

The Blob protocol carries a disk's pages but not its managed-disk record; a
host (`hostcache init --stamp URL`, stamp.remote) needs the records too.
Everything lives under /ACCOUNT/$diskstamp/ (no container can be named so):

    GET    disks                      {"disks": [record, ...]}
    GET    disks/NAME                 the disk's record
    PUT    disks/NAME                 create from an image: {"image", "size_gib"?, "sku"?}; 201 and the record
    DELETE disks/NAME                 delete the disk (not while attached: 409 ResourceInUse)
    POST   disks/NAME/state           {"state", "expect"?, "fields"?}: compare-and-set; the record
    GET    images/NAME                the image's record
    POST   writer-lease/BLOB          {"action": "acquire", "lease", "holder", "stale"?} -> {"lease"};
                                      {"action": "release", "lease"}; {"action": "holder"} -> {"holder"}
    POST   flush                      {"shared": bool}: the stamp durable (Stamp.flush / flush_shared)

Rules kept:
- every request is signed with the account's Shared Key (as any Blob
  request, over the raw path); SAS and anonymous requests are refused, and
  so is another account than the one the stamp's disks belong to (the
  default account's, as the Blob endpoint has them);
- bodies are JSON objects of at most MAX_BODY bytes, read only after the
  length is checked (413 RequestBodyTooLarge above it; 411 without a
  Content-Length, and the connection is closed rather than drained);
- errors are the service's (status, x-ms-error-code, XML body): a stamp
  error keeps its code and its message (LeaseAlreadyPresent, BlobNotFound, OperationNotAllowed,
  InvalidParameter...), and the managed-disk layer's own ones are
  404 ResourceNotFound, 409 ResourceExists, 409 ResourceInUse (a state
  transition whose expected state is not the disk's: two hosts cannot both
  attach one disk), 400 InvalidInput;
- a state transition sets the state and the host's fields (attached_to,
  lun, host, throttle_credits) only, each of its type (what every host
  reads back); nothing else of the record;
- the writer lease is a disk's blob's only (disks/...: an image's, held
  forever by a holder elsewhere, could not be deleted); an acquire names
  the host it is for (`host`: the host folder's identity) and is refused
  (409 ResourceInUse) while the disk is attached to a VM of another host,
  unless the lease it takes over is stale; it is held forever
  until released; an acquire with the id
  the client proposed is the same acquire (a retry after a lost answer gets
  the lease, not a refusal); a release of a lease already gone is done.
Not offered: creating disks other than from an image, images, snapshots,
grants, performance changes, vault backups (the `stamp` command does those
where the stamp is).
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from ..disks import DiskState, ResourceExists, ResourceInUse, ResourceNotFound
from ..errors import AzureError, ComputeError, LeaseNotPresentWithLeaseOperation, StampError
from ..pageblob import HOLDER_KEYS
from . import auth
from .call import Service
from .errors import RestError
from .managed import disks_of
from .pageblobs import DISKS

ROOT = "$diskstamp"
MAX_BODY = 64 * 1024
HOST_FIELDS = ("attached_to", "lun", "host", "throttle_credits")


def is_host_api(container: str | None) -> bool:
    return container == ROOT


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json")


async def _body(svc: Service, request: web.Request) -> dict[str, Any]:
    if request.content_length is None and request.body_exists:  # chunked: its size is not known before it is read
        raise RestError(411, "MissingContentLengthHeader", "Content-Length HTTP header is missing.")
    n = request.content_length or 0
    if n > MAX_BODY:
        raise RestError(413, "RequestBodyTooLarge", MaxLimit=str(MAX_BODY))
    raw = await svc.read_body(request, n) if n else b"{}"
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RestError(400, "InvalidInput", "The body is not JSON.") from None
    if not isinstance(body, dict):
        raise RestError(400, "InvalidInput", "The body is a JSON object.")
    return body


def _stamp_error(e: StampError) -> RestError:
    """The answer for a stamp error the managed-disk layer raised (its own have no code)."""
    for cls, status, code in ((ResourceNotFound, 404, "ResourceNotFound"), (ResourceExists, 409, "ResourceExists"),
                              (ResourceInUse, 409, "ResourceInUse")):
        if isinstance(e, cls):
            return RestError(status, code, str(e))
    if isinstance(e, ComputeError | AzureError):  # the stamp's own message (who holds a lease, say)
        return RestError(e.status, e.code, str(e).removeprefix(f"{e.code}: "))
    if type(e) is StampError:
        return RestError(400, "InvalidInput", str(e))
    raise e  # a node down, a full disk: the endpoint's answer (503 ServerBusy)


def _state(value: Any, what: str) -> DiskState:
    try:
        return DiskState(value)
    except ValueError:
        raise RestError(400, "InvalidInput", f"{what} {value!r} is not a disk state") from None


async def serve(svc: Service, request: web.Request, areq: auth.Request, rest: str) -> web.StreamResponse:
    """One host API request; `rest` is the path after /ACCOUNT/$diskstamp/, decoded."""
    if "Authorization" not in areq.headers:
        raise RestError(403, "AuthorizationFailure", "The host API takes the account's Shared Key only.")
    auth.verify_shared_key(areq, svc.accounts)
    auth.check_date(areq)
    if areq.account != auth.DEVSTORE_ACCOUNT and list(svc.accounts.keys) != [areq.account]:
        # the stamp's disks are the default account's (containers.owner): over Blob REST another
        # account's key cannot even read them, so it must not create, delete or attach them here
        raise RestError(403, "AuthorizationFailure", f"The host API serves the account the stamp's disks "
                        f"belong to ({auth.DEVSTORE_ACCOUNT}), not {areq.account}.")
    kind, _, name = rest.partition("/")
    try:
        return await _route(svc, request, request.method, kind, name)
    except StampError as e:
        raise _stamp_error(e) from None


async def _route(svc: Service, request: web.Request, method: str, kind: str, name: str) -> web.StreamResponse:
    disks = disks_of(svc)
    if kind == "flush" and method == "POST" and not name:
        body = await _body(svc, request)
        await svc.run(svc.stamp.flush_shared if body.get("shared") else svc.stamp.flush)
        return _json({})
    if kind == "images" and method == "GET" and name:
        return _json(await svc.run(disks.image, name))
    if kind == "writer-lease" and method == "POST" and name:
        return await _writer_lease(svc, name, await _body(svc, request))
    if kind != "disks":
        raise RestError(400, "InvalidUri", f"The host API has no {method} {kind or '/'}.")
    disk, _, action = name.partition("/")
    if not disk:
        if method != "GET":
            raise RestError(405, "UnsupportedHttpVerb")
        return _json({"disks": await svc.run(disks.disks)})
    if action == "state" and method == "POST":
        return _json(await _set_state(svc, disk, await _body(svc, request)))
    if action:
        raise RestError(400, "InvalidUri", f"The host API has no {method} disks/NAME/{action}.")
    if method == "GET":
        return _json(await svc.run(disks.record, disk))
    if method == "PUT":
        return _json(await _create(svc, disk, await _body(svc, request)), 201)
    if method == "DELETE":
        await svc.run(disks.delete_disk, disk)
        return _json({}, 200)
    raise RestError(405, "UnsupportedHttpVerb")


async def _set_state(svc: Service, disk: str, body: dict[str, Any]) -> dict[str, Any]:
    state = _state(body.get("state"), "state")
    expect = None if body.get("expect") is None else _state(body["expect"], "expect")
    fields = body.get("fields") or {}
    if not isinstance(fields, dict) or set(fields) - set(HOST_FIELDS):
        raise RestError(400, "InvalidInput", f"fields are some of {', '.join(HOST_FIELDS)}")
    for key, value in fields.items():
        if value is not None and not _FIELD_OK[key](value):
            raise RestError(400, "InvalidInput", f"{key} {str(value)[:64]!r}: {_FIELD_RULE[key]} (or null)")
    result: dict[str, Any] = await svc.run(disks_of(svc).set_state, disk, state, expect, **fields)
    return result


async def _create(svc: Service, disk: str, body: dict[str, Any]) -> dict[str, Any]:
    image, size_gib, sku = body.get("image"), body.get("size_gib"), body.get("sku", "Premium_LRS")
    if not isinstance(image, str) or not isinstance(sku, str) or \
            (size_gib is not None and (isinstance(size_gib, bool) or not isinstance(size_gib, int))):
        raise RestError(400, "InvalidInput", "a disk is made from {\"image\": NAME, \"size_gib\": N or null, "
                        "\"sku\": SKU}")
    result: dict[str, Any] = await svc.run(disks_of(svc).create_from_image, disk, image, size_gib, sku)
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# what a host's field holds in a disk record (hostcache.host), checked before the stamp keeps it: every
# host over the stamp reads them back (a lun that is not a number, credits that are not: its traceback)
_FIELD_OK = {
    "attached_to": lambda v: isinstance(v, str) and len(v) <= 1024,
    "host": lambda v: isinstance(v, str) and len(v) <= 4096,
    "lun": lambda v: isinstance(v, int) and not isinstance(v, bool) and -1 <= v < 1024,
    "throttle_credits": lambda v: isinstance(v, list) and len(v) <= 16 and all(_is_number(x) and x >= 0 for x in v),
}
_FIELD_RULE = {"attached_to": "a VM's name", "host": "a host's identity", "lun": "a LUN (-1 for the OS disk)",
               "throttle_credits": "a list of numbers, 0 or more"}


def _is_holder(value: Any) -> bool:
    """A writer lease's holder as PageBlobs records it (stamp.pageblob.this_holder)."""
    if not isinstance(value, dict) or set(value) != set(HOLDER_KEYS):
        return False
    return all(isinstance(value[k], str) and len(value[k]) <= 256 for k in ("lease_holder", "lease_host")) and \
        all(isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] >= 0
            for k in ("lease_pid", "lease_started"))


async def _writer_lease(svc: Service, blob: str, body: dict[str, Any]) -> web.StreamResponse:
    blobs, action, lease = svc.stamp.blobs, body.get("action"), body.get("lease")
    if not blob.startswith(DISKS + "/"):  # an image's or a user's blob leased forever by a holder elsewhere
        raise RestError(403, "AuthorizationFailure", "The host API's writer lease is a disk's (disks/...) only.")
    if action == "holder":
        return _json({"holder": await svc.run(blobs.writer_of, blob)})
    if not isinstance(lease, str):
        raise RestError(400, "InvalidInput", "a writer lease request names its lease id (\"lease\")")
    if action == "acquire":
        holder, stale, host = body.get("holder"), body.get("stale"), body.get("host")
        if not _is_holder(holder) or (stale is not None and not _is_holder(stale)):
            raise RestError(400, "InvalidInput", "an acquire names its holder: {\"lease_holder\": TEXT, "
                            "\"lease_pid\": N, \"lease_started\": N, \"lease_host\": TEXT}")
        if host is not None and not _FIELD_OK["host"](host):
            raise RestError(400, "InvalidInput", f"host {str(host)[:64]!r}: {_FIELD_RULE['host']} (or null)")
        # refused while the disk is attached to a VM of another host (Disks.acquire_writer_lease)
        got = await svc.run(disks_of(svc).acquire_writer_lease, blob, holder, lease, stale, host)
        return _json({"lease": got}, 201)
    if action == "release":
        try:
            await svc.run(blobs.release_lease, blob, lease)
        except LeaseNotPresentWithLeaseOperation:
            pass  # released already (a retry whose first answer was lost)
        return _json({})
    raise RestError(400, "InvalidInput", "action is acquire, release or holder")
