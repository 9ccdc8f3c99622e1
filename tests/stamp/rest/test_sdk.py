"""The real azure-storage-blob SDK (sync) drives every page blob operation of
`stamp serve`, each checked against a bytearray model of the blob."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import (
    BlobClient,
    BlobSasPermissions,
    ContainerClient,
    PublicAccess,
    generate_blob_sas,
    generate_container_sas,
)

from stamp.rest import DEVSTORE_ACCOUNT, DEVSTORE_KEY

MIB = 1 << 20


@pytest.fixture
def cc(server, request):
    name = request.node.name.replace("_", "-").lower()[:50].strip("-")
    c = server.service().create_container(name)
    yield c
    c.delete_container()


def test_development_storage_connection_string_works_unchanged(server):
    # the SDK's UseDevelopmentStorage=true maps to 127.0.0.1:10000; the endpoint it builds is ours but for the port
    from azure.storage.blob import BlobServiceClient

    dev = BlobServiceClient.from_connection_string("UseDevelopmentStorage=true")
    assert dev.url.startswith("http://127.0.0.1:10000/devstoreaccount1")
    assert dev.account_name == DEVSTORE_ACCOUNT and dev.credential.account_key == DEVSTORE_KEY


def test_containers_create_properties_metadata_list_delete(server):
    svc = server.service()
    made = [svc.create_container(f"list-{i:02d}", metadata={"n": str(i)}) for i in range(7)]
    with pytest.raises(ResourceExistsError):
        svc.create_container("list-00")
    props = made[3].get_container_properties()
    assert props.metadata == {"n": "3"} and props.last_modified
    made[3].set_container_metadata({"k": "v"})
    assert made[3].get_container_properties().metadata == {"k": "v"}
    pages = svc.list_containers(name_starts_with="list-", results_per_page=3, include_metadata=True).by_page()
    seen = [[c.name for c in page] for page in pages]
    assert seen == [["list-00", "list-01", "list-02"], ["list-03", "list-04", "list-05"], ["list-06"]]
    for c in made:
        c.delete_container()
    with pytest.raises(ResourceNotFoundError):
        made[0].get_container_properties()
    with pytest.raises(HttpResponseError) as e:
        svc.create_container("Bad_Name")
    assert e.value.error_code == "InvalidResourceName"


def test_upload_snapshot_diff_download(cc):
    b = cc.get_blob_client("disk 1.vhd")
    model = bytearray(os.urandom(MIB) + bytes(9 * MIB) + os.urandom(MIB))
    b.upload_blob(bytes(model), blob_type="PageBlob")
    assert b.get_blob_properties().size == len(model)
    s1 = b.create_snapshot()["snapshot"]
    b.upload_page(b"x" * 1024, offset=4096, length=1024)
    model[4096:5120] = b"x" * 1024
    b.clear_page(offset=10 * MIB, length=8192)
    model[10 * MIB:10 * MIB + 8192] = bytes(8192)
    written, cleared = b.get_page_ranges(previous_snapshot_diff=s1)
    assert written == [{"start": 4096, "end": 5119}]
    assert cleared == [{"start": 10 * MIB, "end": 10 * MIB + 8191}]
    assert b.download_blob().readall() == bytes(model)
    assert b.download_blob(snapshot=s1).readall()[4096:5120] != b"x" * 1024
    ranges, _ = b.get_page_ranges()  # the SDK skips all-zero 4 MiB chunks, and sends the others whole
    assert ranges == [{"start": 0, "end": 4 * MIB - 1}, {"start": 8 * MIB, "end": 10 * MIB - 1},
                      {"start": 10 * MIB + 8192, "end": 11 * MIB - 1}]
    assert b.download_blob(offset=4000, length=200).readall() == bytes(model[4000:4200])


def test_page_ranges_paging_and_diff_paging(cc):
    b = cc.get_blob_client("paged")
    b.create_page_blob(1 * MIB)
    snap = b.create_snapshot()["snapshot"]
    for i in range(0, 20, 2):
        b.upload_page(b"p" * 512, offset=i * 4096, length=512)
    pages = list(b.list_page_ranges(results_per_page=3).by_page())
    assert [len(list(p)) for p in pages] == [3, 3, 3, 1]
    window, _ = b.get_page_ranges(offset=8192, length=12288)  # x-ms-range clips the list to the window
    assert window == [{"start": 8192, "end": 8703}, {"start": 16384, "end": 16895}]
    diff = [r for r in b.list_page_ranges(previous_snapshot=snap, results_per_page=4)]
    assert [(r.start, r.cleared) for r in diff] == [(i * 4096, False) for i in range(0, 20, 2)]
    # the service's own recorded example: the diff reports pages cleared since, even if empty before
    r = cc.get_blob_client("recorded")
    r.create_page_blob(2048)
    s1 = r.create_snapshot()["snapshot"]
    r.upload_page(b"a" * 1536, offset=0, length=1536)
    s2 = r.create_snapshot()["snapshot"]
    r.clear_page(offset=512, length=512)
    assert r.get_page_ranges(previous_snapshot_diff=s1) == (
        [{"start": 0, "end": 511}, {"start": 1024, "end": 1535}], [{"start": 512, "end": 1023}])
    assert r.get_page_ranges(previous_snapshot_diff=s2) == ([], [{"start": 512, "end": 1023}])
    with pytest.raises(HttpResponseError) as e:
        r.get_page_ranges(previous_snapshot_diff="2020-01-01T00:00:00.0000000Z")
    assert e.value.error_code == "PreviousSnapshotNotFound"


def test_managed_disk_diff_by_snapshot_url(cc):
    b = cc.get_blob_client("md")
    b.create_page_blob(64 * 1024)
    s1 = b.create_snapshot()["snapshot"]
    b.upload_page(b"m" * 512, offset=1024, length=512)
    sas = generate_blob_sas(DEVSTORE_ACCOUNT, cc.container_name, "md", snapshot=s1, account_key=DEVSTORE_KEY,
                            permission=BlobSasPermissions(read=True), expiry=datetime.now(UTC) + timedelta(hours=1))
    url = f"{b.url}?snapshot={s1}&{sas}"
    assert b.get_page_range_diff_for_managed_disk(url) == ([{"start": 1024, "end": 1535}], [])
    with pytest.raises(HttpResponseError) as e:  # a SAS signed for another snapshot
        b.get_page_range_diff_for_managed_disk(url.replace(s1, s1[:-2] + "9Z"))
    assert e.value.status_code == 403


def test_rules_alignment_size_and_4mib(cc):
    b = cc.get_blob_client("rules")
    with pytest.raises(HttpResponseError) as e:
        b.create_page_blob(1000)
    assert e.value.error_code == "InvalidHeaderValue"
    with pytest.raises(HttpResponseError) as e:
        b.create_page_blob(8 * 1024 ** 4 + 512)
    assert e.value.error_code == "InvalidHeaderValue"
    b.create_page_blob(8 * MIB)
    with pytest.raises(HttpResponseError) as e:
        b.upload_page(b"z" * 512, offset=8 * MIB, length=512)
    assert e.value.status_code == 416 and e.value.error_code == "InvalidPageRange"
    with pytest.raises(HttpResponseError) as e:
        b.upload_page(b"z" * (4 * MIB + 512), offset=0, length=4 * MIB + 512)
    assert e.value.status_code == 413 and e.value.error_code == "RequestBodyTooLarge"
    with pytest.raises(HttpResponseError) as e:
        b.download_blob(offset=8 * MIB, length=512).readall()
    assert e.value.status_code == 416


def test_properties_metadata_sequence_numbers_resize(cc):
    from azure.storage.blob import ContentSettings

    b = cc.get_blob_client("props")
    b.create_page_blob(MIB, sequence_number=5, metadata={"m": "1"},
                       content_settings=ContentSettings(content_type="application/x-vhd"))
    p = b.get_blob_properties()
    assert (p.page_blob_sequence_number, p.metadata, p.content_settings.content_type) == (5, {"m": "1"},
                                                                                          "application/x-vhd")
    etag = p.etag
    b.set_blob_metadata({"a": "b"})
    assert b.get_blob_properties().metadata == {"a": "b"} and b.get_blob_properties().etag != etag
    b.set_sequence_number("increment")
    b.set_sequence_number("max", 3)
    assert b.get_blob_properties().page_blob_sequence_number == 6
    b.set_sequence_number("update", 2)
    with pytest.raises(HttpResponseError) as e:
        b.upload_page(b"s" * 512, offset=0, length=512, if_sequence_number_lt=2)
    assert e.value.error_code == "SequenceNumberConditionNotMet"
    b.upload_page(b"s" * 512, offset=0, length=512, if_sequence_number_eq=2, if_sequence_number_lte=2)
    b.upload_page(b"t" * 512, offset=MIB - 512, length=512)
    b.resize_blob(512)
    assert b.get_blob_properties().size == 512
    b.resize_blob(2 * MIB)
    data = b.download_blob().readall()
    assert data[:512] == b"s" * 512 and data[512:] == bytes(2 * MIB - 512)  # pages cut off stay cleared
    b.set_http_headers(ContentSettings(content_type="text/plain", cache_control="no-cache"))
    p = b.get_blob_properties()
    assert (p.content_settings.content_type, p.content_settings.cache_control) == ("text/plain", "no-cache")


def test_conditions(cc):
    b = cc.get_blob_client("cond")
    b.create_page_blob(MIB)
    etag = b.get_blob_properties().etag
    b.upload_page(b"1" * 512, offset=0, length=512, etag=etag, match_condition=MatchConditions.IfNotModified)
    with pytest.raises(ResourceModifiedError):  # the ETag moved on with the write
        b.upload_page(b"2" * 512, offset=0, length=512, etag=etag, match_condition=MatchConditions.IfNotModified)
    future = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(ResourceModifiedError):
        b.upload_page(b"3" * 512, offset=0, length=512, if_unmodified_since=datetime(2000, 1, 1, tzinfo=UTC))
    b.upload_page(b"3" * 512, offset=0, length=512, if_unmodified_since=future)
    with pytest.raises(ResourceExistsError):
        b.upload_blob(b"\0" * 512, blob_type="PageBlob", overwrite=False)
    # a read whose If-Modified-Since fails is 304, which the SDK reports as not modified
    with pytest.raises(HttpResponseError) as e:
        b.get_blob_properties(if_modified_since=future)
    assert e.value.status_code == 304


def test_leases(cc):
    b = cc.get_blob_client("leased")
    b.create_page_blob(MIB)
    lease = b.acquire_lease(lease_duration=15)
    with pytest.raises(HttpResponseError) as e:
        b.upload_page(b"x" * 512, offset=0, length=512)
    assert e.value.error_code == "LeaseIdMissing"
    with pytest.raises(HttpResponseError) as e:
        b.acquire_lease()
    assert e.value.error_code == "LeaseAlreadyPresent"
    b.upload_page(b"x" * 512, offset=0, length=512, lease=lease)
    lease.renew()
    old = lease.id
    lease.change("4f6b0b37-8b7e-4c0b-9b8f-0c5a1f0e7a11")
    assert lease.id != old
    assert b.get_blob_properties().lease.state == "leased"
    lease.release()
    assert b.get_blob_properties().lease.state == "available"
    lease = b.acquire_lease()
    assert lease.break_lease(lease_break_period=10) == 10
    props = b.get_blob_properties().lease
    assert props.state == "breaking"
    with pytest.raises(HttpResponseError) as e:
        b.acquire_lease()
    assert e.value.error_code == "LeaseIsBreakingAndCannotBeAcquired"
    assert lease.break_lease(lease_break_period=0) == 0
    assert b.get_blob_properties().lease.state == "broken"
    b.upload_page(b"y" * 512, offset=0, length=512)  # a broken lease holds nothing
    with pytest.raises(HttpResponseError) as e:
        lease.renew()
    assert e.value.error_code == "LeaseIsBrokenAndCannotBeRenewed"
    b.acquire_lease().release()


def test_snapshots_list_and_delete(cc):
    b = cc.get_blob_client("snaps")
    b.create_page_blob(MIB, metadata={"v": "0"})
    s1 = b.create_snapshot()["snapshot"]
    b.set_blob_metadata({"v": "1"})
    s2 = b.create_snapshot(metadata={"tag": "two"})["snapshot"]
    cc.get_blob_client("other").create_page_blob(512)
    listed = [(x.name, x.snapshot, x.metadata or {}) for x in cc.list_blobs(include=["snapshots", "metadata"])]
    assert listed == [("other", None, {}), ("snaps", s1, {"v": "0"}), ("snaps", s2, {"tag": "two"}),
                      ("snaps", None, {"v": "1"})]
    with pytest.raises(HttpResponseError) as e:
        b.delete_blob()
    assert e.value.error_code == "SnapshotsPresent"
    cc.get_blob_client("snaps", snapshot=s1).delete_blob()
    with pytest.raises(ResourceNotFoundError):
        cc.get_blob_client("snaps", snapshot=s1).get_blob_properties()
    b.delete_blob(delete_snapshots="only")
    assert b.exists()
    b.delete_blob()
    assert not b.exists()
    names = [x.name for x in cc.list_blobs()]
    assert names == ["other"]
    for i in range(5):
        cc.get_blob_client(f"dir/{i}").create_page_blob(512)
    assert [x.name for x in cc.walk_blobs()] == ["dir/", "other"]
    pages = [[x.name for x in page] for page in cc.list_blobs(name_starts_with="dir/", results_per_page=2).by_page()]
    assert pages == [["dir/0", "dir/1"], ["dir/2", "dir/3"], ["dir/4"]]


def test_copy_and_incremental_copy(server, cc):
    src = cc.get_blob_client("src")
    src.create_page_blob(MIB)
    src.upload_page(b"a" * 4096, offset=0, length=4096)
    dst = cc.get_blob_client("dst")
    dst.start_copy_from_url(src.url)
    props = dst.get_blob_properties()
    assert props.copy.status == "success" and dst.download_blob().readall() == src.download_blob().readall()
    s1 = src.create_snapshot()["snapshot"]

    def sas_url(snap: str) -> str:
        token = generate_blob_sas(DEVSTORE_ACCOUNT, cc.container_name, "src", snapshot=snap,
                                  account_key=DEVSTORE_KEY, permission=BlobSasPermissions(read=True),
                                  expiry=datetime.now(UTC) + timedelta(hours=1))
        return f"{src.url}?snapshot={snap}&{token}"

    inc = cc.get_blob_client("inc")
    with pytest.raises(HttpResponseError) as e:
        inc.start_copy_from_url(src.url, incremental_copy=True)
    assert e.value.error_code == "IncrementalCopySourceMustBeSnapshot"
    inc.start_copy_from_url(sas_url(s1), incremental_copy=True)
    first = inc.get_blob_properties()
    assert first.copy.incremental_copy and first.copy.destination_snapshot
    src.upload_page(b"b" * 512, offset=8192, length=512)
    src.clear_page(offset=0, length=512)
    s2 = src.create_snapshot()["snapshot"]
    inc.start_copy_from_url(sas_url(s2), incremental_copy=True)
    second = inc.get_blob_properties().copy.destination_snapshot
    snap = cc.get_blob_client("inc", snapshot=second)
    assert snap.download_blob().readall() == src.download_blob(snapshot=s2).readall()
    # the destination's own diff between its copies is exactly what changed at the source
    assert snap.get_page_ranges(previous_snapshot_diff=first.copy.destination_snapshot) == (
        [{"start": 8192, "end": 8703}], [{"start": 0, "end": 511}])
    with pytest.raises(HttpResponseError) as e:
        inc.upload_page(b"c" * 512, offset=0, length=512)
    assert e.value.error_code == "OperationNotAllowedOnIncrementalCopyBlob"
    with pytest.raises(HttpResponseError) as e:
        inc.start_copy_from_url(sas_url(s1), incremental_copy=True)
    assert e.value.error_code == "IncrementalCopyOfEarlierVersionSnapshotNotAllowed"


def test_other_blob_types_are_refused_with_a_clear_code(cc):
    with pytest.raises(HttpResponseError) as e:
        cc.get_blob_client("block").upload_blob(b"hello")
    assert e.value.status_code == 409 and e.value.error_code == "InvalidBlobType"
    with pytest.raises(HttpResponseError) as e:
        cc.get_blob_client("append").create_append_blob()
    assert e.value.error_code == "InvalidBlobType"
    with pytest.raises(HttpResponseError) as e:
        cc.get_blob_client("block").stage_block("YQ==", b"data")
    assert e.value.error_code == "InvalidBlobType"


def test_auth_bad_key_sas_and_public_access(server, cc):
    bad = ContainerClient(server.endpoint, cc.container_name,
                          credential={"account_name": DEVSTORE_ACCOUNT, "account_key": "a2V5" * 22})
    with pytest.raises(ClientAuthenticationError) as e:
        bad.get_container_properties()
    assert e.value.error_code == "AuthenticationFailed"
    cc.get_blob_client("pub").create_page_blob(512)
    anon = BlobClient(server.endpoint, cc.container_name, "pub")
    with pytest.raises(HttpResponseError) as e:
        anon.get_blob_properties()
    assert e.value.status_code == 404
    cc.set_container_access_policy({}, public_access=PublicAccess.Blob)
    assert anon.get_blob_properties().size == 512
    with pytest.raises(HttpResponseError):
        anon.upload_page(b"x" * 512, offset=0, length=512)
    anon_c = ContainerClient(server.endpoint, cc.container_name)
    with pytest.raises(HttpResponseError):
        list(anon_c.list_blobs())
    cc.set_container_access_policy({}, public_access=PublicAccess.Container)
    assert [b.name for b in anon_c.list_blobs()] == ["pub"]
    read_only = generate_container_sas(DEVSTORE_ACCOUNT, cc.container_name, account_key=DEVSTORE_KEY,
                                       permission="rl", expiry=datetime.now(UTC) + timedelta(hours=1))
    ro = BlobClient(server.endpoint, cc.container_name, "pub", credential=read_only)
    assert ro.download_blob().readall() == bytes(512)
    with pytest.raises(HttpResponseError) as e:
        ro.upload_page(b"x" * 512, offset=0, length=512)
    assert e.value.error_code == "AuthorizationPermissionMismatch"
    expired = generate_container_sas(DEVSTORE_ACCOUNT, cc.container_name, account_key=DEVSTORE_KEY,
                                     permission="rl", expiry=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(ClientAuthenticationError):
        BlobClient(server.endpoint, cc.container_name, "pub", credential=expired).get_blob_properties()


def test_several_servers_share_one_stamp(server, cc):
    from .conftest import start_server, stop_server

    other = start_server(server.stamp)
    try:
        b = cc.get_blob_client("shared")
        b.create_page_blob(MIB)
        b.upload_page(b"1" * 512, offset=0, length=512)
        b2 = BlobClient.from_connection_string(other.connection_string, cc.container_name, "shared")
        assert b2.download_blob(offset=0, length=512).readall() == b"1" * 512
        b2.upload_page(b"2" * 512, offset=512, length=512)
        time.sleep(0)
        assert b.download_blob(offset=512, length=512).readall() == b"2" * 512
    finally:
        assert "Traceback" not in stop_server(other)


def test_transactional_md5_both_ways(cc):
    b = cc.get_blob_client("md5")
    data = os.urandom(3 * MIB)
    b.upload_blob(data, blob_type="PageBlob", validate_content=True)  # Content-MD5 on every Put Page, echoed back
    got = b.download_blob(offset=MIB, length=MIB, validate_content=True).readall()  # x-ms-range-get-content-md5
    assert got == data[MIB:2 * MIB]


def test_a_missing_container_is_named(server):
    b = server.service().get_container_client("never-made").get_blob_client("b")
    with pytest.raises(ResourceNotFoundError) as e:
        b.get_blob_properties()
    assert e.value.error_code == "ContainerNotFound"
    assert not b.exists()


def test_if_match_races_let_one_writer_through(server, cc):
    """Two servers, two clients, one ETag: never both writes (the condition is
    checked again inside the stamp's write transaction)."""
    import threading

    from azure.core import MatchConditions

    from .conftest import start_server, stop_server

    other = start_server(server.stamp)
    try:
        b = cc.get_blob_client("race")
        b.create_page_blob(MIB)
        clients = [b, BlobClient.from_connection_string(other.connection_string, cc.container_name, "race")]
        for _ in range(25):
            etag = b.get_blob_properties().etag
            results: list[str] = []
            gate = threading.Barrier(2)

            def put(client, byte: bytes, gate=gate, etag=etag, results=results) -> None:
                gate.wait()
                try:
                    client.upload_page(byte * 512, offset=0, length=512, etag=etag,
                                       match_condition=MatchConditions.IfNotModified)
                    results.append("ok")
                except ResourceModifiedError:
                    results.append("412")

            threads = [threading.Thread(target=put, args=(c, bytes([65 + i]))) for i, c in enumerate(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(results) == ["412", "ok"], results
    finally:
        assert "Traceback" not in stop_server(other)


def test_stored_access_policy_and_its_sas(server, cc):
    from azure.storage.blob import AccessPolicy, ContainerSasPermissions

    cc.get_blob_client("p").create_page_blob(512)
    policy = AccessPolicy(permission=ContainerSasPermissions(read=True, list=True),
                          expiry=datetime.now(UTC) + timedelta(hours=1))
    cc.set_container_access_policy({"readers": policy})
    got = cc.get_container_access_policy()
    assert [s.id for s in got["signed_identifiers"]] == ["readers"]
    token = generate_container_sas(DEVSTORE_ACCOUNT, cc.container_name, account_key=DEVSTORE_KEY, policy_id="readers")
    reader = ContainerClient(server.endpoint, cc.container_name, credential=token)
    assert [b.name for b in reader.list_blobs()] == ["p"]
    with pytest.raises(HttpResponseError) as e:
        reader.get_blob_client("p").upload_page(b"x" * 512, offset=0, length=512)
    assert e.value.error_code == "AuthorizationPermissionMismatch"
    cc.set_container_access_policy({})  # the policy gone, its SAS opens nothing
    with pytest.raises(HttpResponseError):
        list(reader.list_blobs())


def test_managed_disk_blobs_in_the_system_containers(server):
    from stamp import Stamp
    from stamp.disks import Disks

    with Stamp.open(server.stamp) as st:
        disk = Disks(st).create_empty("d1", 1)
        blob = st.blobs.names()
    name = next(n for n in blob if n.startswith("disks/"))
    assert disk["name"] == "d1"
    client = server.service().get_blob_client("disks", name[len("disks/"):])
    props = client.get_blob_properties()
    assert props.size == (1 << 30) + 512
    footer = client.download_blob(offset=props.size - 512, length=512).readall()
    assert footer.startswith(b"conectix")  # the fixed VHD's footer, as the disk holds it
    for change in (lambda: client.upload_page(b"w" * 512, offset=0, length=512),  # (a footer overwritten)
                   lambda: client.clear_page(offset=0, length=512),
                   lambda: client.resize_blob(512),  # the disk's footer cut off
                   lambda: client.set_blob_metadata({"a": "b"}),
                   lambda: client.acquire_lease(),  # would lock the disk's host out
                   lambda: client.create_snapshot(),  # a snapshot the disk layer knows nothing of
                   client.delete_blob):
        with pytest.raises(HttpResponseError) as e:
            change()
        assert e.value.error_code == "AuthorizationFailure"
    assert client.download_blob(offset=0, length=512).readall() == bytes(512)
    with pytest.raises(HttpResponseError) as e:
        server.service().get_blob_client("disks", "new").create_page_blob(512)
    assert e.value.error_code == "AuthorizationFailure"
    with pytest.raises(HttpResponseError) as e:
        server.service().delete_container("disks")
    assert e.value.error_code == "AuthorizationFailure"
