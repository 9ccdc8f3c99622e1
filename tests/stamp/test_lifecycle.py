"""Resource lifecycle: names are reusable once deleted, a deleted disk's data
never shows in a new one, and a create that fails or dies leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import vhd
from stamp import Stamp
from stamp.disks import Disks, ResourceInUse, ResourceNotFound
from stamp.meta import loads
from stamp.pageblob import PageBlobs

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def disks(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    yield Disks(st)
    st.close()


def write(disks: Disks, name: str, offset: int, data: bytes) -> None:
    with disks.open_virtual(name, writable=True) as v:
        v.write(offset, data)


def read(disks: Disks, name: str, offset: int, n: int, snapshot: str | None = None) -> bytes:
    with disks.open_virtual(name, snapshot=snapshot) as v:
        return v.read(offset, n)


def test_a_deleted_disks_name_is_reusable_and_its_data_stays_with_its_snapshots(disks):
    disks.create_empty("d1", 1)
    write(disks, "d1", 0, b"old!" * 1024)
    disks.create_snapshot("s", "d1")
    old_blob = disks.record("d1")["blob"]
    disks.delete_disk("d1")
    new = disks.create_empty("d1", 1)
    assert new["state"] == "Unattached" and new["blob"] != old_blob
    assert read(disks, "d1", 0, 4096) == bytes(4096)  # not the deleted disk's bytes
    assert read(disks, "d1", 0, 4096, snapshot="s") == b"old!" * 1024
    assert disks.blobs.properties(new["blob"])["id"] != disks.blobs.properties(old_blob)["id"]
    disks.delete_disk("d1")
    disks.create_copy("d1", source_snapshot="s")  # a copy may take the name too
    assert read(disks, "d1", 0, 4) == b"old!"
    disks.create_snapshot("s2", "d1")  # an incremental snapshot of the new d1 does not diff against s
    assert disks.snapshot("s2")["previous"] is None
    assert disks.stamp.check().ok


def test_a_full_snapshot_and_an_image_name_are_reusable(tmp_path, disks):
    disks.create_empty("d", 1)
    write(disks, "d", 0, b"one!")
    disks.create_snapshot("f", "d", incremental=False)
    disks.create_image("img", disk="d")
    disks.delete_snapshot("f")
    disks.delete_image("img")
    write(disks, "d", 0, b"two!")
    disks.create_snapshot("f", "d", incremental=False)
    disks.create_image("img", disk="d")
    assert read(disks, "d", 0, 4, snapshot="f") == b"two!"
    assert disks.blobs.read(disks.image("img")["blob"], 0, 512)[:4] == b"two!"
    assert disks.stamp.check().ok


def boom(*args: object, **kw: object) -> None:
    raise OSError("injected failure")


CREATES = {  # how to create it, and a function its create calls after the first step
    "empty": (lambda d: d.create_empty("x", 1), "stamp.disks.create_fixed"),
    "copy": (lambda d: d.create_copy("x", source_disk="src"), "stamp.pageblob.PageBlobs.copy"),
    "full snapshot": (lambda d: d.create_snapshot("x", "src", incremental=False), "stamp.pageblob.PageBlobs.copy"),
    "incremental snapshot": (lambda d: d.create_snapshot("x", "src"), "stamp.pageblob.PageBlobs.used_bytes"),
    "image": (lambda d: d.create_image("x", disk="src"), "vhd.copy_data"),
}


def state_of(disks: Disks) -> tuple:
    """Everything a create could leave behind: records, blobs, blob snapshots."""
    names = sorted(disks.blobs.names())
    return ([r["name"] for r in disks.disks() + disks.images() + disks.snapshots()], names,
            {b: [s.id for s in disks.blobs.snapshots(b)] for b in names})


@pytest.mark.parametrize("kind", sorted(CREATES))
def test_a_create_that_fails_leaves_nothing_and_the_name_stays_free(disks, monkeypatch, kind):
    make, target = CREATES[kind]
    disks.create_empty("src", 1)
    write(disks, "src", 0, b"data" * 128)
    before = state_of(disks)
    with monkeypatch.context() as m:
        m.setattr(target, boom)
        with pytest.raises(OSError, match="injected"):
            make(disks)
    assert state_of(disks) == before
    make(disks)  # the name is free
    assert disks.stamp.check().ok


CHILD = """
import os, sys
sys.path.insert(0, sys.argv[3])
import vhd, stamp.disks, stamp.pageblob
from stamp import Stamp
from stamp.disks import Disks
from tests.stamp.test_lifecycle import CREATES
make, target = CREATES[sys.argv[2]]
module, _, attr = target.rpartition(".")
owner = stamp.pageblob.PageBlobs if module == "stamp.pageblob.PageBlobs" else sys.modules[module]
setattr(owner, attr, lambda *a, **k: os._exit(9))  # killed mid-create
make(Disks(Stamp.open(sys.argv[1])))
"""


@pytest.mark.parametrize("kind", sorted(CREATES))
def test_a_create_killed_midway_is_rolled_back_on_the_next_open(tmp_path, kind):
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        d = Disks(st)
        d.create_empty("src", 1)
        write(d, "src", 0, b"data" * 128)
        before = state_of(d)
    proc = subprocess.run([sys.executable, "-c", CHILD, path, kind, ROOT], timeout=120)
    assert proc.returncode == 9
    with Stamp.open(path) as st:
        d = Disks(st)  # rolls back the dead process's create
        assert state_of(d) == before
        CREATES[kind][0](d)
        assert st.check().ok


def test_a_create_in_progress_is_named_and_not_usable(disks, monkeypatch):
    seen = []

    def peek(*args: object, **kw: object) -> None:
        with pytest.raises(ResourceInUse, match="being created"):
            disks.open_virtual("x")
        with pytest.raises(ResourceInUse, match="being created"):
            disks.delete_disk("x")
        seen.append(True)
        raise OSError("injected failure")
    monkeypatch.setattr("stamp.disks.create_fixed", peek)
    with pytest.raises(OSError):
        disks.create_empty("x", 1)
    assert seen


def test_blob_ids_are_never_reused(tmp_path):
    with Stamp.create(str(tmp_path / "st")) as st:
        blobs: PageBlobs = st.blobs
        ids = []
        for _ in range(3):
            blobs.create("b", 4096)
            ids.append(blobs.properties("b")["id"])
            blobs.delete("b")
    with Stamp.open(str(tmp_path / "st")) as st:
        st.blobs.create("b", 4096)
        ids.append(st.blobs.properties("b")["id"])
    assert len(set(ids)) == len(ids)


def test_a_vault_backup_of_a_recreated_disk_starts_over(tmp_path, disks):
    from stamp.vault import Vault
    disks.create_empty("d", 1)
    write(disks, "d", 0, b"old!" * 1024)
    with Vault.create(str(tmp_path / "v"), None) as v:
        v.backup(disks, "d")
        keep = disks.create_snapshot("keep", "d")  # keeps the old blob alive after the delete
        disks.delete_disk("d")
        disks.create_empty("d", 1)
        write(disks, "d", MIB, b"new!")
        report = v.backup(disks, "d")
        assert not report.incremental
        out = tmp_path / "r.vhd"
        v.restore_to_file(report.point, str(out), "fixed")
    with vhd.open(out) as img:
        assert img.read(0, 4) == bytes(4) and img.read(MIB, 4) == b"new!"
    assert keep["blob"] != disks.record("d")["blob"]


@pytest.mark.parametrize("name", ["a/b", "x" * 81, "-lead", "trail.", ""])
def test_a_resource_name_follows_the_platforms_rule(disks, name):
    from stamp.errors import StampError
    with pytest.raises(StampError, match="1 to 80 letters"):
        disks.create_empty(name, 1)
    assert disks.disks() == [] and disks.blobs.names() == []


def test_a_rolled_back_snapshot_of_a_since_deleted_disk_leaves_no_blob(disks, monkeypatch):
    """The disk is deleted while its incremental snapshot is being made (its
    blob kept alive by the snapshot's reservation); the snapshot then fails:
    nothing may keep the blob, so the roll back deletes it too."""
    disks.create_empty("d", 1)
    write(disks, "d", 0, b"data" * 128)

    def delete_then_fail(*args: object, **kw: object) -> None:
        disks.delete_disk("d")
        raise OSError("injected failure")
    monkeypatch.setattr("stamp.pageblob.PageBlobs.used_bytes", delete_then_fail)
    with pytest.raises(OSError, match="injected"):
        disks.create_snapshot("s", "d")
    assert state_of(disks) == ([], [], {})
    assert disks.stamp.check().ok


def test_a_disk_from_an_image_deleted_meanwhile_is_refused(disks, monkeypatch):
    """The image is deleted between the create reading it and reserving the
    disk's name: the create must fail, not make a disk whose parent is gone."""
    disks.create_empty("src", 1)
    disks.create_image("img", disk="src")
    check_sku = Disks._check_sku

    def delete_image_first(sku: str, size_gib: float) -> None:
        disks.delete_image("img")
        check_sku(sku, size_gib)
    monkeypatch.setattr(Disks, "_check_sku", staticmethod(delete_image_first))
    with pytest.raises(ResourceNotFound, match="image 'img'"):
        disks.create_from_image("os1", "img")
    assert [d["name"] for d in disks.disks()] == ["src"]


KILLED_CREATE = """
import os, sys
sys.path.insert(0, sys.argv[2])
import stamp.disks
from stamp import Stamp
stamp.disks.create_fixed = lambda *a, **k: os._exit(9)
stamp.disks.Disks(Stamp.open(sys.argv[1])).create_empty("x", 1)
"""


def test_a_process_already_open_rolls_back_a_create_whose_process_died(tmp_path):
    """A long-lived process (a host) opened the stamp before another process
    died mid-create: the name is free to it, not 'being created' forever."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        d = Disks(st)
        proc = subprocess.run([sys.executable, "-c", KILLED_CREATE, path, ROOT], timeout=120)
        assert proc.returncode == 9
        with pytest.raises(ResourceNotFound):
            d.record("x")
        d.create_empty("x", 1)
        assert d.disks()[0]["name"] == "x" and len(d.blobs.names()) == 1
        assert st.check().ok


def test_a_copy_keeps_the_sku_rules(disks):
    from stamp.errors import StampError
    disks.create_empty("src", 1)
    with pytest.raises(StampError, match="unknown SKU"):
        disks.create_copy("c", source_disk="src", sku="Bogus_LRS")
    assert [d["name"] for d in disks.disks()] == ["src"]


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_a_disk_open_for_writing_is_not_deleted(disks, with_snapshot):
    """With or without snapshots keeping its blob, a delete while a process
    writes the disk is refused with the holder's name (not the blob's raw
    lease code, nor a success that leaves the writer writing a deleted disk)."""
    disks.create_empty("d", 1)
    if with_snapshot:
        disks.create_snapshot("s", "d")
    with disks.open_virtual("d", writable=True) as v:
        with pytest.raises(ResourceInUse, match=f"open for writing by pid {os.getpid()}"):
            disks.delete_disk("d")
        v.write(0, b"kept" * 128)
    assert read(disks, "d", 0, 4) == b"kept"
    disks.delete_disk("d")  # closed: the delete goes through
    assert disks.disks() == []


DIES_WRITING = """
import os, sys
sys.path.insert(0, sys.argv[2])
from stamp import Stamp
from stamp.disks import Disks
Disks(Stamp.open(sys.argv[1])).open_virtual("d", writable=True)
os._exit(9)  # killed holding the disk open for writing
"""


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_a_disk_whose_writer_died_is_deleted(tmp_path, with_snapshot):
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        d = Disks(st)
        d.create_empty("d", 1)
        if with_snapshot:
            d.create_snapshot("s", "d")
        assert subprocess.run([sys.executable, "-c", DIES_WRITING, path, ROOT], timeout=120).returncode == 9
        d.delete_disk("d")
        assert d.disks() == [] and st.check().ok
        if with_snapshot:
            assert d.blobs.lease_of(d.snapshot("s")["blob"]) is None


def test_an_incremental_snapshot_survives_its_predecessor_being_deleted_meanwhile(disks, monkeypatch):
    """A retention job deletes the disk's latest snapshot while a new one is
    being made: the new one diffs against the one before (or none), it does
    not fail with PreviousSnapshotNotFound."""
    disks.create_empty("d", 1)
    write(disks, "d", 0, b"one!" * 128)
    disks.create_snapshot("s1", "d")
    write(disks, "d", MIB, b"two!" * 128)
    disks.create_snapshot("s2", "d")
    write(disks, "d", 2 * MIB, b"3rd!" * 128)
    diff = PageBlobs.diff
    deleted = []

    def delete_s2_first(self: PageBlobs, *args: object, **kw: object) -> object:
        if not deleted:
            deleted.append(True)
            disks.delete_snapshot("s2")
        return diff(self, *args, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(PageBlobs, "diff", delete_s2_first)
    snap = disks.create_snapshot("s3", "d")
    assert deleted and snap["previous"] == "s1" and snap["changed_bytes"] == 2 * 512
    assert read(disks, "d", MIB, 4, snapshot="s3") == b"two!"


def test_a_dead_writer_whose_pid_a_live_process_took_is_still_dead(tmp_path):
    """A writer lease was judged by its pid alone: once the dead writer's pid
    belonged to a live process (pids are reused), the disk stayed 'open for
    writing' for good. The lease now records the holder's start time too."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        d = Disks(st)
        d.create_empty("d", 1)
        assert subprocess.run([sys.executable, "-c", DIES_WRITING, path, ROOT], timeout=120).returncode == 9
        blob = d.disk("d")["blob"]
        props = d.blobs.properties(blob)
        assert int(props["lease_started"])  # the dead writer's start time
        d.blobs.set_properties(blob, lease_pid=os.getpid())  # its pid, now a live process's
        d.delete_disk("d")
        assert d.disks() == [] and st.check().ok


