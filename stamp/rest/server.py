"""Running the endpoint: `stamp serve`.

Binds 127.0.0.1:10000 unless told otherwise (the SDK reads the account from
the path only for 127.0.0.1 and localhost hosts, so path-style URLs work
there); TLS when given a certificate and key. Accounts: devstoreaccount1 with
its published key, plus those in STAMP/accounts.json ({"NAME": "BASE64KEY"}
or {"NAME": ["KEY1", "KEY2"]}) and those given on the command line. Prints
one JSON line when it listens; SIGTERM and SIGINT stop it cleanly (requests
in flight finish, then the stamp is closed). Several processes may serve one
stamp folder at once (each on its own port): the stamp is multi-process.
A request aiohttp cannot parse (a header line over 8 KiB, a bad request
line, a bad Content-Length or Transfer-Encoding, a bad chunk) is the
client's error: answered as the service answers one (400 with
x-ms-error-code and an XML body: InvalidHeaderValue naming Content-Length
or Transfer-Encoding, else InvalidInput; `_parse_error`), the connection
closed, and logged in one line, never with a traceback. A connection must send its first
request's head within the stall timeout and may then idle (or be slow in a
later head) IDLE_TIMEOUT seconds: aiohttp alone keeps a connection that
trickles a head forever, so a few thousand such clients (slowloris) would
take every file descriptor and lock everyone else out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from vhd.budget import fixed_mmap_threshold

from ..errors import StampError
from ..stamp import Stamp
from .auth import DEVSTORE_ACCOUNT, Accounts
from .call import Limits, Service
from .dispatch import DEFAULT_VERSION, SERVER, Endpoint, error_response
from .errors import RestError, header_error
from .headers import http_date

ACCOUNTS_FILE = "accounts.json"
IDLE_TIMEOUT = 120.0  # seconds a connection may sit between requests (or in the head of a later one)


class _ClientErrors(logging.Filter):
    """aiohttp logs a request it cannot parse with the parser's traceback:
    keep the line (who, and what was wrong), drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = f"{record.getMessage()}: {exc}"[:300], ()
            record.exc_info = record.exc_text = None
        return True


def _parse_error(exc: HttpProcessingError) -> RestError:
    """The service's error for a request aiohttp's parser refused."""
    text = str(exc.message or exc)
    for name in ("Content-Length", "Transfer-Encoding"):
        if name in text:
            found = re.search(rf"{name}: ([^'\n]*)", text)
            return header_error(name, found.group(1) if found else "")
    if isinstance(exc, LineTooLong):
        return RestError(400, "InvalidInput", "A request line or header line is longer than 8190 bytes, or the "
                         "headers are too many.")
    return RestError(400, "InvalidInput", f"The request is not valid HTTP/1.1: {text.splitlines()[0][:200]}")


class _Handler(RequestHandler):
    """aiohttp's protocol, answering a request its parser refused as the
    service does (aiohttp's own answer is a plain-text 400)."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was begun: the connection is dropped")
        rid = str(uuid.uuid4())
        resp = error_response("", _parse_error(exc), rid)
        resp.headers.update({"x-ms-request-id": rid, "x-ms-version": DEFAULT_VERSION, "Date": http_date(time.time()),
                             "Server": SERVER})
        resp.force_close()
        return resp


def _no_request_yet(protocol: Any) -> None:
    """Close a connection that has not sent one whole request head since it
    opened (aiohttp itself waits for it forever)."""
    transport = getattr(protocol, "transport", None)
    if getattr(protocol, "_request_count", 1) == 0 and transport is not None and not transport.is_closing():
        transport.close()


def load_accounts(stamp_path: str, extra: list[str]) -> Accounts:
    """The default account, the stamp folder's accounts.json and NAME:KEY pairs."""
    accounts = Accounts.default()
    path = os.path.join(stamp_path, ACCOUNTS_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise StampError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise StampError(f"{path}: expected {{\"ACCOUNT\": \"BASE64KEY\"}}")
        for name, keys in data.items():
            for key in keys if isinstance(keys, list) else [keys]:
                _add(accounts, str(name), str(key), path)
    for item in extra:
        name, sep, key = item.partition(":")
        if not sep or not name:
            raise StampError(f"--account {item!r}: use NAME:BASE64KEY")
        _add(accounts, name, key, "--account")
    return accounts


def _add(accounts: Accounts, name: str, key: str, where: str) -> None:
    if name == DEVSTORE_ACCOUNT and accounts.keys.get(name) and where == "--account":
        accounts.keys[name] = []  # a key given for the default account replaces the published one
    try:
        accounts.add(name, key)
    except ValueError as e:
        raise StampError(f"{where}: {e}") from None


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not cert or not key:
        raise StampError("TLS needs both --cert and --key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise StampError(f"cannot load the TLS certificate or key: {e}") from None
    return ctx


async def _serve(st: Stamp, host: str, port: int, accounts: Accounts, limits: Limits,
                 tls: ssl.SSLContext | None) -> None:
    svc = Service(st, accounts, limits)
    logging.getLogger("aiohttp.server").addFilter(_ClientErrors())
    runner = web.AppRunner(Endpoint(svc).app(), access_log=None, handle_signals=False,
                           keepalive_timeout=IDLE_TIMEOUT)
    await runner.setup()
    loop = asyncio.get_running_loop()
    web_server = runner.server
    assert web_server is not None

    def connection() -> Any:  # aiohttp's protocol (ours), with a deadline for the first request's head
        protocol = _Handler(web_server, loop=loop, **web_server._kwargs)
        loop.call_later(limits.stall_timeout, _no_request_yet, protocol)
        return protocol

    try:
        server = await loop.create_server(connection, host, port, ssl=tls, backlog=128)
    except OSError as e:
        await runner.cleanup()
        raise StampError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    scheme = "https" if tls else "http"
    shown = f"[{host}]" if ":" in host else host
    print(json.dumps({"listening": f"{scheme}://{shown}:{bound}", "stamp": st.path, "accounts": sorted(accounts.keys),
                      "blob_endpoint": f"{scheme}://{shown}:{bound}/{DEVSTORE_ACCOUNT}"}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await runner.cleanup()
        svc.pool.shutdown(wait=True)


def serve(stamp_path: str, host: str = "127.0.0.1", port: int = 10000, accounts: list[str] | None = None,
          cert: str | None = None, key: str | None = None, limits: Limits | None = None) -> int:
    """Serve the stamp folder until SIGTERM or SIGINT."""
    acc = load_accounts(stamp_path, accounts or [])
    tls = tls_context(cert, key)
    fixed_mmap_threshold()
    with Stamp.open(stamp_path) as st:
        asyncio.run(_serve(st, host, port, acc, limits or Limits(), tls))
    print(json.dumps({"stopped": True}), file=sys.stderr, flush=True)
    return 0
