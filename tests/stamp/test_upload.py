"""Direct upload and download of managed disks: grant-access, the grant's
blob and SAS, revoke-access and its checks, snapshot grants and their diffs
in guest offsets. Pages are written straight into the granted blob, as the
REST endpoint does for a client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import pytest

import vhd
from stamp import Stamp, access, sas
from stamp.disks import Disks, DiskState
from stamp.errors import ComputeError, InvalidVhd, OperationNotAllowed, PreviousSnapshotNotFound
from stamp.sas import SasError

from ..conftest import run

MIB = 1 << 20
KEY = base64.b64decode(access.DEVSTORE_KEY)
NOW = datetime(2026, 12, 1, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def disks(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    d = Disks(st)
    d.clock = NOW.timestamp  # grants made at NOW are not over by the clock that ends them (Disks._end_expired)
    yield d
    st.close()


def fixed_vhd(path, size=20 * MIB, writes=((5 * MIB, b"up" * 2048),)) -> bytes:
    with vhd.create(path, size, type="fixed") as img:
        for off, data in writes:
            img.write(off, data)
    return open(path, "rb").read()


def upload(disks: Disks, grant: access.Grant, raw: bytes, chunk: int = 4 * MIB) -> None:
    """What a Blob client does with a Write SAS: Put Page for every non-zero 4 MiB chunk."""
    assert grant.writable and grant.size == len(raw)
    for off in range(0, len(raw), chunk):
        piece = raw[off:off + chunk]
        if piece.strip(b"\0"):
            disks.blobs.write(grant.stamp_blob, off, piece)


def container_of(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    _, account, container, blob = parts.path.split("/")
    assert account == "devstoreaccount1" and blob == "abcd" and container.startswith("md-")
    return container, dict(parse_qsl(parts.query))


def verify(grant: access.Grant, query: dict[str, str], permission: str, now: datetime = NOW) -> None:
    sas.verify(query, account="devstoreaccount1", key=KEY, permission=permission, container=grant.container,
               blob="abcd", snapshot=None, client_ip="127.0.0.1", https=False, now=now, policies=grant.policies)


def grant(disks: Disks, kind: str, name: str, access_: str, duration: int = 3600) -> tuple[access.Grant, dict]:
    got = disks.grant_access(kind, name, access_, duration)  # at the Disks' clock: NOW, but for a real-time one
    container, query = container_of(got["accessSAS"])
    g = disks.grant_for(container)
    assert g is not None and g.access == access_ and g.name == name
    return g, query


def test_upload_size_rules_and_the_platform_s_message(disks):
    with pytest.raises(ComputeError, match=r"^BadRequest: The upload size in bytes 3158310912 - 512 bytes for the "
                       r"VHD footer \(3158310400 in this case\) must be a multiple of MiB\.$"):
        disks.create_for_upload("u", 3158310912)
    for n in (20 * MIB - MIB + 512, 32767 * 1024 * MIB + MIB + 512):
        with pytest.raises(ComputeError, match="must be between 20972032 .* and 35183298347520"):
            disks.create_for_upload("u", n)
    assert disks.create_for_upload("u", 20 * MIB + 512)["state"] == "ReadyToUpload"
    with pytest.raises(Exception, match="unknown SKU"):
        disks.create_for_upload("x", 20 * MIB + 512, "Fast_LRS")


def test_write_grant_upload_revoke(tmp_path, disks):
    raw = fixed_vhd(tmp_path / "u.vhd")
    rec = disks.create_for_upload("u", len(raw))
    got = disks.grant_access("disk", "u", "Write", 3600, now=NOW)
    assert set(got["grant"]) == {"access", "account", "container", "start", "expiry"}
    assert got["grant"]["account"] == "devstoreaccount1"
    assert disks.record("u")["state"] == "ActiveUpload"
    container, query = container_of(got["accessSAS"])
    assert set(query) == {"si", "sr", "sv", "sig"} and query["sr"] == "b"  # the platform's layout: a policy
    g = disks.grant_for(container)
    assert g is not None and g.stamp_blob == rec["blob"] and g.snapshot is None and g.writable
    verify(g, query, "w")
    verify(g, query, "r")  # an upload client reads the page list too
    with pytest.raises(SasError) as e:
        verify(g, query, "w", now=NOW + timedelta(seconds=3601))
    assert e.value.code == "AuthenticationFailed"
    upload(disks, g, raw)
    done = disks.revoke_access("disk", "u")
    assert done["state"] == "Unattached" and "access" not in done
    assert disks.grant_for(container) is None  # the SAS names a policy that is gone
    with disks.open_virtual("u") as v:
        assert v.read(5 * MIB, 4096) == b"up" * 2048
    assert disks.stamp.check().ok


def test_a_second_grant_gives_a_new_sas_for_the_same_blob(tmp_path, disks):
    disks.create_for_upload("u", 20 * MIB + 512)
    first, _ = grant(disks, "disk", "u", "Write", 60)
    second, query = grant(disks, "disk", "u", "Write", 7200)
    assert second.container == first.container and second.policy.expiry > first.policy.expiry
    verify(second, query, "w", now=NOW + timedelta(seconds=3600))


@pytest.mark.parametrize("damage", ["nothing", "cookie", "checksum", "dynamic", "size"])
def test_a_bad_upload_is_refused_and_can_be_fixed(tmp_path, disks, damage):
    raw = bytearray(fixed_vhd(tmp_path / "u.vhd"))
    disks.create_for_upload("u", len(raw))
    g, query = grant(disks, "disk", "u", "Write")
    good = bytes(raw)
    if damage == "nothing":
        raw[:] = bytes(len(raw))
    elif damage == "cookie":
        raw[-512:-504] = b"notavhd!"
    elif damage == "checksum":
        raw[-512 + 20] ^= 0xFF
    elif damage == "dynamic":
        dyn = tmp_path / "d.vhd"
        with vhd.create(dyn, 20 * MIB):
            pass
        raw[-512:] = open(dyn, "rb").read()[-512:]
    elif damage == "size":
        small = tmp_path / "s.vhd"
        raw[-512:] = fixed_vhd(small, 21 * MIB)[-512:]
    upload(disks, g, bytes(raw))
    messages = {"nothing": "The specified cookie value in VHD footer indicates that disk 'u' with blob "
                           f"{g.container}/abcd is not a supported VHD. Disk is expected to have cookie value "
                           "'conectix'.",
                "cookie": "is expected to have cookie value 'conectix'", "checksum": "wrong checksum",
                "dynamic": "is a dynamic VHD: only fixed", "size": f"virtual size of {21 * MIB} bytes"}
    with pytest.raises(InvalidVhd) as e:
        disks.revoke_access("disk", "u")
    assert messages[damage] in e.value.message and e.value.status == 400
    assert disks.record("u")["state"] == "ActiveUpload"  # as the platform leaves it
    again = disks.grant_for(g.container)
    assert again == g  # the SAS still works: fix the upload
    verify(again, query, "w")
    upload(disks, g, good)
    assert disks.revoke_access("disk", "u")["state"] == "Unattached"


def test_finish_upload_without_a_grant_checks_the_same(tmp_path, disks):
    raw = fixed_vhd(tmp_path / "u.vhd")
    blob = disks.create_for_upload("u", len(raw))["blob"]
    with pytest.raises(InvalidVhd, match="cookie"):
        disks.finish_upload("u")
    disks.blobs.write(blob, len(raw) - 512, raw[-512:])
    assert disks.finish_upload("u")["state"] == "Unattached"


def test_state_rules(tmp_path, disks):
    disks.create_for_upload("u", 20 * MIB + 512)
    disks.create_empty("d", 1)
    with pytest.raises(ComputeError, match="ReadyToUpload"):
        disks.grant_access("disk", "d", "Write", 60)
    with pytest.raises(ComputeError, match="Unattached"):
        disks.grant_access("disk", "u", "Read", 60)
    for op in (lambda: disks.create_snapshot("s", "u"), lambda: disks.create_copy("c", source_disk="u")):
        with pytest.raises(OperationNotAllowed, match="since the disk is in 'ReadyToUpload' state"):
            op()
    disks.grant_access("disk", "u", "Write", 60)
    with pytest.raises(OperationNotAllowed, match="'ActiveUpload' state"):
        disks.grant_access("disk", "u", "Read", 60)
    disks.set_state("d", disks_state("ATTACHED"), attached_to="vm1", lun=0)
    with pytest.raises(OperationNotAllowed, match="^OperationNotAllowed: Access not permitted because disk d is "
                       "currently attached to running VM vm1.$"):
        disks.grant_access("disk", "d", "Read", 60)
    disks.set_state("d", disks_state("UNATTACHED"), attached_to=None, lun=None)
    disks.grant_access("disk", "d", "Read", 60)
    assert disks.record("d")["state"] == "ActiveSAS"
    with pytest.raises(OperationNotAllowed, match="'delete' is not allowed on disk 'd' since the disk is in "
                       "'ActiveSAS'"):
        disks.delete_disk("d")
    with pytest.raises(OperationNotAllowed, match="'ActiveSAS' state"):
        disks.grant_access("disk", "d", "Write", 60)
    assert disks.revoke_access("disk", "d")["state"] == "Unattached"
    disks.delete_disk("d")
    disks.delete_disk("u")  # an upload under way may be dropped: its grant goes with it
    with disks.meta.read() as txn:
        assert list(disks.meta.items(txn, "resources", b"grant/")) == []
    with pytest.raises(ComputeError, match="Read or Write"):
        disks.grant_access("disk", "x", "Delete", 60)
    with pytest.raises(ComputeError, match="durationInSeconds"):
        disks.grant_access("disk", "x", "Read", 0)


def disks_state(name: str):
    from stamp.disks import DiskState

    return DiskState[name]


def test_read_grant_of_a_fixed_disk_serves_its_blob(tmp_path, disks):
    raw = fixed_vhd(tmp_path / "u.vhd")
    rec = disks.import_vhd("d", str(tmp_path / "u.vhd"))
    g, query = grant(disks, "disk", "d", "Read")
    assert not g.writable and g.stamp_blob == rec["blob"] and g.size == len(raw)
    verify(g, query, "r")
    with pytest.raises(SasError) as e:
        verify(g, query, "w")
    assert e.value.code == "AuthorizationPermissionMismatch"
    served = disks.blobs.read(g.stamp_blob, 0, g.size)
    assert served[:-512] == raw[:-512] and served[-512:-504] == b"conectix"  # the import wrote its own footer


def test_snapshot_grants_and_their_diff_in_guest_offsets(tmp_path, disks):
    disks.create_empty("d", 1)
    with disks.open_virtual("d", writable=True) as v:
        v.write(0, b"a" * 4096)
        v.write(300 * MIB, b"b" * 8192)
    disks.create_snapshot("s1", "d")
    with disks.open_virtual("d", writable=True) as v:
        v.write(300 * MIB + 4096, b"c" * 512)
        v.write(700 * MIB, b"d" * 65536)
    disks.blobs.clear(disks.record("d")["blob"], 0, 4096)  # a Clear Pages (a discard writes zeros in a fixed VHD)
    disks.create_snapshot("s2", "d")
    g1, q1 = grant(disks, "snapshot", "s1", "Read")
    g2, _ = grant(disks, "snapshot", "s2", "Read")
    assert disks.snapshot("s1")["state"] == "ActiveSAS"
    assert g1.stamp_blob == g2.stamp_blob == disks.record("d")["blob"]
    assert g1.snapshot == disks.snapshot("s1")["blob_snapshot"]
    verify(g1, q1, "r")
    assert disks.blobs.read(g1.stamp_blob, 0, 4096, snapshot=g1.snapshot) == b"a" * 4096
    diff = disks.grant_diff(g2, g1)
    assert diff["written"] == [{"offset": 300 * MIB + 4096, "length": 512}, {"offset": 700 * MIB, "length": 65536}]
    assert diff["cleared"] == [{"offset": 0, "length": 4096}]
    assert disks.grant_diff(g2, g1) == disks.diff("s1", "s2")
    with pytest.raises(PreviousSnapshotNotFound):
        disks.grant_diff(g1, disks.grant_for(grant(disks, "disk", "d", "Read")[0].container))
    with pytest.raises(OperationNotAllowed):
        disks.delete_snapshot("s1")
    for s in ("s1", "s2"):
        assert "state" not in disks.revoke_access("snapshot", s)
    assert disks.grant_for(g1.container) is None
    disks.delete_snapshot("s1")


def test_a_disk_from_an_image_is_served_as_a_fixed_vhd(tmp_path, disks):
    base = tmp_path / "base.vhd"
    fixed_vhd(base, 32 * MIB, ((0, b"BOOT" * 128), (10 * MIB, b"base" * 1024)))
    disks.create_image("img", path=str(base))
    disks.create_from_image("os", "img", size_gib=1)
    with disks.open_virtual("os", writable=True) as v:
        v.write(20 * MIB, b"child" * 100 + bytes(12))
    g, _ = grant(disks, "disk", "os", "Read")
    assert g.stamp_blob != disks.record("os")["blob"] and g.size == (1 << 30) + 512
    served = tmp_path / "served.vhd"
    with open(served, "wb") as f:
        for off in range(0, g.size, 64 * MIB):
            f.write(disks.blobs.read(g.stamp_blob, off, min(64 * MIB, g.size - off)))
    disks.export("os", str(tmp_path / "os.raw.vhd"))
    run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "vpc", str(served), str(tmp_path / "os.raw.vhd"))
    assert vhd.check(str(served), azure=True).ok
    disks.revoke_access("disk", "os")
    assert not disks.blobs.exists(g.stamp_blob)
    assert disks.stamp.check().ok


def test_a_grant_whose_view_fails_to_build_is_undone(tmp_path, disks, monkeypatch):
    base = tmp_path / "base.vhd"
    fixed_vhd(base, 32 * MIB)
    disks.create_image("img", path=str(base))
    disks.create_from_image("os", "img")

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(Disks, "_build_view", boom)
    with pytest.raises(OSError):
        disks.grant_access("disk", "os", "Read", 60)
    rec = disks.record("os")
    assert rec["state"] == "Unattached" and "access" not in rec
    with disks.meta.read() as txn:
        assert list(disks.meta.items(txn, "resources", b"grant/")) == []
    assert disks.blobs.names() == sorted({disks.record("os")["blob"], disks.image("img")["blob"]})


def cli(*args: str, stamp_dir: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stamp", "--stamp", stamp_dir, *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def test_cli_upload_flow(tmp_path):
    st = str(tmp_path / "st")
    assert cli("init", stamp_dir=st).returncode == 0
    raw = fixed_vhd(tmp_path / "u.vhd")
    bad = cli("disk", "create", "u", "--upload-size-bytes", str(len(raw) - 512), stamp_dir=st)
    assert bad.returncode == 1 and "must be a multiple of MiB" in bad.stderr and "Traceback" not in bad.stderr
    made = json.loads(cli("disk", "create", "u", "--upload-size-bytes", str(len(raw)), stamp_dir=st).stdout)
    assert made["state"] == "ReadyToUpload" and made["size_bytes"] == 20 * MIB
    url = cli("disk", "grant-access", "u", "--access", "Write", "--duration", "600", stamp_dir=st)
    assert url.returncode == 0 and url.stdout.startswith("http://127.0.0.1:10000/devstoreaccount1/md-")
    key = base64.b64encode(b"k" * 64).decode()
    other = cli("disk", "grant-access", "u", "--access", "Write", "--duration", "600", "--json",
                "--endpoint", "http://localhost:10001/acct2", stamp_dir=st, env={"DISKSTAMP_ACCOUNT_KEY": key})
    doc = json.loads(other.stdout)
    assert doc["accessSAS"].startswith("http://localhost:10001/acct2/md-") and doc["grant"]["access"] == "Write"
    container, query = container_of(url.stdout.strip())
    with Stamp.open(st) as s:  # the second grant's SAS is signed with the other key, for the same blob
        g = Disks(s).grant_for(container)
        assert g is not None
        sas.verify(dict(parse_qsl(urlsplit(doc["accessSAS"]).query)), account="acct2", key=b"k" * 64,
                   permission="w", container=container, blob="abcd", snapshot=None, client_ip="127.0.0.1",
                   https=False, now=datetime.now(UTC), policies=g.policies)
        upload(Disks(s), g, raw)
    done = cli("disk", "revoke-access", "u", stamp_dir=st)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "Unattached"
    usage = cli("disk", "grant-access", "u", "--access", "Write", "--duration", "0", stamp_dir=st)
    assert usage.returncode == 2 and "duration" in usage.stderr
    refused = cli("disk", "grant-access", "u", "--access", "Write", "--duration", "60", stamp_dir=st)
    assert refused.returncode == 1 and "ReadyToUpload" in refused.stderr
    assert cli("snapshot", "create", "s", "--disk", "u", stamp_dir=st).returncode == 0
    snap_url = cli("snapshot", "grant-access", "s", "--duration", "60", stamp_dir=st)
    assert snap_url.returncode == 0 and "/md-" in snap_url.stdout
    assert cli("snapshot", "revoke-access", "s", stamp_dir=st).returncode == 0
    helped = cli("disk", "grant-access", "--help", stamp_dir=st)
    assert "stored access policy" in helped.stdout and "--upload-size-bytes" in helped.stdout


KILLED_MID_REVOKE = """
import os, signal, sys
from stamp import Stamp
from stamp.disks import Disks, DiskState
Disks._check_upload = lambda self, obj: os.kill(os.getpid(), signal.SIGKILL)  # killed while it checks
Disks(Stamp.open(sys.argv[1])).revoke_access("disk", "u")
"""


def test_a_revoke_killed_midway_leaves_a_grant_that_works_again(tmp_path):
    # A revoke marks the grant (its SAS refused) while it checks: a kill -9 there left the mark for good, and
    # the failed revoke after it put the marked grant back: the SAS never worked again, nor a new grant's.
    raw = bytearray(fixed_vhd(tmp_path / "u.vhd"))
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        d = Disks(st)
        d.create_for_upload("u", len(raw))
        g, _ = grant(d, "disk", "u", "Write")
    got = subprocess.run([sys.executable, "-c", KILLED_MID_REVOKE, path], capture_output=True, text=True)
    assert got.returncode == -9, got.stderr
    with Stamp.open(path) as st:
        d = Disks(st)
        assert d.record("u")["state"] == "ActiveUpload" and d.grant_for(g.container) is None
        with pytest.raises(InvalidVhd):  # nothing uploaded yet: refused, and the SAS works again
            d.revoke_access("disk", "u")
        assert d.grant_for(g.container) == g
        subprocess.run([sys.executable, "-c", KILLED_MID_REVOKE, path], capture_output=True, text=True)
        again, _ = grant(d, "disk", "u", "Write")  # a new SAS after a killed revoke works too
        assert again.container == g.container
        upload(d, again, bytes(raw))
        assert d.revoke_access("disk", "u")["state"] == "Unattached"
        assert st.check(deep=False).ok


def test_a_disk_deleted_and_made_again_while_its_upload_is_checked_never_gets_the_old_grant(tmp_path, disks,
                                                                                         monkeypatch):
    # The revoke put its grant back (check failed) or wrote Unattached (check passed) over whatever record had
    # the name by then: a new disk of the name got the old grant, and the old SAS URL wrote into it.
    raw = fixed_vhd(tmp_path / "u.vhd")
    for uploaded in (False, True):
        disks.create_for_upload("u", len(raw))
        g, _ = grant(disks, "disk", "u", "Write")
        if uploaded:
            upload(disks, g, raw)
        check = Disks._check_upload

        def meanwhile(self, obj, check=check):
            try:
                return check(self, obj)
            finally:  # another process, as the check ends: delete, and a new disk of the name
                other = Disks(self.stamp)
                other.delete_disk("u")
                other.create_for_upload("u", len(raw))

        monkeypatch.setattr(Disks, "_check_upload", meanwhile)
        with pytest.raises(OperationNotAllowed if uploaded else InvalidVhd):
            disks.revoke_access("disk", "u")
        new = disks.record("u")
        assert new["state"] == "ReadyToUpload" and "access" not in new and disks.grant_for(g.container) is None
        disks.delete_disk("u")


def test_a_revoke_that_lost_a_race_does_not_unattach_a_disk_attached_since(tmp_path, disks, monkeypatch):
    # Two revokes of one Read grant at once: the later one wrote the state it read before (Unattached) over an
    # attach made in between, so a disk attached to a VM read as Unattached, free to attach elsewhere.
    disks.create_empty("d", 1)
    g, _ = grant(disks, "disk", "d", "Read")
    drop = Disks._drop_read

    def meanwhile(self, *a, **kw):
        monkeypatch.setattr(Disks, "_drop_read", drop)
        other = Disks(self.stamp)
        other.revoke_access("disk", "d")
        other.set_state("d", DiskState.ATTACHED, expect=DiskState.UNATTACHED, attached_to="vm1")
        return drop(self, *a, **kw)

    monkeypatch.setattr(Disks, "_drop_read", meanwhile)
    assert disks.revoke_access("disk", "d")["state"] == "Attached"
    assert disks.record("d")["attached_to"] == "vm1" and disks.grant_for(g.container) is None


def test_a_disk_being_uploaded_or_downloaded_does_not_grow(tmp_path, disks):
    # Growing was refused only for ReadyToUpload: during a download (ActiveSAS) the served blob changed size
    # under the client; during an upload it failed with a FormatError from the half-uploaded VHD, or, with the
    # footer already up, grew it past the declared size, so every revoke after refused the upload.
    raw = fixed_vhd(tmp_path / "u.vhd")
    disks.create_for_upload("u", len(raw))
    g, _ = grant(disks, "disk", "u", "Write")
    upload(disks, g, raw)
    disks.create_empty("d", 1)
    grant(disks, "disk", "d", "Read")
    for name, state in (("u", "ActiveUpload"), ("d", "ActiveSAS")):
        with pytest.raises(OperationNotAllowed, match=f"since the disk is in '{state}' state"):
            disks.update_disk(name, size_gib=2)
    assert disks.revoke_access("disk", "u")["size_bytes"] == 20 * MIB
    assert disks.revoke_access("disk", "d")["size_bytes"] == 1 << 30
    assert disks.update_disk("d", size_gib=2)["size_bytes"] == 2 << 30


def _raw_record(disks: Disks, name: str) -> dict:
    """The disk's record as stored, read without settling anything."""
    with disks.meta.read() as txn:
        return disks.meta.get_json(txn, "resources", f"disk/{name}".encode())


