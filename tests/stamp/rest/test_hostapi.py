"""The host API (/ACCOUNT/$diskstamp/...): Shared Key only, bounded JSON
bodies, the service's error style, compare-and-set, and the writes a disk's
blob takes only under its writer lease."""

from __future__ import annotations

import pytest

from stamp import Stamp
from stamp.disks import Disks, DiskState, ResourceInUse, ResourceNotFound
from stamp.errors import (
    AuthorizationFailure,
    LeaseIdMismatch,
    LeaseNotPresentWithBlobOperation,
    RequestBodyTooLarge,
)
from stamp.remote import RemoteStamp
from stamp.rest.hostapi import MAX_BODY

from .conftest import Server


@pytest.fixture(scope="module")
def remote(server: Server):
    with Stamp.open(server.stamp) as st:
        Disks(st).create_empty("hd1", 1, "Premium_LRS")
    with RemoteStamp(server.endpoint) as r:
        yield r


def test_records_and_compare_and_set(remote):
    disks = remote.records()
    assert any(d["name"] == "hd1" for d in disks.disks())
    assert disks.record("hd1")["state"] == "Unattached"
    disks.set_state("hd1", DiskState.ATTACHED, expect=DiskState.UNATTACHED, attached_to="vmx", lun=0)
    with pytest.raises(ResourceInUse, match="is Attached, not Unattached"):
        disks.set_state("hd1", DiskState.ATTACHED, expect=DiskState.UNATTACHED, attached_to="vmy", lun=0)
    assert disks.record("hd1")["attached_to"] == "vmx"
    with pytest.raises(ResourceInUse):
        disks.delete_disk("hd1")
    disks.set_state("hd1", DiskState.UNATTACHED, attached_to=None, lun=None)
    with pytest.raises(ResourceNotFound):
        disks.record("nosuch")


def test_bad_requests_get_the_services_errors(remote):
    ep = remote.endpoint
    with pytest.raises(Exception) as e:
        ep.request("POST", "$diskstamp/disks/hd1/state", body=b"{" * 100, idempotent=False)
    assert "400 InvalidInput" in str(e.value) and "not JSON" in str(e.value)
    with pytest.raises(RequestBodyTooLarge):  # 413, the body unread
        ep.request("POST", "$diskstamp/flush", body=b" " * (MAX_BODY + 1), idempotent=False)
    with pytest.raises(Exception) as e:  # only the host's fields may change
        ep.api("POST", "disks/hd1/state", {"state": "Unattached", "fields": {"sku": "UltraSSD_LRS"}})
    assert "InvalidInput" in str(e.value)
    with pytest.raises(Exception) as e:
        ep.api("POST", "disks/hd1/state", {"state": "Sideways"})
    assert "is not a disk state" in str(e.value)
    with pytest.raises(Exception) as e:  # a holder the stamp could not judge later
        ep.api("POST", "writer-lease/disks/x/1", {"action": "acquire", "lease": "6f2b1a8e-0c1d-4e5f-8a9b-0c1d2e3f4a5b",
                                                  "holder": {"lease_pid": "abc"}})
    assert "an acquire names its holder" in str(e.value)
    with pytest.raises(Exception) as e:
        ep.api("GET", "nothing")
    assert "InvalidUri" in str(e.value)


def test_a_disk_blob_takes_writes_only_under_its_writer_lease(remote):
    blob = remote.records().record("hd1")["blob"]
    with pytest.raises(AuthorizationFailure):  # no lease named: the stamp's own container is read-only
        remote.blobs.write(blob, 0, b"\1" * 512)
    with pytest.raises(LeaseNotPresentWithBlobOperation):  # a lease named, but the blob has none
        remote.blobs.write(blob, 0, b"\1" * 512, lease="6f2b1a8e-0c1d-4e5f-8a9b-0c1d2e3f4a5b")
    lease = remote.blobs.acquire_writer_lease(blob)
    try:
        with pytest.raises(LeaseIdMismatch):
            remote.blobs.write(blob, 0, b"\1" * 512, lease="6f2b1a8e-0c1d-4e5f-8a9b-0c1d2e3f4a5b")
        before = remote.blobs.version(blob)
        remote.blobs.write(blob, 0, b"\2" * (5 << 20), lease=lease)  # two Put Pages
        assert remote.blobs.read(blob, 0, 5 << 20) == b"\2" * (5 << 20)
        after = remote.blobs.version(blob)
        assert after[0] == before[0] and after[1] != before[1]  # the same blob, a new version
        remote.blobs.clear(blob, 0, 4096, lease=lease)
        assert remote.blobs.read(blob, 0, 4096) == bytes(4096)
        assert remote.blobs.version(blob)[1] != after[1]
        assert remote.blobs.page_ranges(blob)[0][0] == 4096
    finally:
        remote.blobs.release_lease(blob, lease)