def test_a_dead_create_whose_pid_a_live_process_took_is_rolled_back(tmp_path):
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        before = state_of(Disks(st))
    proc = subprocess.run([sys.executable, "-c", CHILD, path, "empty", ROOT], timeout=120)
    assert proc.returncode == 9
    with Stamp.open(path) as st:
        meta = st.meta
        with meta.write() as txn:
            for key, value in list(meta.items(txn, "resources", b"pending/")):
                intent = loads(value)
                assert int(intent["started"])  # the dead creator's start time
                meta.put_json(txn, "resources", key, {**intent, "pid": os.getpid()})  # its pid, now live
    with Stamp.open(path) as st:
        assert state_of(Disks(st)) == before


def test_a_roll_back_of_a_dead_create_leaves_a_live_create_of_the_name_alone(tmp_path, monkeypatch):
    # _settle judged the intent it read dead, then _roll_back read the intent again in its own transaction and
    # undid whatever it found: if another process had rolled the dead create back and a live create had
    # reserved the name meanwhile, the live one lost its reservation and blob, then wrote its finished record
    # anyway: a disk naming a deleted blob (found by four processes creating, granting and deleting two names).
    st = Stamp.create(str(tmp_path / "st"))
    d = Disks(st)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    d._reserve("disk", {"name": "d0"}, None)
    key = b"pending/disk/d0"
    with d.meta.write() as txn:  # the intent of a create whose process died
        intent = d.meta.get_json(txn, "resources", key)
        d.meta.put_json(txn, "resources", key, {**intent, "pid": int(dead.stdout), "started": 0})
    roll_back = Disks._roll_back
    live: list[str] = []

    def meanwhile(self, *a, **kw):
        monkeypatch.setattr(Disks, "_roll_back", roll_back)
        Disks(st)  # another process rolls the dead create back, and a live create reserves the name
        live.append(d._reserve("disk", {"name": "d0"}, None))
        return roll_back(self, *a, **kw)

    monkeypatch.setattr(Disks, "_roll_back", meanwhile)
    with pytest.raises(ResourceInUse, match="being created"):
        d.record("d0")
    with d.meta.read() as txn:
        assert d.meta.get_json(txn, "resources", key)["blob"] == live[0]  # the live create's reservation stays
    st.close()
