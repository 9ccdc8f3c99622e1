"""Running the endpoint: `stamp serve`.

Binds 127.0.0.1:10000 unless told otherwise (the SDK reads the account from
the path only for 127.0.0.1 and localhost hosts, so path-style URLs work
there); TLS when given a certificate and key. Accounts: devstoreaccount1 with
its published key, plus those in STAMP/accounts.json ({"NAME": "BASE64KEY"}
or {"NAME": ["KEY1", "KEY2"]}) and those given on the command line. Prints
one JSON line when it listens; SIGTERM and SIGINT stop it cleanly (requests
in flight finish, then the stamp is closed). Several processes may serve one
stamp folder at once (each on its own port): the stamp is multi-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from typing import Any

from aiohttp import web

from vhd.budget import fixed_mmap_threshold

from ..errors import StampError
from ..stamp import Stamp
from .auth import DEVSTORE_ACCOUNT, Accounts
from .call import Limits, Service
from .dispatch import Endpoint

ACCOUNTS_FILE = "accounts.json"


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
    runner = web.AppRunner(Endpoint(svc).app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls, backlog=128)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise StampError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server: Any = site._server
    bound = server.sockets[0].getsockname()[1] if server and server.sockets else port
    scheme = "https" if tls else "http"
    shown = f"[{host}]" if ":" in host else host
    print(json.dumps({"listening": f"{scheme}://{shown}:{bound}", "stamp": st.path, "accounts": sorted(accounts.keys),
                      "blob_endpoint": f"{scheme}://{shown}:{bound}/{DEVSTORE_ACCOUNT}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
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
