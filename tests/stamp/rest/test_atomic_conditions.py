"""Conditional writes are one atomic step with their check, across server
processes: two `stamp serve` processes on one stamp folder, two SDK clients
racing the same If-Match (or If-Unmodified-Since) ETag on every conditional
write operation other than Put Page; each round exactly one goes through."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobLeaseClient, ContentSettings

from .conftest import start_server, stop_server

ROUNDS = 12
IF_MATCH = MatchConditions.IfNotModified


@pytest.fixture
def pair(server, request):
    """Two blob clients of one blob, each through its own server process."""
    other = start_server(server.stamp)
    name = request.node.name.replace("_", "-").lower()[:50].strip("-")
    cc = server.service().create_container(name)
    try:
        a = cc.get_blob_client("race")
        b = BlobClient.from_connection_string(other.connection_string, name, "race")
        yield a, b
    finally:
        cc.delete_container()
        assert "Traceback" not in stop_server(other)


def race(calls: list[Callable[[], Any]]) -> list[str]:
    """Run the calls at once; each is "ok" or the HTTP status it was refused with."""
    results: list[str] = []
    gate = threading.Barrier(len(calls))

    def one(call: Callable[[], Any]) -> None:
        gate.wait()
        try:
            call()
            results.append("ok")
        except (ResourceModifiedError, ResourceNotFoundError, HttpResponseError) as e:
            results.append(str(e.status_code))

    threads = [threading.Thread(target=one, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results)


OPERATIONS: dict[str, Callable[[BlobClient, str, int], Any]] = {
    "set_metadata": lambda c, etag, i: c.set_blob_metadata({"who": str(i)}, etag=etag, match_condition=IF_MATCH),
    "set_properties": lambda c, etag, i: c.set_http_headers(ContentSettings(content_type=f"x/{i}"), etag=etag,
                                                            match_condition=IF_MATCH),
    "resize": lambda c, etag, i: c.resize_blob(512 * (4 + i), etag=etag, match_condition=IF_MATCH),
    "sequence_number": lambda c, etag, i: c.set_sequence_number("increment", etag=etag, match_condition=IF_MATCH),
}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_if_match_lets_one_writer_through_across_servers(pair, op):
    a, b = pair
    a.create_page_blob(4096)
    for _ in range(ROUNDS):
        etag = a.get_blob_properties().etag
        got = race([lambda c=c, i=i, etag=etag: OPERATIONS[op](c, etag, i) for i, c in enumerate((a, b))])
        assert got == ["412", "ok"], got


def test_if_match_on_lease_and_delete_lets_one_through(pair):
    """Lease acquire and delete change no ETag, so each is raced against a
    metadata change with the same If-Match: either order leaves one refused
    (a lease taken first refuses the change too)."""
    a, b = pair
    a.create_page_blob(4096)
    for i in range(ROUNDS):
        etag = a.get_blob_properties().etag
        def change(i: int = i, etag: str = etag) -> None:
            b.set_blob_metadata({"r": str(i)}, etag=etag, match_condition=IF_MATCH)

        def act(i: int = i, etag: str = etag) -> None:
            if i % 2:
                a.acquire_lease(15, etag=etag, match_condition=IF_MATCH)
            else:
                a.delete_blob(delete_snapshots="include", etag=etag, match_condition=IF_MATCH)

        got = race([act, change])
        assert got.count("ok") == 1, (i, got)
        props = _props_or_none(a)
        if props is None:
            a.create_page_blob(4096)
        elif props.lease.state == "leased":
            BlobLeaseClient(a).break_lease(0)  # the next round starts unleased


def test_a_snapshot_under_if_match_is_of_the_state_it_matched(pair):
    """A snapshot taken If-Match an ETag holds what that ETag named, even
    while another server writes the blob: a write that lands first fails
    the condition, one after it is not in the snapshot."""
    a, b = pair
    a.create_page_blob(4096)
    for i in range(ROUNDS):
        old, new = bytes([65 + i % 26]) * 512, bytes([97 + i % 26]) * 512
        a.upload_page(old, offset=0, length=512)
        etag = a.get_blob_properties().etag
        taken: dict[str, Any] = {}

        def snap(etag: str = etag, taken: dict[str, Any] = taken) -> None:
            taken.update(a.create_snapshot(etag=etag, match_condition=IF_MATCH))

        got = race([snap, lambda new=new: b.upload_page(new, offset=0, length=512)])
        if "snapshot" in taken:
            held = a.from_blob_url(a.url, credential=a.credential, snapshot=taken["snapshot"])
            assert held.download_blob(offset=0, length=512).readall() == old, (i, got)


def _props_or_none(c: BlobClient) -> Any:
    try:
        return c.get_blob_properties()
    except ResourceNotFoundError:
        return None
