"""The compute calls on a host: create, attach at a LUN, detach, stop, boot."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import lmdb
import pytest

import vhd
from hostcache.boot import NotBootable, make_boot_sector, make_gpt
from hostcache.errors import ConflictingUserInput, HostError, InvalidParameter, OperationNotAllowed
from hostcache.host import Host, HostRuleError
from hostcache.throttle import FakeClock
from stamp import Stamp
from stamp.disks import Disks

MIB = 1 << 20


def make_image(path, boot: dict[int, bytes] | None = None, size: int = 64 * MIB) -> str:
    with vhd.create(path, size, type="fixed") as img:
        for lba, data in (boot or {0: make_boot_sector(2048, 100000)}).items():
            img.write(lba * 512, data)
        img.write(2048 * 512, os.urandom(6 * MIB))
    return str(path)


@pytest.fixture
def host(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    d = Disks(st)
    d.create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    d.create_image("gpt", path=make_image(tmp_path / "gpt.vhd", make_gpt(64 * MIB // 512)))
    d.create_image("blank", path=make_image(tmp_path / "blank.vhd", {0: bytes(512)}))
    d.create_empty("data1", 128, "Premium_LRS")
    d.create_empty("data2", 1024, "StandardSSD_LRS")
    d.create_empty("ultra", 64, "UltraSSD_LRS")
    d.create_empty("big", 4096, "Premium_LRS")
    st.close()
    h = Host.create(str(tmp_path / "host"), str(tmp_path / "st"), cache_bytes=32 * MIB, clock=FakeClock())
    yield h
    h.close()


def test_a_vm_boots_from_its_image_and_cached_boots_are_faster(host):
    host.create_vm("vm1", "D8s_v3", "mbr", os_caching="ReadOnly")
    first = host.boot("vm1")
    assert first["partition"]["kind"] == "mbr 0x83" and first["reads"] > 200
    second = host.boot("vm1")
    assert second["seconds"] < first["seconds"] / 5  # served by the host cache
    host.create_vm("vm2", "D8s_v3", "gpt", os_caching="None")  # None on an OS disk becomes ReadOnly
    assert host.vm("vm2")["os_disk"]["caching"] == "ReadOnly"
    assert host.boot("vm2")["partition"]["kind"] == "gpt"


@pytest.mark.parametrize("damage,why", [
    (lambda b: {0: bytes(512)}, "no boot signature"),
    (lambda b: {**b, 1: b[1][:20] + b"\xff" + b[1][21:]}, "GPT header CRC32"),
    (lambda b: {**b, 2: b[2][:40] + b"\xff" + b[2][41:]}, "entry array CRC32"),
])
def test_unbootable_disks_say_why(tmp_path, host, damage, why):
    boot = damage(make_gpt(64 * MIB // 512))
    Disks(host.stamp).create_image("bad", path=make_image(tmp_path / "bad.vhd", boot))
    host.create_vm("vm", "D2s_v3", "bad")
    with pytest.raises(NotBootable, match=why):
        host.boot("vm")


def test_zero_length_partition(tmp_path, host):
    mbr = bytearray(make_boot_sector(2048, 100))
    struct.pack_into("<I", mbr, 446 + 12, 0)
    Disks(host.stamp).create_image("zero", path=make_image(tmp_path / "z.vhd", {0: bytes(mbr)}))
    host.create_vm("vm", "D2s_v3", "zero")
    with pytest.raises(NotBootable, match="zero length"):
        host.boot("vm")


def test_attach_rules_with_the_platforms_error_codes(host):
    host.create_vm("vm1", "D2s_v3", "mbr")  # 4 data disks at most
    host.attach("vm1", "data1", 0, "ReadWrite")
    with pytest.raises(InvalidParameter, match="^InvalidParameter: LUN 0 of VM vm1 holds data1"):
        host.attach("vm1", "data2", 0)
    with pytest.raises(InvalidParameter, match="^InvalidParameter: LUN 4 is out of range.*LUNs 0 to 3"):
        host.attach("vm1", "data2", 4)
    with pytest.raises(OperationNotAllowed, match="^OperationNotAllowed: host caching is not supported for "
                       "UltraSSD_LRS disks: use caching None"):
        host.attach("vm1", "ultra", 1, "ReadOnly")
    with pytest.raises(OperationNotAllowed, match="^OperationNotAllowed: host caching is only for disks under 4 TiB"):
        host.attach("vm1", "big", 1, "ReadWrite")  # 4 TiB and more: no host caching
    with pytest.raises(InvalidParameter, match="caching must be"):
        host.attach("vm1", "data2", 1, "Sometimes")
    host.create_vm("vm2", "D2s_v3", "mbr")
    with pytest.raises(ConflictingUserInput, match="^ConflictingUserInput: A disk can be attached to only one VM "
                       "at a time: disk data1 is Attached to VM vm1; detach it there first"):
        host.attach("vm2", "data1", 0)
    for lun, disk in ((1, "data2"), (2, "ultra"), (3, "big")):
        host.attach("vm1", disk, lun)
    Disks(host.stamp).create_empty("data5", 8, "Standard_LRS")
    with pytest.raises(InvalidParameter, match="out of range"):
        host.attach("vm1", "data5", 4)
    with pytest.raises(Exception, match="attached to vm1"):
        Disks(host.stamp).delete_disk("data1")


def test_read_write_data_survives_detach_stop_and_a_new_host_process(host, tmp_path):
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "ReadWrite")
    disk = host.open_disk("vm1", 0)
    disk.write(4096, b"cached".ljust(4096, b"\0"))
    assert host.cache.dirty()  # acknowledged from the cache, not yet in the stamp
    host.detach("vm1", 0)  # detach flushes
    assert host.cache.dirty() == {}
    assert Disks(host.stamp).disk("data1")["state"] == "Unattached"
    with Disks(host.stamp).open_virtual("data1") as v:
        assert v.read(4096, 6) == b"cached"
    host.attach("vm1", "data1", 0, "ReadWrite")
    host.open_disk("vm1", 0).write(0, b"again".ljust(512, b"\0"))
    host.stop("vm1")  # deallocate: flush and release
    assert host.vm("vm1")["state"] == "Deallocated" and Disks(host.stamp).disk("data1")["state"] == "Reserved"
    with pytest.raises(HostRuleError, match="start it first"):
        host.open_disk("vm1", 0)
    path = host.path
    host.close()
    with Host(path, clock=FakeClock()) as again:  # host state persists in its folder
        again.start("vm1")
        assert again.open_disk("vm1", 0).read(0, 5) == b"again"
        again.delete_vm("vm1")
        assert Disks(again.stamp).disk("data1")["state"] == "Unattached"


def test_caching_change_is_a_detach_and_reattach(host):
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "ReadWrite")
    host.open_disk("vm1", 0).write(0, b"w" * 512)
    host.set_caching("vm1", 0, "None")
    assert host.vm("vm1")["data_disks"]["0"]["caching"] == "None" and host.cache.dirty() == {}
    assert host.open_disk("vm1", 0).read(0, 1) == b"w"


def test_a_data_disk_is_throttled_to_its_tier(host):
    """A P10 (500 IOPS, bursting to 3,500) with caching None: 4 KiB reads at
    queue depth 1 take the tier's 2 ms latency; with no credits, 500 IOPS."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    disk = host.open_disk("vm1", 0)
    t0 = host.clock.now()
    for i in range(200):
        disk.read(i * 4096, 4096)
    assert host.clock.now() - t0 == pytest.approx(200 * 0.002)
    host.latency = False
    host.throttles.clear()
    disk.throttle = host.throttle("vm1")
    with disk.throttle.shared(["0"], host.clock.now()):  # drained: the shared bucket keeps it
        disk.throttle.disks["0"].iops.credits = 0.0  # type: ignore[union-attr]
    t0 = host.clock.now()
    for i in range(2000):
        disk.read(i * 4096 % (64 * MIB), 4096)
    assert 2000 / (host.clock.now() - t0) == pytest.approx(500, rel=0.03)


