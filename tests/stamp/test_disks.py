"""Managed disks, images and snapshots; the qemu-img round trip; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vhd
from stamp import Stamp
from stamp.disks import Disks, DiskState, ResourceInUse

from ..conftest import run

MIB = 1 << 20


@pytest.fixture
def disks(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    yield Disks(st)
    st.close()


def base_image(path, size=64 * MIB):
    with vhd.create(path, size, type="fixed") as img:
        img.write(0, b"BOOT" * 128)
        img.write(10 * MIB, b"base" * 1024)
    return str(path)


def test_a_qemu_made_vhd_imports_and_exports_back_equal(tmp_path, disks):
    src = tmp_path / "q.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(src), "32M")
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x5c 3M 2M", "-c", "write -P 0x11 31M 512", str(src))
    rec = disks.import_vhd("imp", str(src), "StandardSSD_LRS")
    assert rec["size_bytes"] == 32 * MIB and rec["state"] == "Unattached"
    for fmt in ("fixed", "dynamic"):
        out = tmp_path / f"back-{fmt}.vhd"
        disks.export("imp", str(out), fmt)
        assert run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "vpc", str(src), str(out),
                   check=False).returncode == 0


def test_import_refuses_what_azure_refuses_unless_converted(tmp_path, disks):
    dyn = tmp_path / "d.vhd"
    with vhd.create(dyn, 30 * MIB + 512) as img:
        img.write(MIB, b"d" * 4096)
    with pytest.raises(Exception, match="convert"):
        disks.import_vhd("x", str(dyn))
    rec = disks.import_vhd("x", str(dyn), convert=True)
    assert rec["size_bytes"] == 31 * MIB
    with disks.open_virtual("x") as v:
        assert v.read(MIB, 4096) == b"d" * 4096


def test_disks_from_one_image_share_it(tmp_path, disks):
    disks.create_image("img", path=base_image(tmp_path / "base.vhd"))
    for name in ("vm1", "vm2"):
        disks.create_from_image(name, "img")
    with disks.open_virtual("vm1", writable=True) as v:
        v.write(10 * MIB, b"vm1!" * 128)
        assert v.read(0, 4) == b"BOOT"
    with disks.open_virtual("vm2") as v:
        assert v.read(10 * MIB, 4) == b"base"
    with disks.open_virtual("vm1") as v:
        assert v.read(10 * MIB, 8) == b"vm1!vm1!"
    assert disks.disk("vm1")["used_bytes"] < 16 * 1024  # only what vm1 wrote, plus VHD metadata
    with pytest.raises(ResourceInUse, match="vm1, vm2"):
        disks.delete_image("img")


def test_a_disk_made_from_an_image_can_be_larger(tmp_path, disks):
    disks.create_image("img", path=base_image(tmp_path / "base.vhd"))
    disks.create_from_image("big", "img", size_gib=1)
    with disks.open_virtual("big", writable=True) as v:
        assert v.size == 1 << 30
        v.write(900 * MIB, b"x" * 512)
        assert v.read(100 * MIB, 4) == bytes(4) and v.read(0, 4) == b"BOOT"


def test_snapshots_incremental_and_full(tmp_path, disks):
    disks.create_empty("d", 1, "Premium_LRS")
    with disks.open_virtual("d", writable=True) as v:
        v.write(0, b"1" * MIB)
    s1 = disks.create_snapshot("s1", "d")
    with disks.open_virtual("d", writable=True) as v:
        v.write(MIB, b"2" * 4096)
    s2 = disks.create_snapshot("s2", "d")
    full = disks.create_snapshot("f", "d", incremental=False)
    assert s2["changed_bytes"] == 4096 and s1["changed_bytes"] >= MIB
    assert full["used_bytes"] >= MIB + 4096
    d = disks.blobs.diff(s1["blob"], s1["blob_snapshot"], s2["blob_snapshot"])
    assert d.written == [(MIB, 4096)]
    disks.create_copy("from-s1", source_snapshot="s1")
    with disks.open_virtual("from-s1") as v:
        assert v.read(MIB, 1) == b"\0" and v.read(0, 1) == b"1"
    disks.delete_disk("d")  # its snapshots outlive it
    with disks.open_virtual("d", snapshot="s2") as v:
        assert v.read(MIB, 4096) == b"2" * 4096
    disks.export("d", str(tmp_path / "s2.vhd"), "dynamic", snapshot="s2")
    with vhd.open(tmp_path / "s2.vhd") as img:
        assert img.read(MIB, 4096) == b"2" * 4096
    for s in ("s1", "s2", "f"):
        disks.delete_snapshot(s)
    assert not disks.blobs.exists(s1["blob"])
    assert disks.stamp.check().ok


def test_attached_disks_cannot_be_deleted_and_leases_exclude_writers(disks):
    disks.create_empty("d", 1)
    disks.set_state("d", DiskState.ATTACHED, attached_to="vm1", lun=0)
    with pytest.raises(ResourceInUse, match="vm1"):
        disks.delete_disk("d")
    with disks.open_virtual("d", writable=True):
        with pytest.raises(Exception, match="LeaseAlreadyPresent"):
            disks.open_virtual("d", writable=True)
    disks.set_state("d", DiskState.UNATTACHED, attached_to=None, lun=None)
    disks.delete_disk("d")


def test_direct_upload(tmp_path, disks):
    src = tmp_path / "u.vhd"
    with vhd.create(src, 20 * MIB, type="fixed") as img:
        img.write(5 * MIB, b"up" * 256)
    raw = src.read_bytes()
    blob = disks.create_for_upload("u", len(raw))["blob"]
    for off in range(0, len(raw), 4 * MIB):
        chunk = raw[off:off + 4 * MIB]
        if chunk.strip(b"\0"):
            disks.blobs.write(blob, off, chunk)
    assert disks.finish_upload("u")["state"] == "Unattached"
    with disks.open_virtual("u") as v:
        assert v.read(5 * MIB, 2) == b"up"


def cli(*args: str, stamp_dir: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stamp", "--stamp", stamp_dir, *args],
                          capture_output=True, text=True)


def test_cli_end_to_end(tmp_path):
    st = str(tmp_path / "st")
    assert cli("init", stamp_dir=st).returncode == 0
    base = base_image(tmp_path / "base.vhd")
    assert json.loads(cli("image", "create", "img", "--file", base, stamp_dir=st).stdout)["size_bytes"] == 64 * MIB
    assert cli("disk", "create", "os1", "--from-image", "img", stamp_dir=st).returncode == 0
    assert cli("snapshot", "create", "s1", "--disk", "os1", stamp_dir=st).returncode == 0
    diff = json.loads(cli("snapshot", "diff", "s1", stamp_dir=st).stdout)
    assert diff["written"] == [] and diff["cleared"] == []
    assert cli("fault", "node-lost", "node-01", stamp_dir=st).returncode == 0
    assert cli("check", stamp_dir=st).returncode == 1  # a replica is missing
    repair = json.loads(cli("repair", stamp_dir=st).stdout)
    assert repair["rereplicated"]
    assert cli("fault", "node-replaced", "node-01", stamp_dir=st).returncode == 0
    assert cli("check", stamp_dir=st).returncode == 0
    assert cli("disk", "export", "os1", str(tmp_path / "os1.vhd"), stamp_dir=st).returncode == 0
    assert run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "vpc", base, str(tmp_path / "os1.vhd"),
               check=False).returncode == 0
    assert json.loads(cli("gc", stamp_dir=st).stdout)["bytes_freed"] >= 0
    r = cli("disk", "delete", "nope", stamp_dir=st)
    assert r.returncode == 1 and "no disk named 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = cli("disk", "create", "x", "--size-gib", "99999", stamp_dir=st)
    assert r.returncode == 1 and "Premium_LRS disks are 1 GiB to 32767 GiB" in r.stderr
    r = cli("disk", "list", stamp_dir=str(tmp_path / "none"))
    assert r.returncode == 1 and "stamp init" in r.stderr


def test_the_writer_lease_of_an_attached_disk_is_its_hosts_only(disks):
    """Disks.acquire_writer_lease (what the host API grants): the host named in
    an Attached or Reserved record, or anyone once it is Unattached or when
    the record names no host; a stale lease and a retried acquire pass."""
    import uuid

    from stamp.pageblob import this_holder

    disks.create_empty("d", 1)
    blob = disks.record("d")["blob"]
    me = this_holder()
    disks.set_state("d", DiskState.ATTACHED, attached_to="vm1", lun=0, host="host-a")
    with pytest.raises(ResourceInUse, match="attached to VM vm1 of another host \\(host-a\\)"):
        disks.acquire_writer_lease(blob, me, host="host-b")
    with pytest.raises(ResourceInUse):
        disks.acquire_writer_lease(blob, me)  # a client naming no host
    lease = disks.acquire_writer_lease(blob, me, str(uuid.uuid4()), host="host-a")
    assert disks.acquire_writer_lease(blob, me, lease, host="host-b") == lease  # the same acquire again: a retry
    disks.blobs.release_lease(blob, lease)
    far = {"lease_holder": "pid 7 on far", "lease_pid": 7, "lease_started": 1, "lease_host": "far"}
    held = disks.acquire_writer_lease(blob, far, host="host-a")
    with pytest.raises(ResourceInUse):  # far's holder is not ours to judge
        disks.acquire_writer_lease(blob, me, host="host-b", stale=far)
    near = {**far, "lease_holder": "pid 8 on far", "lease_pid": 8}  # a process on far's machine found it dead
    taken = disks.acquire_writer_lease(blob, near, host="host-b", stale=far)
    assert taken != held
    disks.blobs.release_lease(blob, taken)
    disks.set_state("d", DiskState.RESERVED, attached_to="vm1", lun=0)  # deallocated: still host-a's
    with pytest.raises(ResourceInUse):
        disks.acquire_writer_lease(blob, me, host="host-b")
    disks.set_state("d", DiskState.RESERVED, host=None)  # a record naming no host: no owner
    disks.blobs.release_lease(blob, disks.acquire_writer_lease(blob, me, host="host-b"))
    disks.set_state("d", DiskState.UNATTACHED, attached_to=None, lun=None, host="host-a")  # detached: anyone's
    disks.blobs.release_lease(blob, disks.acquire_writer_lease(blob, me, host="host-b"))