def test_an_expired_read_grant_ends_when_next_used_and_the_disk_attaches_again(tmp_path, disks):
    disks.create_empty("d", 1)
    g, _ = grant(disks, "disk", "d", "Read", duration=60)
    assert disks.record("d")["state"] == "ActiveSAS"
    disks.clock = lambda: NOW.timestamp() + 61  # the grant's duration is over
    assert _raw_record(disks, "d")["state"] == "ActiveSAS"  # nothing ends it until the disk is next used
    disks.set_state("d", DiskState.ATTACHED, expect=DiskState.UNATTACHED, attached_to="vm1", lun=0)  # an attach
    rec = disks.record("d")
    assert rec["state"] == "Attached" and "access" not in rec and disks.grant_for(g.container) is None
    with disks.meta.read() as txn:
        assert list(disks.meta.items(txn, "resources", b"grant/")) == []


def test_an_expired_grant_ends_on_a_read_of_the_disk_the_view_deleted(tmp_path, disks):
    base = tmp_path / "base.vhd"
    fixed_vhd(base, 32 * MIB)
    disks.create_image("img", path=str(base))
    disks.create_from_image("os", "img", size_gib=1)
    g, _ = grant(disks, "disk", "os", "Read", duration=60)
    assert disks.blobs.exists(g.stamp_blob)
    disks.clock = lambda: NOW.timestamp() + 61
    assert [r["state"] for r in disks.disks() if r["name"] == "os"] == ["Unattached"]
    assert not disks.blobs.exists(g.stamp_blob) and "access" not in _raw_record(disks, "os")
    disks.grant_access("disk", "os", "Read", 60)  # a new grant, as the platform allows after expiry
    assert disks.record("os")["state"] == "ActiveSAS"
    assert disks.stamp.check().ok