def test_a_boot_trace_file(tmp_path, host):
    host.create_vm("vm1", "D8s_v3", "mbr")
    trace = tmp_path / "boot.trace"
    trace.write_text("# offset length\n0 512\n1048576 65536\n0x200000 4096\n")
    report = host.boot("vm1", str(trace))
    assert report["reads"] == 4 and report["bytes"] == 512 + 65536 + 4096
    assert "disk os P1 IOPS" in report["throttle"]
    trace.write_text("0 512\nnonsense\n")
    with pytest.raises(HostError, match="boot.trace:2"):
        host.boot("vm1", str(trace))
    trace.write_text(f"{1 << 40} 512\n")
    with pytest.raises(HostError, match="past the end"):
        host.boot("vm1", str(trace))


def test_the_cache_is_sized_from_the_vm_sizes_and_stats_outlive_the_process(tmp_path, host):
    host2 = Host.create(str(tmp_path / "h2"), host.config["stamp"], clock=FakeClock())
    host2.create_vm("a", "D8s_v3", "mbr")  # 200 GiB of cache, scaled 1/1024
    assert host2.cache.slots * (64 * 1024) == 200 * MIB
    host2.create_vm("b", "D2s_v3", "mbr")  # + 50 GiB
    assert host2.cache.slots * (64 * 1024) == 250 * MIB
    host2.boot("a")
    live = host2.throttle_stats("a")
    assert live["live"] and live["limiters"]["VM Standard_D8s_v3 cached IOPS"]["requests"] > 0
    path = host2.path
    host2.close()
    with Host(path, clock=FakeClock()) as again:
        recorded = again.throttle_stats("a")
        assert not recorded["live"] and recorded["limiters"]["VM Standard_D8s_v3 cached IOPS"]["requests"] > 0
        assert again.throttle_stats("b")["limiters"] == {}
        assert again.cache.slots * (64 * 1024) == 250 * MIB


