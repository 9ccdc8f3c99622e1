"""The stamp-layer pieces under the Blob REST endpoint: containers, the lease
state machine (renew, change, break with a period), Put Blob over an
existing blob, copy into a blob (full and incremental), describe."""

from __future__ import annotations

import os
import random
import time

import pytest

from stamp import Stamp
from stamp.errors import (
    AuthorizationFailure,
    ContainerAlreadyExists,
    ContainerNotFound,
    InvalidContainerName,
    LeaseIdMismatchWithLeaseOperation,
    LeaseIdMissing,
    LeaseIsBreakingAndCannotBeAcquired,
    LeaseIsBrokenAndCannotBeRenewed,
    LeaseLost,
    LeaseNotPresentWithLeaseOperation,
)
from stamp.pageblob import LeaseState

MIB = 1 << 20
L1, L2 = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"


@pytest.fixture
def st(tmp_path):
    s = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    yield s
    assert s.check(deep=False).ok
    s.close()


def test_container_records_names_and_listing(st):
    for name in ("ab", "A-bc", "a--b", "-ab", "ab-", "x" * 64, "a/b"):
        with pytest.raises(InvalidContainerName):
            st.containers.create(name)
    names = [f"c{i:02d}" for i in range(7)]
    for n in names:
        st.containers.create(n, {"k": n}, "blob" if n == "c03" else None)
    with pytest.raises(ContainerAlreadyExists):
        st.containers.create("c00")
    page, marker = st.containers.names("c", "", 3)
    assert [r["name"] for r in page] == names[:3] and marker == "c03"
    page, marker = st.containers.names("c", marker, 3)
    assert [r["name"] for r in page] == names[3:6] and marker == "c06"
    page, marker = st.containers.names("c", marker, 3)
    assert [r["name"] for r in page] == ["c06"] and marker is None
    assert st.containers.get("c03")["public_access"] == "blob"
    rev = st.containers.get("c01")["rev"]
    st.containers.update("c01", {"new": "1"}, public_access="container")
    got = st.containers.get("c01")
    assert got["metadata"] == {"new": "1"} and got["public_access"] == "container" and got["rev"] == rev + 1


def test_a_container_holds_its_blobs_and_its_delete_takes_them(st):
    st.containers.create("vhds")
    st.containers.create("vhds2")
    long_name = "n" * 600  # a name too long for an LMDB key is found too
    for b in ("b", "a/x", "a/y", long_name):
        st.blobs.create(f"vhds/{b}", 4096)
    st.blobs.create("vhds2/b", 512)
    st.blobs.write("vhds/b", 0, b"x" * 512)
    st.blobs.snapshot("vhds/b")
    st.blobs.acquire_lease("vhds/a/x")
    assert st.containers.blob_names("vhds") == sorted(["a/x", "a/y", "b", long_name])
    assert st.containers.blob_names("vhds", prefix="a/") == ["a/x", "a/y"]
    assert st.containers.blob_names("vhds", marker="b") == ["b", long_name]
    # at most `limit`, the long name (kept apart from the keys) merged in order
    assert st.containers.blob_names("vhds", limit=2) == ["a/x", "a/y"]
    assert st.containers.blob_names("vhds", marker="a/y", limit=2) == ["a/y", "b"]
    assert st.containers.blob_names("vhds", marker="b\0", limit=2) == [long_name]
    assert st.containers.blob_names("vhds", marker="m", limit=1) == [long_name]
    st.containers.delete("vhds")
    with pytest.raises(ContainerNotFound):
        st.containers.get("vhds")
    assert st.blobs.names() == ["vhds2/b"]  # the other container's blob, and nothing of vhds's
    st.containers.create("vhds")
    assert st.containers.blob_names("vhds") == []


def test_system_containers_are_the_managed_disks_own(st):
    assert st.containers.get("disks")["system"]
    for call in (lambda: st.containers.create("disks"), lambda: st.containers.delete("images"),
                 lambda: st.containers.blob_names("snapshots"), lambda: st.containers.update("disks", {})):
        with pytest.raises((ContainerAlreadyExists, AuthorizationFailure)):
            call()


def test_check_finds_a_damaged_container_record(st):
    st.containers.create("good")
    with st.meta.write() as txn:
        st.meta.put_json(txn, "containers", b"good", {"name": "other", "metadata": {}, "public_access": None})
        txn.put(b"BAD", b"{", db=st.meta.db["containers"])
    problems = st.containers.check()
    assert any("names another container" in p for p in problems)
    assert any("'BAD'" in p and "not JSON" in p for p in problems)
    assert not st.check(deep=False).ok
    with st.meta.write() as txn:
        txn.delete(b"BAD", db=st.meta.db["containers"])
        st.meta.put_json(txn, "containers", b"good", {"name": "good", "metadata": {}, "public_access": None})


