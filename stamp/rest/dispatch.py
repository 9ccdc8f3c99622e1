"""Routing and the request pipeline of the Blob REST endpoint.

Every request goes through `handle`, in this order:
1. admission: more than `max_requests` at once is 503 ServerBusy (clients
   retry it), never a queue that grows without bound;
2. the path, path-style: /ACCOUNT[/CONTAINER[/BLOB]], the blob name
   percent-decoded (the raw path is kept for Shared Key); /ACCOUNT/$diskstamp/...
   is the host API (hostapi.py: diskstamp's own, Shared Key only);
3. the route: verb, level, `restype` and `comp` name one operation (`ROUTES`);
   an unknown one is the service's error, decided before any body is read;
4. `x-ms-version` (any date from 2009-09-19 on; echoed);
5. authorization (auth.authorize) with the container's public access and
   stored policies looked up only when needed (anonymous requests, `si`),
   then the container's account (another account's is 404, containers.py);
6. the operation; its RestError, or a StampError mapped by errors.from_stamp,
   becomes the service's error answer (header x-ms-error-code, XML body,
   none for HEAD); a client that went away (or an answer that cannot be
   finished: a read failed after its first bytes) closes the connection,
   with nothing logged; anything else is logged and answered 500
   InternalError, never a traceback to the client.
Every answer carries x-ms-request-id, x-ms-version, Date, Server and the
client's x-ms-client-request-id.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .. import sas
from ..errors import StampError
from . import containers as ct
from . import hostapi, managed, xmlbody
from . import pageblobs as pb
from .auth import Op, Request, authorize
from .call import Call, Service
from .errors import RestError, from_stamp, query_error
from .headers import http_date, version

log = logging.getLogger("stamp.rest")
Handler = Callable[[Service, Call], Awaitable[web.StreamResponse]]
SERVER = "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"
DEFAULT_VERSION = "2026-10-06"

# (verb, level, restype, comp) -> (operation, SAS level, SAS permissions, public access level)
ROUTES: dict[tuple[str, str, str | None, str | None], tuple[Handler, Op]] = {
    ("GET", "service", None, "list"): (ct.list_containers, Op("ListContainers", "service", "l")),
    ("GET", "service", "account", "properties"): (ct.account_info, Op("GetAccountInfo", "service", "r")),
    ("HEAD", "service", "account", "properties"): (ct.account_info, Op("GetAccountInfo", "service", "r")),
    ("PUT", "container", "container", None): (ct.create, Op("CreateContainer", "container", "cw",
                                                                sas=("account",))),
    ("DELETE", "container", "container", None): (ct.delete, Op("DeleteContainer", "container", "d",
                                                                   sas=("account",))),
    ("GET", "container", "container", None): (ct.properties, Op("GetContainerProperties", "container", "r",
                                                                "container")),
    ("HEAD", "container", "container", None): (ct.properties, Op("GetContainerProperties", "container", "r",
                                                                 "container")),
    ("GET", "container", "container", "metadata"): (ct.properties, Op("GetContainerMetadata", "container", "r",
                                                                      "container")),
    ("HEAD", "container", "container", "metadata"): (ct.properties, Op("GetContainerMetadata", "container", "r",
                                                                       "container")),
    ("PUT", "container", "container", "metadata"): (ct.set_metadata, Op("SetContainerMetadata", "container",
                                                                          "w", sas=("account",))),
    ("GET", "container", "container", "acl"): (ct.get_acl, Op("GetContainerACL", "container", "r", sas=())),
    ("HEAD", "container", "container", "acl"): (ct.get_acl, Op("GetContainerACL", "container", "r", sas=())),
    ("PUT", "container", "container", "acl"): (ct.set_acl, Op("SetContainerACL", "container", "w", sas=())),
    ("GET", "container", "container", "list"): (ct.list_blobs, Op("ListBlobs", "container", "l", "container")),
    ("PUT", "blob", None, None): (pb.put_blob, Op("PutBlob", "object", "cw")),
    ("PUT", "blob", None, "page"): (pb.put_page, Op("PutPage", "object", "w")),
    ("PUT", "blob", None, "properties"): (pb.set_properties, Op("SetBlobProperties", "object", "w")),
    ("PUT", "blob", None, "metadata"): (pb.set_metadata, Op("SetBlobMetadata", "object", "w")),
    ("PUT", "blob", None, "lease"): (pb.lease, Op("LeaseBlob", "object", "w")),
    ("PUT", "blob", None, "snapshot"): (pb.snapshot, Op("SnapshotBlob", "object", "cw")),
    ("PUT", "blob", None, "incrementalcopy"): (pb.incremental_copy, Op("IncrementalCopyBlob", "object", "cw")),
    ("PUT", "blob", None, "copy"): (pb.abort_copy, Op("AbortCopyBlob", "object", "w")),
    ("GET", "blob", None, None): (pb.get_blob, Op("GetBlob", "object", "r", "blob")),
    ("HEAD", "blob", None, None): (pb.get_properties, Op("GetBlobProperties", "object", "r", "blob")),
    ("GET", "blob", None, "pagelist"): (pb.get_page_ranges, Op("GetPageRanges", "object", "r", "blob")),
    ("GET", "blob", None, "metadata"): (pb.get_metadata, Op("GetBlobMetadata", "object", "r", "blob")),
    ("HEAD", "blob", None, "metadata"): (pb.get_metadata, Op("GetBlobMetadata", "object", "r", "blob")),
    ("DELETE", "blob", None, None): (pb.delete, Op("DeleteBlob", "object", "d")),
}
OTHER_BLOB_TYPES = ("block", "blocklist", "appendblock", "seal", "tier", "tags", "query", "expiry",
                    "immutabilityPolicies", "legalhold")


async def _copy_or_put(svc: Service, c: Call) -> web.StreamResponse:
    return await (pb.copy(svc, c) if "x-ms-copy-source" in c.headers else pb.put_blob(svc, c))


def error_response(method: str, e: RestError, rid: str) -> web.Response:
    """The service's answer for `e`: its status, x-ms-error-code and XML body (none for HEAD or a 304)."""
    headers = {"x-ms-error-code": e.code, **e.headers}
    if method == "HEAD" or e.status == 304:
        return web.Response(status=e.status, headers=headers)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    body = xmlbody.error(e.code, e.message, rid, now, e.extra)
    return web.Response(status=e.status, body=body, content_type="application/xml", headers=headers)