def test_a_backup_through_the_host_holds_what_sits_dirty_in_its_cache(host, tmp_path):
    from stamp.vault import Vault

    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "ReadWrite")
    disk = host.open_disk("vm1", 0)
    disk.write(8192, b"only in the host cache".ljust(4096, b"\0"))
    assert host.cache.dirty()
    vault = Vault.create(str(tmp_path / "vault"))
    report = host.backup("vm1", 0, vault)
    assert report["chunks_written"] == 1
    point = vault.points("data1")[0]["id"]
    vault.restore_to_file(point, str(tmp_path / "r.raw"), "raw")
    with open(tmp_path / "r.raw", "rb") as f:
        f.seek(8192)
        assert f.read(22) == b"only in the host cache"
    vault.close()


SERVER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from hostcache.host import Host
from hostcache.throttle import FakeClock
h = Host(sys.argv[1], clock=FakeClock())
disk = h.open_disk("vm1", 0)
disk.write(0, b"A" * 65536)
print("written", flush=True)
if sys.stdin.readline() == "kill\\n":
    os._exit(0)  # as kill -9: the write sits dirty in the host cache
disk.write(65536, b"B" * 65536)
h.close()
print("closed", flush=True)
"""


def serve_in_another_process(host: Host, tmp_path) -> subprocess.Popen[str]:
    """A second process of the host (as `hostcache serve`) with data1 open at LUN 0 in ReadWrite."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", lun=0, caching="ReadWrite")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = subprocess.Popen([sys.executable, "-c", SERVER, host.path, root], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline() == "written\n"  # type: ignore[union-attr]
    return server


def test_a_disk_open_in_another_process_is_not_detached_under_it(host, tmp_path):
    """Detach drops the disk's cache lines: done under a process still
    writing the disk, its next writes were acknowledged and then dropped at
    write-back (the blob no longer known). Refused while it has the disk open."""
    server = serve_in_another_process(host, tmp_path)
    with pytest.raises(HostRuleError, match=f"data1 is open for writing by pid {server.pid}"):
        host.detach("vm1", 0)
    server.communicate("go on\n", timeout=60)
    assert server.returncode == 0
    host.detach("vm1", 0)
    with host.disks.open_virtual("data1") as v:
        assert v.read(0, 2 * 65536) == b"A" * 65536 + b"B" * 65536


def test_deleting_a_vm_whose_data_disk_is_open_elsewhere_changes_nothing(host, tmp_path):
    """The OS disk was marked Unattached (free for another VM to attach)
    before the data disk was refused, and the VM kept both."""
    server = serve_in_another_process(host, tmp_path)
    for call in (lambda: host.delete_vm("vm1"), lambda: host.stop("vm1")):
        with pytest.raises(HostRuleError, match="open for writing"):
            call()
        assert host.disks.record("vm1-osdisk")["state"] == "Attached" and host.vm("vm1")["state"] == "Running"
    server.communicate("go on\n", timeout=60)
    host.delete_vm("vm1")
    assert host.disks.record("vm1-osdisk")["state"] == "Unattached"


def test_detach_after_the_serving_process_died_writes_its_dirty_lines_back(host, tmp_path):
    """The dead process held the blob's lease: the write-back of its dirty
    lines by another process used to fail (LeaseIdMissing) and the detach with it."""
    server = serve_in_another_process(host, tmp_path)
    server.communicate("kill\n", timeout=60)
    host.detach("vm1", 0)
    with host.disks.open_virtual("data1") as v:
        assert v.read(0, 65536) == b"A" * 65536


def test_a_read_write_data_disk_maps_its_cached_writes_as_data(host):
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", lun=0, caching="ReadWrite")
    disk = host.open_disk("vm1", 0)
    disk.write(MIB, b"q" * 65536)  # in the host cache only
    assert [(e.offset, e.length, e.state.value) for e in disk.allocation(0, 4 * MIB)] == [
        (0, MIB, "zero"), (MIB, 65536, "data"), (MIB + 65536, 3 * MIB - 65536, "zero")]


def test_a_cache_too_small_or_too_large_leaves_no_host_folder(tmp_path, host, monkeypatch):
    """It used to be refused after host.json was written: the folder then
    said it held a host that no command could open."""
    with pytest.raises(HostError, match="give 1 MiB to 16 TiB"):
        Host.create(str(tmp_path / "h2"), str(tmp_path / "st"), cache_bytes=-(1 << 20))
    assert not os.path.exists(tmp_path / "h2" / "host.json")

    def too_large(*args, **kw):
        raise HostError("the host cache in h2/cache failed: [Errno 27] File too large")
    monkeypatch.setattr("hostcache.host.BlobCache", too_large)  # past what the file system takes
    with pytest.raises(HostError, match="File too large"):
        Host.create(str(tmp_path / "h2"), str(tmp_path / "st"), cache_bytes=1 << 40)
    assert not os.path.exists(tmp_path / "h2" / "host.json")


def test_a_close_that_cannot_write_the_host_state_still_closes_everything(host, monkeypatch):
    """A full host disk made close() end in a bare lmdb.DiskError (a traceback
    in the CLI) with the cache, state and stamp left open."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.open_disk("vm1", -1).write(0, b"\x01" * 4096)

    def full(*args):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")
    monkeypatch.setattr(Host, "_record_throttle_stats", full)
    with pytest.raises(HostError, match="could not be written: mdb_txn_commit: No space left"):
        host.close()
    assert host.cache.fd == -1 and not host.open_disks
    monkeypatch.undo()
    with Host(host.path, clock=FakeClock()) as again:
        assert again.open_disk("vm1", -1).read(0, 4096) == b"\x01" * 4096


ATTACHER = """
import sys
sys.path.insert(0, sys.argv[2])
from hostcache.host import Host
from hostcache.throttle import FakeClock
if sys.argv[3] == "pause":
    checked = Host._caching  # runs after the disk's state was found Unattached, before anything is written
    def paused(self, *a, **k):
        print("checked", flush=True)
        sys.stdin.readline()
        return checked(self, *a, **k)
    Host._caching = paused
with Host(sys.argv[1], clock=FakeClock()) as h:
    try:
        h.attach(sys.argv[4], "data1", 0, "ReadOnly")
        print("attached", flush=True)
    except Exception as e:
        print(e, flush=True)
"""


def waits_on_a_lock(pid: int) -> bool:
    with open("/proc/locks") as f:
        return any("->" in line and f" {pid} " in line for line in f)


def test_two_processes_cannot_attach_one_disk_to_two_vms(host):
    """Each attach found the disk Unattached before either wrote: the disk
    ended up in both VMs' records."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.create_vm("vm2", "D8s_v3", "mbr")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = subprocess.Popen([sys.executable, "-c", ATTACHER, host.path, root, "pause", "vm1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline() == "checked\n"  # type: ignore[union-attr]
    second = subprocess.Popen([sys.executable, "-c", ATTACHER, host.path, root, "go", "vm2"],
                              stdout=subprocess.PIPE, text=True)
    while second.poll() is None and not waits_on_a_lock(second.pid):
        time.sleep(0.01)  # until it has attached, or waits for the first call to end
    assert first.communicate("go\n", timeout=60)[0] == "attached\n"
    assert second.communicate(timeout=60)[0].startswith("ConflictingUserInput: A disk can be attached to only one VM")
    assert host.vm("vm2")["data_disks"] == {} and host.disks.record("data1")["attached_to"] == "vm1"


def test_two_disks_of_one_tier_keep_their_own_statistics(host):
    """data1 and another 128 GiB Premium disk are both P10 on vm1: each has its
    own line in the VM's statistics, named by its LUN."""
    host.disks.create_empty("data3", 128, "Premium_LRS")
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0)
    host.attach("vm1", "data3", 1)
    host.open_disk("vm1", 1).read(0, 4096)
    stats = host.throttle_stats("vm1")["limiters"]
    assert {"disk lun0 P10 IOPS", "disk lun1 P10 IOPS", "disk os P1 IOPS"} <= set(stats)
    assert stats["disk lun0 P10 IOPS"]["requests"] == 0 and stats["disk lun1 P10 IOPS"]["requests"] == 1