def test_lease_state_machine(st):
    st.blobs.create("b", 4096)
    lease = st.blobs.acquire_lease("b", 15, L1)
    assert st.blobs.describe("b").lease is LeaseState.LEASED
    st.blobs.renew_lease("b", L1)
    assert st.blobs.change_lease("b", L1, L2) == L2
    with pytest.raises(LeaseIdMismatchWithLeaseOperation):
        st.blobs.renew_lease("b", lease)
    assert st.blobs.break_lease_after("b", 30) == 15  # a fixed lease breaks at its end at the latest
    assert st.blobs.describe("b").lease is LeaseState.BREAKING
    with pytest.raises(LeaseIdMissing):  # breaking still holds: the holder may write
        st.blobs.write("b", 0, b"x" * 512)
    st.blobs.write("b", 0, b"x" * 512, lease=L2)
    with pytest.raises(LeaseIsBreakingAndCannotBeAcquired):
        st.blobs.acquire_lease("b")
    assert st.blobs.break_lease_after("b", 0) == 0
    assert st.blobs.describe("b").lease is LeaseState.BROKEN
    with pytest.raises(LeaseIsBrokenAndCannotBeRenewed):
        st.blobs.renew_lease("b", L2)
    with pytest.raises(LeaseLost):
        st.blobs.write("b", 0, b"y" * 512, lease=L2)
    st.blobs.write("b", 0, b"y" * 512)
    st.blobs.acquire_lease("b", -1, L1)
    assert st.blobs.break_lease_after("b") == 0  # an infinite lease breaks at once by default
    st.blobs.release_lease("b", L1)
    assert st.blobs.describe("b").lease is LeaseState.AVAILABLE
    with pytest.raises(LeaseNotPresentWithLeaseOperation):
        st.blobs.break_lease_after("b", 0)


def test_an_expired_lease_renews(st, monkeypatch):
    st.blobs.create("b", 4096)
    st.blobs.acquire_lease("b", 15, L1)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 20)
    assert st.blobs.describe("b").lease is LeaseState.EXPIRED
    st.blobs.renew_lease("b", L1)
    assert st.blobs.describe("b").lease is LeaseState.LEASED


def test_recreate_empties_in_place_and_keeps_snapshots(st):
    assert st.blobs.recreate("b", 8192, {"rest": {"seq": 1}})
    st.blobs.write("b", 0, b"a" * 8192)
    snap = st.blobs.snapshot("b")
    version = st.blobs.describe("b").version
    assert not st.blobs.recreate("b", 4096, {"rest": {"seq": 2}})
    info = st.blobs.describe("b")
    assert info.size == 4096 and info.properties["rest"] == {"seq": 2} and info.version != version
    assert st.blobs.read("b", 0, 4096) == bytes(4096)
    assert st.blobs.read("b", 0, 8192, snapshot=snap.id) == b"a" * 8192
    d = st.blobs.diff("b", snap.id)
    assert d.written == [] and d.cleared == [(0, 4096)]


def test_copy_into_full_and_incremental_against_a_model(st):
    rnd = random.Random(3)
    st.blobs.create("src", 256 * 1024)
    model = bytearray(256 * 1024)

    def change(n: int) -> None:
        for _ in range(n):
            off, length = rnd.randrange(0, 480) * 512, rnd.randrange(1, 32) * 512
            if rnd.random() < 0.3:
                st.blobs.clear("src", off, length)
                model[off:off + length] = bytes(length)
            else:
                data = os.urandom(length)
                st.blobs.write("src", off, data)
                model[off:off + length] = data

    change(30)
    s1 = st.blobs.snapshot("src").id
    st.blobs.create("dst", 0)
    st.blobs.copy_into("src", "dst", s1)
    assert st.blobs.read("dst", 0, len(model)) == bytes(model)
    d1 = st.blobs.snapshot("dst").id
    at_s1 = bytes(model)
    change(20)
    s2 = st.blobs.snapshot("src").id
    st.blobs.copy_into("src", "dst", s2, since=s1)
    assert st.blobs.read("dst", 0, len(model)) == bytes(model)
    assert st.blobs.read("dst", 0, len(model), snapshot=d1) == at_s1
    assert st.blobs.diff("dst", d1) == st.blobs.diff("src", s1, s2)  # only what changed was replaced
    change(5)
    st.blobs.copy_into("src", "dst")  # from the live source, full
    assert st.blobs.read("dst", 0, len(model)) == bytes(model)


def test_a_write_hook_refuses_atomically_and_its_changes_commit_with_the_write(st):
    st.blobs.create("b", 4096)
    seen = []

    def refuse(props, blob_id, size, version, touched):
        seen.append((blob_id, size, version, touched))
        raise ValueError("condition failed")

    version = st.blobs.describe("b").version
    with pytest.raises(ValueError):
        st.blobs.write("b", 0, b"x" * 512, hook=refuse)
    with pytest.raises(ValueError):
        st.blobs.clear("b", 0, 512, hook=refuse)
    assert st.blobs.read("b", 0, 512) == bytes(512) and st.blobs.describe("b").version == version
    assert seen == [(st.blobs.blob_id("b"), 4096, version, 0.0)] * 2
    assert st.blobs.describe("b").touched == 0.0

    def stamp_it(props, blob_id, size, version, touched):
        props["stamped"] = version

    before = time.time()
    st.blobs.write("b", 0, b"y" * 512, hook=stamp_it)
    info = st.blobs.describe("b")
    assert info.properties["stamped"] == version and info.version == version + 1
    assert before <= info.touched <= time.time()