def test_an_expired_upload_grant_is_ready_to_upload_again_with_its_data(tmp_path, disks):
    raw = fixed_vhd(tmp_path / "u.vhd")
    disks.create_for_upload("u", len(raw))
    g, _ = grant(disks, "disk", "u", "Write", duration=60)
    disks.blobs.write(g.stamp_blob, 0, raw[:4 * MIB])  # part of the upload, through the grant's blob
    disks.clock = lambda: NOW.timestamp() + 61
    assert disks.grant_for(g.container) is None  # the endpoint meeting its URL ends it
    rec = _raw_record(disks, "u")
    assert rec["state"] == "ReadyToUpload" and "access" not in rec
    assert disks.blobs.properties(rec["blob"]).get(access.UPLOAD_MARK) is None  # no write lands through it
    again, _ = grant(disks, "disk", "u", "Write", duration=60)
    assert again.container != g.container
    upload(disks, again, raw)
    assert disks.revoke_access("disk", "u")["state"] == "Unattached"
    with disks.open_virtual("u") as v:
        assert v.read(5 * MIB, 4096) == b"up" * 2048


def test_a_disk_of_a_deallocated_vm_can_be_read_granted_and_its_vm_waits(tmp_path, disks):
    disks.create_empty("r", 1)
    disks.set_state("r", DiskState.RESERVED, attached_to="vm1", lun=0)
    with pytest.raises(OperationNotAllowed, match="attached to running VM vm1"):
        disks.grant_access("disk", "r", "Write", 60)
    g, _ = grant(disks, "disk", "r", "Read")
    rec = disks.record("r")
    assert rec["state"] == "ActiveSAS" and rec["attached_to"] == "vm1" and g.size == (1 << 30) + 512
    with pytest.raises(OperationNotAllowed, match="active SAS"):  # the VM cannot start
        disks.set_state("r", DiskState.ATTACHED, attached_to="vm1", lun=0)
    assert disks.revoke_access("disk", "r")["state"] == "Reserved"
    disks.set_state("r", DiskState.ATTACHED, attached_to="vm1", lun=0)  # now it starts
    disks.set_state("r", DiskState.RESERVED, attached_to="vm1", lun=0)
    grant(disks, "disk", "r", "Read", duration=60)
    disks.set_state("r", DiskState.UNATTACHED, attached_to=None, lun=None)  # detached while downloaded
    assert disks.record("r")["state"] == "ActiveSAS"
    disks.clock = lambda: NOW.timestamp() + 61  # expired: back to what it is now, Unattached
    rec = disks.record("r")
    assert rec["state"] == "Unattached" and rec["attached_to"] is None