def test_a_read_grant_taken_on_a_new_os_disk_before_its_vm_attaches_it_refuses_the_create(host, monkeypatch):
    # create_vm made the OS disk, then marked it Attached without looking at its state: a grant-access from
    # another process in between (the disk is Unattached for a moment) was overwritten, and the disk ran
    # Attached to the VM with a download's grant (its SAS, its VHD view) still out.
    size_cache = Host._size_cache

    def meanwhile(self):
        monkeypatch.setattr(Host, "_size_cache", size_cache)
        Disks(self.stamp).grant_access("disk", "vm1-osdisk", "Read", 600)  # another process
        return size_cache(self)

    monkeypatch.setattr(Host, "_size_cache", meanwhile)
    with pytest.raises(OperationNotAllowed, match="ActiveSAS"):
        host.create_vm("vm1", "D2s_v3", "mbr")
    rec = host.disks.record("vm1-osdisk")
    assert rec["state"] == "ActiveSAS" and rec["attached_to"] is None and rec["access"]["ready"]
    assert host.vms() == []
    host.disks.revoke_access("disk", "vm1-osdisk")
    host.disks.delete_disk("vm1-osdisk")
    assert host.create_vm("vm1", "D2s_v3", "mbr")["os_disk"]["disk"] == "vm1-osdisk"