def split_path(raw: str) -> tuple[str, str | None, str | None]:
    """/ACCOUNT[/CONTAINER[/BLOB]] of a raw path: (account, container, blob), decoded."""
    parts = raw.split("/", 3)
    account = unquote(parts[1]) if len(parts) > 1 else ""
    container = unquote(parts[2]) if len(parts) > 2 and parts[2] else None
    blob = unquote(parts[3]) if len(parts) > 3 and parts[3] else None
    if not account:
        raise RestError(400, "InvalidUri")
    return account, container, blob


def route(method: str, container: str | None, blob: str | None, query: dict[str, str]) -> tuple[Handler, Op]:
    level = "service" if container is None else "container" if blob is None else "blob"
    restype, comp = query.get("restype"), query.get("comp")
    if level == "blob" and comp in OTHER_BLOB_TYPES:
        raise RestError(409, "InvalidBlobType", f"This endpoint stores page blobs only; comp={comp} (a block, "
                        "append or tiered blob operation) is not supported.")
    if level == "blob":
        restype = None
    if level == "container" and restype is None:
        raise RestError(400, "InvalidUri", "A container operation needs ?restype=container; a blob needs a name.")
    found = ROUTES.get((method, level, restype, comp))
    if found is None:
        if method not in ("GET", "HEAD", "PUT", "DELETE"):
            raise RestError(405, "UnsupportedHttpVerb")
        name, value = ("comp", comp or "") if comp is not None or restype is None else ("restype", restype)
        raise query_error(name, value, "This operation is not supported by this endpoint.")
    handler, op = found
    if handler is pb.put_blob:
        handler = _copy_or_put
    return handler, op


