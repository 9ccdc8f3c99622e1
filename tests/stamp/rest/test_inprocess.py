"""The endpoint in this process (aiohttp's test server), for faults a
separate server process cannot be made to meet on cue."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
from aiohttp.test_utils import TestServer

from stamp import Stamp
from stamp.errors import DataLost
from stamp.rest import Accounts, Endpoint, Limits, Service

MIB = 1 << 20


def test_a_read_failing_mid_answer_drops_the_connection(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    st.containers.create("ccc")
    st.blobs.create("ccc/b", 12 * MIB)
    st.blobs.write("ccc/b", 0, b"a" * (4 * MIB))
    st.blobs.write("ccc/b", 4 * MIB, b"b" * (4 * MIB))
    st.containers.update("ccc", public_access="container")  # anonymous reads, to keep the test short
    real = st.blobs.read

    def flaky(name, offset, length, snapshot=None):
        if offset >= 4 * MIB:
            raise DataLost("every replica of a record is damaged (injected)")
        return real(name, offset, length, snapshot)

    st.blobs.read = flaky  # type: ignore[method-assign]

    async def run() -> tuple[int, int, bool]:
        svc = Service(st, Accounts.default(), Limits())
        server = TestServer(Endpoint(svc).app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:  # old code hung here
                async with s.get(server.make_url("/devstoreaccount1/ccc/b")) as resp:
                    got = b""
                    broken = False
                    try:
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            got += chunk
                    except aiohttp.ClientPayloadError:
                        broken = True
                    return resp.status, len(got), broken
        finally:
            await server.close()
            svc.pool.shutdown()

    status, received, broken = asyncio.run(run())
    st.close()
    assert status == 200 and broken and received == 4 * MIB  # a short body, never a wrong one


def test_container_conditions_hold_through_the_change_they_guard(tmp_path):
    """Two Set Container Metadata requests, both If-Unmodified-Since the
    container's date, at once, each stamp change slowed (a window no
    scheduler gives on cue): one goes through, the other sees the first's
    change and is refused (412). Before, both checked first and both went
    through."""
    import email.utils
    import time
    from datetime import UTC, datetime, timedelta

    from stamp import sas
    from stamp.rest import DEVSTORE_ACCOUNT, DEVSTORE_KEY

    st = Stamp.create(str(tmp_path / "st"))
    made = st.containers.create("raced")
    time.sleep(1.05 - time.time() % 1)  # a change now dates the container a second later
    since = email.utils.formatdate(made["modified"], usegmt=True)
    real = st.containers.update

    def slowed(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    st.containers.update = slowed  # type: ignore[method-assign]
    token = sas.generate_account_sas(DEVSTORE_ACCOUNT, base64.b64decode(DEVSTORE_KEY), resource_types="sco",
                                     permission="rwdl", expiry=datetime.now(UTC) + timedelta(hours=1))

    async def run() -> list[int]:
        svc = Service(st, Accounts.default(), Limits())
        server = TestServer(Endpoint(svc).app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as s:
                url = server.make_url(f"/devstoreaccount1/raced?restype=container&{token}")
                cond = {"If-Unmodified-Since": since, "Content-Length": "0"}
                answers = await asyncio.gather(*(s.put(f"{url}&comp=metadata", headers={**cond, "x-ms-meta-n": str(i)})
                                                  for i in range(2)))
                return sorted(a.status for a in answers)
        finally:
            await server.close()
            svc.pool.shutdown()

    statuses = asyncio.run(run())
    st.close()
    assert statuses == [200, 412], statuses