def test_a_deallocated_vm_s_disk_can_be_downloaded_and_the_vm_starts_after_revoke(host):
    """The platform grants Read access to a disk of a deallocated VM (Reserved);
    the VM cannot start until access is revoked, and no disk of it changes state."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0)
    host.stop("vm1")
    disks = Disks(host.stamp)
    disks.grant_access("disk", "data1", "Read", 600)
    with pytest.raises(OperationNotAllowed, match="'data1' is in 'ActiveSAS' state"):
        host.start("vm1")
    assert host.vm("vm1")["state"] == "Deallocated"
    assert disks.record("vm1-osdisk")["state"] == "Reserved" and disks.record("data1")["state"] == "ActiveSAS"
    assert disks.revoke_access("disk", "data1")["state"] == "Reserved"
    host.start("vm1")
    assert host.vm("vm1")["state"] == "Running" and disks.record("data1")["state"] == "Attached"
    with pytest.raises(Exception, match="attached to running VM vm1"):  # a running VM's disk: refused
        disks.grant_access("disk", "data1", "Read", 600)


def test_deleting_a_vm_with_its_os_disk_under_download_changes_nothing(host):
    """The OS disk of a deallocated VM under a Read grant cannot be deleted; deleting
    the VM with its OS disk is refused before the VM or any disk changes, not
    half done (the VM record gone, the disk delete then refused)."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0)
    host.stop("vm1")
    disks = Disks(host.stamp)
    disks.grant_access("disk", "vm1-osdisk", "Read", 600)
    with pytest.raises(OperationNotAllowed, match="'vm1-osdisk' is in 'ActiveSAS' state"):
        host.delete_vm("vm1", delete_os_disk=True)
    assert host.vm("vm1")["state"] == "Deallocated"
    assert disks.record("data1")["state"] == "Reserved" and disks.record("data1")["attached_to"] == "vm1"
    disks.revoke_access("disk", "vm1-osdisk")
    host.delete_vm("vm1", delete_os_disk=True)
    assert "vm1-osdisk" not in [r["name"] for r in disks.disks()] and disks.record("data1")["state"] == "Unattached"


