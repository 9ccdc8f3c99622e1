"""The host's VM-size rules: sizes rounded up, premium storage, OS disk rules,
caching on every size that publishes it, and create_vm that checks first and
leaves nothing behind when refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hostcache.errors import ConflictingUserInput, HostError, HostRuleError, InvalidParameter, OperationNotAllowed
from hostcache.host import GIB, OS_LUN, Host
from hostcache.throttle import FakeClock
from stamp.blobfile import PageBlobFile
from stamp.disks import Disks, DiskState
from vhd.image import create_fixed

from .test_host import host, make_image  # noqa: F401  (the fixture)

MIB = 1 << 20


def odd_size_disk(h, name: str, size: int, sku: str = "Premium_LRS") -> None:
    """A disk of `size` bytes (a multiple of 1 MiB, not of 1 GiB), uploaded as the platform allows."""
    d = Disks(h.stamp)
    blob = d.create_for_upload(name, size + 512, sku)["blob"]
    create_fixed(PageBlobFile(h.stamp, blob), size)
    d.finish_upload(name)


def test_a_disk_a_mib_over_a_tier_performs_as_the_next_tier(host):  # noqa: F811
    odd_size_disk(host, "p", 128 * GIB + MIB)
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "p", 0)
    assert host.throttle("vm1").disks["0"].limits.tier == "P15"


def test_a_disk_a_mib_over_4095_gib_cannot_cache(host):  # noqa: F811
    odd_size_disk(host, "big2", 4095 * GIB + MIB)
    host.create_vm("vm1", "D8s_v3", "mbr")
    with pytest.raises(OperationNotAllowed, match="host caching is only for disks under 4 TiB.*4,096 GiB"):
        host.attach("vm1", "big2", 0, "ReadOnly")
    host.attach("vm1", "big2", 0, "None")


def test_os_disk_rules_are_stated_as_such(host):  # noqa: F811
    with pytest.raises(OperationNotAllowed, match="^OperationNotAllowed: an OS disk is at most 4,095 GiB"):
        host.create_vm("vm1", "D8s_v3", "mbr", os_size_gib=4096)
    with pytest.raises(OperationNotAllowed, match="^OperationNotAllowed: UltraSSD_LRS disks cannot be OS disks"):
        host.create_vm("vm1", "D8s_v3", "mbr", os_sku="UltraSSD_LRS")
    with pytest.raises(OperationNotAllowed, match="PremiumV2_LRS disks cannot be OS disks"):
        host.create_vm("vm1", "D8s_v3", "mbr", os_sku="PremiumV2_LRS")


def test_a_refused_create_leaves_nothing_behind(host):  # noqa: F811
    with pytest.raises(OperationNotAllowed):
        host.create_vm("vm1", "D8s_v3", "mbr", os_sku="UltraSSD_LRS")
    with pytest.raises(OperationNotAllowed):
        host.create_vm("vm1", "L8s_v3", "mbr")  # no host caching there: ReadWrite is refused
    assert host.vms() == [] and "vm1-osdisk" not in [d["name"] for d in host.disks.disks()]
    vm = host.create_vm("vm1", "L8s_v3", "mbr", os_caching="None")  # the retry works
    assert vm["os_disk"]["caching"] == "None"


def test_a_create_that_fails_after_making_the_os_disk_removes_it(host, monkeypatch):  # noqa: F811
    def fail() -> None:
        raise HostRuleError("the host's cache folder is full")
    monkeypatch.setattr(host, "_size_cache", fail)
    with pytest.raises(HostRuleError, match="full"):
        host.create_vm("vm1", "D8s_v3", "mbr")
    assert host.vms() == [] and "vm1-osdisk" not in [d["name"] for d in host.disks.disks()]
    monkeypatch.undo()
    assert host.create_vm("vm1", "D8s_v3", "mbr")["state"] == "Running"


def test_a_vm_is_not_made_from_an_image_with_a_damaged_footer(host):  # noqa: F811
    blob = host.disks.image("mbr")["blob"]
    f = PageBlobFile(host.stamp, blob)
    end = f.size() - 512
    footer = bytearray(f.pread(512, end))
    footer[70] ^= 0xFF  # inside the unique id: the checksum no longer matches
    f.pwrite(bytes(footer), end)
    with pytest.raises(HostRuleError, match="image 'mbr' is damaged.*checksum.*make the image again"):
        host.create_vm("vm1", "D8s_v3", "mbr")
    assert host.vms() == [] and "vm1-osdisk" not in [d["name"] for d in host.disks.disks()]


@pytest.mark.parametrize("size", ["D2s_v5", "D2ds_v5", "DS1_v2", "d2s_v5", "Standard_DS1_v2"])
def test_sizes_with_host_caching_but_no_published_cache_size_make_vms(host, size):  # noqa: F811
    vm = host.create_vm("vm1", size, "mbr")
    assert vm["os_disk"]["caching"] == "ReadWrite"
    host.attach("vm1", "data1", 0, "ReadOnly")
    disk = host.open_disk("vm1", OS_LUN)
    assert disk.read(0, 512)[510:] == b"\x55\xaa"


def test_premium_disks_need_a_size_with_premium_storage(host):  # noqa: F811
    with pytest.raises(OperationNotAllowed, match="Standard_D2_v3 does not support premium storage"):
        host.create_vm("vm1", "D2_v3", "mbr")  # the OS disk defaults to Premium_LRS
    host.create_vm("vm1", "D2_v3", "mbr", os_sku="StandardSSD_LRS", os_caching="None")
    with pytest.raises(OperationNotAllowed, match="disk data1 is Premium_LRS"):
        host.attach("vm1", "data1", 0)
    host.attach("vm1", "data2", 0)  # Standard SSD


def test_lun_and_size_parameters_are_refused_with_their_code(host, tmp_path):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    with pytest.raises(InvalidParameter, match="^InvalidParameter: VM vm1 has no data disk at LUN 3"):
        host.set_caching("vm1", 3, "ReadOnly")
    with pytest.raises(InvalidParameter, match="^InvalidParameter: VM vm1 has no disk at LUN 5"):
        host.detach("vm1", 5)
    with pytest.raises(HostError, match="0 bytes cannot be: give 1 MiB to 16 TiB"):
        Host.create(str(tmp_path / "h2"), host.config["stamp"], cache_bytes=0)
    with pytest.raises(HostError, match="cache_scale must be more than 0"):
        Host.create(str(tmp_path / "h3"), host.config["stamp"], cache_scale=-1)


@pytest.mark.parametrize("lun", [1.5, True, "0"])
def test_a_lun_that_is_not_a_whole_number_is_refused_and_the_vm_stays_usable(host, lun):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    with pytest.raises(InvalidParameter, match="^InvalidParameter: a LUN is a whole number"):
        host.attach("vm1", "data1", lun)
    with pytest.raises(InvalidParameter, match="a LUN is a whole number"):
        host.detach("vm1", lun)
    assert host.disks.record("data1")["state"] == "Unattached"
    host.stop("vm1")  # the VM's record still reads back: every LUN in it is a number
    host.start("vm1")
    host.attach("vm1", "data1", 0)


def _attach_in_child(host_path: str, vm: str, disk: str, lun: int) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        from hostcache.host import Host
        from hostcache.throttle import FakeClock
        with Host({host_path!r}, clock=FakeClock()) as h:
            h.attach({vm!r}, {disk!r}, {lun})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_two_hosts_attaching_one_disk_at_once_cannot_both_succeed(host, tmp_path, monkeypatch):  # noqa: F811
    """Host 2 attaches data1 after host 1 checked it is free and before host 1
    marks it attached: the stamp takes only the first."""
    other = Host.create(str(tmp_path / "host2"), host.config["stamp"], cache_bytes=32 * MIB, clock=FakeClock())
    other.create_vm("vm2", "D8s_v3", "mbr")
    other.close()
    host.create_vm("vm1", "D8s_v3", "gpt")
    checked = host._caching
    seen: list[subprocess.CompletedProcess[str]] = []

    def meanwhile(*args, **kw):  # host 1 has checked the disk's state; host 2 goes now
        seen.append(_attach_in_child(str(tmp_path / "host2"), "vm2", "data1", 0))
        return checked(*args, **kw)
    monkeypatch.setattr(host, "_caching", meanwhile)
    with pytest.raises(ConflictingUserInput, match="only one VM at a time: disk data1 is Attached to VM vm2"):
        host.attach("vm1", "data1", 0)
    assert seen[0].returncode == 0, seen[0].stderr
    assert host.vm("vm1")["data_disks"] == {} and host.disks.record("data1")["attached_to"] == "vm2"


def test_a_compute_call_holds_the_host_lock_against_other_processes(host, monkeypatch):  # noqa: F811
    """Two processes attaching at one LUN of one VM: the second's checks run
    after the first has written, because a call holds HOST/host.lock."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    checked = host._caching
    seen: list[subprocess.CompletedProcess[str]] = []
    probe = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({os.path.join(host.path, "host.lock")!r}, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(3)
    """)

    def meanwhile(*args, **kw):
        seen.append(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60))
        return checked(*args, **kw)
    monkeypatch.setattr(host, "_caching", meanwhile)
    host.attach("vm1", "data1", 0)
    assert seen[0].returncode == 3, "another process could take the host's lock during attach"
    monkeypatch.undo()
    proc = _attach_in_child(host.path, "vm1", "data2", 0)  # after the first: refused on its own checks
    assert proc.returncode == 1 and "InvalidParameter: LUN 0 of VM vm1 holds data1" in proc.stderr


@pytest.mark.parametrize("gib", [0.5, float("nan"), 0, -1, True])
def test_an_os_disk_size_that_is_not_whole_gib_is_refused_with_its_code(host, gib):  # noqa: F811
    with pytest.raises(InvalidParameter, match="^InvalidParameter: an OS disk size is a whole number of GiB"):
        host.create_vm("vm1", "D8s_v3", "mbr", os_size_gib=gib)
    assert host.vms() == [] and "vm1-osdisk" not in [d["name"] for d in host.disks.disks()]


def test_a_disk_attached_to_a_deallocated_vm_is_reserved_until_it_starts(host):  # noqa: F811
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.stop("vm1")
    host.attach("vm1", "data1", 0)
    assert host.disks.record("data1")["state"] == "Reserved"  # as the VM's other disks are
    host.start("vm1")
    assert host.disks.record("data1")["state"] == "Attached"


def test_an_attach_or_detach_killed_between_its_two_writes_is_settled_by_the_next(host):  # noqa: F811
    """kill -9 after attach marked the disk and before the VM's record names
    it (or after detach unlisted it and before unmarking): the disk was stuck,
    attached to a VM that does not list it, so neither attach nor detach worked."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    host.attach("vm1", "data1", 0)
    vm = host.vm("vm1")
    del vm["data_disks"]["0"]
    host._put(vm)  # the VM's record as detach leaves it; the disk still says Attached to vm1 at LUN 0
    with pytest.raises(InvalidParameter, match="no disk at LUN 0"):
        host.detach("vm1", 0)
    assert host.disks.record("data1")["state"] == "Unattached"  # settled by that call
    host.attach("vm1", "data2", 1)
    host.disks.set_state("data1", DiskState.ATTACHED, attached_to="vm1", lun=0,
                         host=host.identity())  # as attach leaves it before the VM's record
    host.attach("vm1", "data1", 3)  # settled first, then attached where asked
    assert host.disks.record("data1")["lun"] == 3 and host.disks.record("data2")["lun"] == 1


def test_a_disk_being_uploaded_or_downloaded_cannot_be_attached(host):  # noqa: F811
    """The platform's rule: a disk with a SAS out (ActiveSAS, ActiveUpload) or
    waiting for its upload is attached only after revoke-access."""
    host.create_vm("vm1", "D8s_v3", "mbr")
    d = Disks(host.stamp)
    d.create_for_upload("up", 20 * MIB + 512)
    d.grant_access("disk", "data1", "Read", 60)
    for disk, state in (("up", "ReadyToUpload"), ("data1", "ActiveSAS")):
        with pytest.raises(OperationNotAllowed, match=f"not allowed on disk '{disk}' since the disk is in "
                           f"'{state}' state: .*revoke"):
            host.attach("vm1", disk, 0)
    d.revoke_access("disk", "data1")
    host.attach("vm1", "data1", 0)
    with pytest.raises(Exception, match="Access not permitted because disk data1 is currently attached to running "
                       "VM vm1"):
        d.grant_access("disk", "data1", "Read", 60)