class Endpoint:
    """The aiohttp application of one server process."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024 + 1024)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)  # any path, newlines too
        app.on_response_prepare.append(self._common)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = request["rid"] = str(uuid.uuid4())
        self.svc.active += 1
        try:
            if self.svc.active > self.svc.limits.max_requests:
                raise RestError(503, "ServerBusy")
            resp = await self._serve(request)
        except RestError as e:
            resp = self._error(request, e, rid)
        except StampError as e:
            resp = self._error(request, from_stamp(e), rid)
        except web.HTTPException:
            raise
        except ConnectionError:  # the client went away, or an answer already begun cannot be finished
            return self._drop(request)
        except Exception as e:  # a bug: logged here, a clean 500 to the client
            log.exception("request %s %s failed", request.method, request.rel_url)
            resp = self._error(request, RestError(500, "InternalError", f"The server encountered an internal "
                                                  f"error ({type(e).__name__}). Please retry the request."), rid)
        finally:
            self.svc.active -= 1
        return resp

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        """Close the connection, quietly: what was sent of an answer stays
        short (never followed by a pipelined answer), and aiohttp, finding
        the transport closed when it finishes the answer, neither writes nor
        logs anything (a ConnectionError raised here would be logged with a
        traceback and answered 500 into the closed socket)."""
        if request.transport is not None:
            request.transport.close()
        return web.StreamResponse(status=500)

    @staticmethod
    async def _common(request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["x-ms-request-id"] = request.get("rid", "")
        resp.headers["x-ms-version"] = request.headers.get("x-ms-version", "")[:32] or DEFAULT_VERSION
        resp.headers["Date"] = http_date(time.time())
        resp.headers["Server"] = SERVER
        client = request.headers.get("x-ms-client-request-id")
        if client is not None:
            resp.headers["x-ms-client-request-id"] = client[:1024]

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        account, container, blob = split_path(raw_path)
        query = {k: v for k, v in request.query.items()}
        if hostapi.is_host_api(container):  # diskstamp's own API for hosts over the network
            areq = Request(request.method, raw_path, list(request.query.items()), request.headers, account,
                           container, blob, None, request.remote or "", request.secure)
            return await hostapi.serve(self.svc, request, areq, blob or "")
        handler, op = route(request.method, container, blob, query)
        ver = version(request.headers) or DEFAULT_VERSION
        call = Call(request, account, container, blob, query, ver)
        areq = Request(request.method, raw_path, list(request.query.items()), request.headers, account,
                       container, blob, query.get("snapshot"), request.remote or "", request.secure)
        if managed.is_managed(container):  # a managed disk's grant (stamp disk grant-access)
            return await managed.serve(self.svc, call, handler, areq, op)
        public, policies = await self._container_rules(call, areq)
        call.auth = authorize(areq, self.svc.accounts, op, public, policies)
        if container is not None:
            await ct.check_owner(self.svc, account, container)
        return await handler(self.svc, call)

    async def _container_rules(self, call: Call, areq: Request) -> tuple[str | None, dict[str, Any] | None]:
        """The container's public access and stored policies, read only when
        the request is anonymous or names a stored policy."""
        if call.container is None or "Authorization" in areq.headers:
            return None, None
        is_sas = "sig" in call.query
        if is_sas and "si" not in call.query:
            return None, None
        try:
            record = await self.svc.run(self.svc.stamp.containers.get, call.container)
        except StampError:
            return None, {}
        policies = {k: sas.AccessPolicy(v.get("start", ""), v.get("expiry", ""), v.get("permission", ""))
                    for k, v in record.get("policies", {}).items()}
        return record.get("public_access"), policies

    def _error(self, request: web.Request, e: RestError, rid: str) -> web.Response:
        resp = error_response(request.method, e, rid)
        if request.can_read_body and (request.content_length is None or request.content_length > 64 * 1024):
            resp.force_close()  # a large (or chunked) body we did not read: close rather than drain it
        return resp