def test_a_write_held_for_the_reclaimer_leaves_reads_of_its_disk_answered(host):
    """In one serving process (hostcache serve without --workers) a write
    held back by the stamp's writer backpressure waits by coroutine: a read
    of the same disk issued meanwhile is answered while the write is still
    held, and the write completes, stored, once the reclaimer lets it go."""
    import asyncio

    from hostcache.host import AsyncDisk
    from stamp.pressure import Publisher

    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0, "None")
    disk = AsyncDisk(host.open_disk("vm1", 0))
    gate = host.stamp.blobs.pressure
    assert host.stamp.stream.extent_bytes() > 0
    reclaimer = Publisher(host.stamp.path)  # a live reclaimer whose ceiling (0 x live + 0) every extent passes
    reclaimer.publish(live=0, ceiling=2.0, slack=0, progress=0, futile_at=0)
    held = asyncio.Event()
    gate.on_wait = held.set
    gate._due = 0  # the next write checks, as it would after `gate.every` bytes
    data = os.urandom(64 << 10)

    async def scenario() -> tuple[bool, bytes]:
        write = asyncio.create_task(disk.write(1 << 20, data))
        await asyncio.wait_for(held.wait(), 30)  # the write is held
        answered = await disk.read(0, 4096)
        still_held = not write.done()
        reclaimer.withdraw()  # the reclaimer stops: the write goes on
        await asyncio.wait_for(write, 30)
        return still_held, answered

    try:
        still_held, answered = asyncio.run(scenario())
    finally:
        reclaimer.withdraw()
    assert still_held, "the read waited for the held write"
    assert len(answered) == 4096 and gate.stats.waits == 1 and gate.stats.gave_up == 0, gate.stats
    assert asyncio.run(disk.read(1 << 20, len(data))) == data
    disk.close()
