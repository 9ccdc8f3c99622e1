"""A `stamp serve` process on a fresh stamp, for the REST tests: started as
users start it (`python -m stamp serve --port 0`), its port read from the
JSON line it prints, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from stamp import Stamp
from stamp.rest import DEVSTORE_ACCOUNT, DEVSTORE_KEY


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT
    stamp: str

    @property
    def endpoint(self) -> str:
        return f"{self.url}/{DEVSTORE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={DEVSTORE_ACCOUNT};AccountKey={DEVSTORE_KEY};"
                f"BlobEndpoint={self.endpoint};")

    def service(self):  # a sync BlobServiceClient
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def account_sas(self) -> str:
        """A full-permission account SAS made by the SDK (an independent signer)."""
        from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

        return generate_account_sas(DEVSTORE_ACCOUNT, DEVSTORE_KEY,
                                    ResourceTypes(service=True, container=True, object=True),
                                    AccountSasPermissions(read=True, write=True, delete=True, list=True,
                                                          add=True, create=True),
                                    expiry=datetime.now(UTC) + timedelta(hours=2))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(stamp_path: str, *args: str) -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "stamp", "--stamp", stamp_path, "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"stamp serve did not start: {proc.stderr.read() if proc.stderr else ''}")
    return Server(proc, json.loads(line)["listening"], stamp_path)


def stop_server(server: Server) -> str:
    server.proc.terminate()
    try:
        _, err = server.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        _, err = server.proc.communicate()
    return err


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    path = str(tmp_path_factory.mktemp("rest") / "st")
    Stamp.create(path, extent_size=4 << 20).close()
    srv = start_server(path)
    yield srv
    err = stop_server(srv)
    assert "Traceback" not in err, err  # no request may end in an unhandled exception
    with Stamp.open(path) as st:
        report = st.check(deep=False)
        assert report.ok, report.problems
