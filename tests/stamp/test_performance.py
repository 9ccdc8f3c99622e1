"""A disk's performance settings: the published rules at each boundary, the
Disks API that keeps them in the disk's record, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stamp import performance as perf
from stamp.disks import GIB, Disks, ResourceNotFound
from stamp.errors import BadRequest, InvalidParameter, OperationNotAllowed, StampError

HOUR = 3600.0


# -- the rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("size,iops,ok", [
    (4, 99, False), (4, 100, True), (4, 4000, True), (4, 4001, False),  # 1,000 per GiB
    (400, 400000, True), (400, 400001, False), (1024, 400000, True), (1024, 400001, False),  # 400,000 in all
    (65536, 400000, True),
])
def test_ultra_iops_boundaries(size, iops, ok):
    if ok:
        assert perf.provisioned("UltraSSD_LRS", size, iops, 1)[0] == iops
    else:
        with pytest.raises(BadRequest, match=r"^BadRequest: The value \d+ of parameter disk.diskIOPSReadWrite is not "
                           r"valid. The supported range for a UltraSSD_LRS disk of size \d+ GB is between 100 and"):
            perf.provisioned("UltraSSD_LRS", size, iops, 1)


@pytest.mark.parametrize("iops,mbps,ok", [
    (4000, 0, False), (4000, 1, True), (4000, 1000, True), (4000, 1001, False),  # 0.25 MB/s per IOPS
    (101, 25, True), (101, 26, False),  # 25.25 allowed: 25 as a whole number
    (40000, 10000, True), (64000, 10000, True), (64000, 10001, False),  # 10,000 in all
])
def test_ultra_mbps_boundaries(iops, mbps, ok):
    if ok:
        assert perf.provisioned("UltraSSD_LRS", 64, iops, mbps) == (iops, mbps)
    else:
        with pytest.raises(BadRequest, match="diskMBpsReadWrite is not valid"):
            perf.provisioned("UltraSSD_LRS", 64, iops, mbps)


@pytest.mark.parametrize("size,iops,ok", [
    (1, 2999, False), (1, 3000, True), (1, 3001, False), (6, 3000, True), (6, 3001, False),  # the free floor
    (7, 3500, True), (7, 3501, False), (10, 5000, True),  # 500 per GiB after 6 GiB
    (160, 80000, True), (161, 80001, False), (65536, 80000, True),  # 80,000 in all
])
def test_premium_v2_iops_boundaries(size, iops, ok):
    if ok:
        assert perf.provisioned("PremiumV2_LRS", size, iops)[0] == iops
    else:
        with pytest.raises(BadRequest, match="PremiumV2_LRS disk of size"):
            perf.provisioned("PremiumV2_LRS", size, iops)


@pytest.mark.parametrize("iops,mbps,ok", [
    (3000, 124, False), (3000, 125, True), (3000, 750, True), (3000, 751, False),  # 0.25 per IOPS
    (8000, 2000, True), (80000, 2000, True), (80000, 2001, False),  # 2,000 in all
])
def test_premium_v2_mbps_boundaries(iops, mbps, ok):
    if ok:
        assert perf.provisioned("PremiumV2_LRS", 160, iops, mbps) == (iops, mbps)
    else:
        with pytest.raises(BadRequest, match="between 125 and"):
            perf.provisioned("PremiumV2_LRS", 160, iops, mbps)


def test_defaults_and_whole_numbers():
    assert perf.provisioned("UltraSSD_LRS", 64) == (64000, 10000)  # the size's maximum
    assert perf.provisioned("UltraSSD_LRS", 4) == (4000, 1000)
    assert perf.provisioned("PremiumV2_LRS", 500) == (3000, 125)  # the free baseline
    assert perf.provisioned("UltraSSD_LRS", 64.5, 64500, 1)[0] == 64500  # 64.5 GiB counts as 65
    for bad in (1000.5, True, "1000"):
        with pytest.raises(BadRequest, match="whole number"):
            perf.provisioned("UltraSSD_LRS", 64, bad, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter, match="only UltraSSD_LRS|PremiumV2_LRS"):
        perf.provisioned("Premium_LRS", 64)


@pytest.mark.parametrize("sku,size,tier", [
    ("Premium_LRS", 4, "P1"), ("Premium_LRS", 128, "P10"), ("Premium_LRS", 128.001, "P15"),
    ("Premium_LRS", 4096, "P50"), ("Premium_LRS", 4097, "P60"), ("Premium_LRS", 32767, "P80"),
    ("StandardSSD_LRS", 200, "E15"), ("Standard_LRS", 1, "S4"), ("Standard_LRS", 33, "S6"),
])
def test_baseline_tiers(sku, size, tier):
    assert perf.baseline_tier(sku, size) == tier


def test_the_tiers_a_size_may_have():
    """The published table: 4 GiB (P1) up to P50; 4 TiB (P50) none above;
    8 TiB (P60) P70 and P80; never below the baseline."""
    assert perf.allowed_tiers("Premium_LRS", 4) == ["P1", "P2", "P3", "P4", "P6", "P10", "P15", "P20", "P30",
                                                     "P40", "P50"]
    assert perf.allowed_tiers("Premium_LRS", 2048) == ["P40", "P50"]
    assert perf.allowed_tiers("Premium_LRS", 4096) == ["P50"]
    assert perf.allowed_tiers("Premium_LRS", 4097) == ["P60", "P70", "P80"]
    assert perf.allowed_tiers("Premium_LRS", 16384) == ["P70", "P80"]
    assert perf.allowed_tiers("Premium_LRS", 32767) == ["P80"]
    assert perf.check_tier("Premium_LRS", 128, "P50") == "P50"
    assert perf.check_tier("Premium_LRS", 128, "P10") == "P10"
    with pytest.raises(InvalidParameter, match="at or above its baseline tier, P10"):
        perf.check_tier("Premium_LRS", 128, "P6")
    with pytest.raises(InvalidParameter, match="only for disks larger than 4,096 GiB"):
        perf.check_tier("Premium_LRS", 4096, "P60")
    with pytest.raises(InvalidParameter, match="P1, P2"):
        perf.check_tier("Premium_LRS", 128, "P5")  # no such tier
    with pytest.raises(InvalidParameter, match="only Premium_LRS disks take a performance tier"):
        perf.check_tier("StandardSSD_LRS", 128, "E20")
    assert perf.check_tier("StandardSSD_LRS", 128, "E10") == "E10"  # its own: no change
    with pytest.raises(InvalidParameter, match="IOPS and MB/s instead"):
        perf.check_tier("UltraSSD_LRS", 128, "P10")


def test_a_downgrade_at_most_once_every_12_hours():
    assert not perf.check_downgrade("Premium_LRS", "P10", "P50", None, 0.0)  # an upgrade: any time
    assert perf.check_downgrade("Premium_LRS", "P50", "P10", None, 0.0)
    with pytest.raises(OperationNotAllowed, match="once every 12 hours"):
        perf.check_downgrade("Premium_LRS", "P50", "P10", 0.0, 12 * HOUR - 1)
    assert perf.check_downgrade("Premium_LRS", "P50", "P10", 0.0, 12 * HOUR)


def test_four_changes_in_24_hours():
    changes: list[float] = []
    for t in (0.0, 1.0, 2.0, 3.0):
        changes = perf.check_change_allowed("UltraSSD_LRS", changes, t)
    with pytest.raises(OperationNotAllowed, match="at most 4 times in 24 hours; the next change is possible in "
                                                  "24.0 h"):
        perf.check_change_allowed("UltraSSD_LRS", changes, 4.0)
    assert perf.check_change_allowed("UltraSSD_LRS", changes, 24 * HOUR) == [1.0, 2.0, 3.0, 24 * HOUR]
    with pytest.raises(OperationNotAllowed, match="its creation counts as one"):
        perf.check_change_allowed("PremiumV2_LRS", [0.0, 1.0, 2.0, 3.0], 4.0)


# -- the Disks API ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def disks(st):
    d = Disks(st)
    d.clock = Clock()
    return d


def test_a_disk_keeps_its_provisioned_figures_and_tier(disks):
    u = disks.create_empty("u", 64, "UltraSSD_LRS", iops=20000, mbps=800)
    assert (u["disk_iops_read_write"], u["disk_mbps_read_write"], u["performance_version"]) == (20000, 800, 0)
    v = disks.create_empty("v", 10, "PremiumV2_LRS")
    assert (v["disk_iops_read_write"], v["disk_mbps_read_write"]) == (3000, 125)
    assert v["performance_changes"] == [disks.clock.t]  # the creation counts as a change
    p = disks.create_empty("p", 128, "Premium_LRS", tier="P40")
    assert (p["tier"], p["baseline_tier"]) == ("P40", "P10")
    assert disks.create_empty("e", 128, "StandardSSD_LRS")["tier"] == "E10"
    assert {d["name"]: d.get("tier") for d in disks.disks()} == {"u": None, "v": None, "p": "P40", "e": "E10"}
    assert disks.disk("u")["disk_iops_read_write"] == 20000


@pytest.mark.parametrize("kw,err,match", [
    ({"sku": "UltraSSD_LRS", "iops": 64001}, BadRequest, "between 100 and 64000"),
    ({"sku": "UltraSSD_LRS", "iops": 1000, "mbps": 251}, BadRequest, "between 1 and 250"),
    ({"sku": "UltraSSD_LRS", "tier": "P10"}, InvalidParameter, "no performance tier"),
    ({"sku": "Premium_LRS", "iops": 1000}, InvalidParameter, "only settable for UltraSSD_LRS and PremiumV2_LRS"),
    ({"sku": "Premium_LRS", "tier": "P6"}, InvalidParameter, "baseline tier, P10"),
    ({"sku": "StandardSSD_LRS", "tier": "E20"}, InvalidParameter, "only Premium_LRS"),
])
def test_a_create_out_of_the_rules_is_refused_and_leaves_nothing(disks, kw, err, match):
    sku = kw.pop("sku")
    with pytest.raises(err, match=match):
        disks.create_empty("d", 64 if sku == "UltraSSD_LRS" else 128, sku, **kw)
    assert disks.disks() == []
    with pytest.raises(StampError, match="4 GiB to 65536"):
        disks.create_empty("tiny", 3, "UltraSSD_LRS")  # Ultra starts at 4 GiB


def test_updates_follow_the_rules_and_move_the_version_on(disks):
    disks.create_empty("u", 64, "UltraSSD_LRS", iops=1000, mbps=250)
    u = disks.update_disk("u", iops=4000)  # MB/s stay
    assert (u["disk_iops_read_write"], u["disk_mbps_read_write"], u["performance_version"]) == (4000, 250, 1)
    with pytest.raises(BadRequest, match="has 250 MB/s: give --disk-mbps-read-write too"):
        disks.update_disk("u", iops=100)  # 100 IOPS allow 25 MB/s
    assert disks.record("u")["disk_iops_read_write"] == 4000  # a refused update changes nothing
    assert disks.update_disk("u", iops=100, mbps=25)["performance_version"] == 2
    disks.update_disk("u", mbps=20)
    disks.update_disk("u", mbps=21)
    with pytest.raises(OperationNotAllowed, match="at most 4 times in 24 hours"):
        disks.update_disk("u", mbps=22)
    disks.clock.t += 24 * HOUR
    assert disks.update_disk("u", mbps=22)["performance_version"] == 5
    with pytest.raises(InvalidParameter):
        disks.update_disk("u", tier="P30")
    with pytest.raises(ResourceNotFound):
        disks.update_disk("nope", iops=100)
    with pytest.raises(StampError, match="nothing to change"):
        disks.update_disk("u")


def test_premium_v2_creation_counts_as_a_change(disks):
    disks.create_empty("v", 10, "PremiumV2_LRS")
    for iops in (4000, 4500, 5000):
        disks.update_disk("v", iops=iops)
    with pytest.raises(OperationNotAllowed, match="its creation counts as one"):
        disks.update_disk("v", iops=3000)


def test_premium_tiers_up_and_down(disks):
    disks.create_empty("p", 128, "Premium_LRS")
    assert disks.update_disk("p", tier="P50")["tier"] == "P50"
    p = disks.update_disk("p", tier="P20")  # a downgrade
    assert (p["tier"], p["tier_downgraded"]) == ("P20", disks.clock.t)
    assert disks.update_disk("p", tier="P30")["tier"] == "P30"  # upgrades any time
    disks.clock.t += 12 * HOUR - 1
    with pytest.raises(OperationNotAllowed, match="once every 12 hours"):
        disks.update_disk("p", tier="P10")
    disks.clock.t += 1
    assert disks.update_disk("p", tier="P10")["tier"] == "P10"  # back to the baseline
    with pytest.raises(InvalidParameter, match="P60, P70 and P80 are only for disks larger than 4,096 GiB"):
        disks.update_disk("p", tier="P60")
    with pytest.raises(InvalidParameter, match="IOPS and MB/s are only settable"):
        disks.update_disk("p", iops=5000)


def test_a_record_made_before_performance_was_kept_updates_from_the_defaults(disks):
    disks.create_empty("u", 64, "UltraSSD_LRS")
    rec = disks.record("u")
    for field in ("disk_iops_read_write", "disk_mbps_read_write", "performance_changes", "performance_version"):
        rec.pop(field)
    disks._put("disk", rec)
    u = disks.update_disk("u", iops=1000, mbps=100)
    assert (u["disk_iops_read_write"], u["performance_version"]) == (1000, 1)


def test_an_attached_disk_can_be_changed(disks):
    from stamp.disks import DiskState
    disks.create_empty("p", 128, "Premium_LRS")
    disks.set_state("p", DiskState.ATTACHED, attached_to="vm1", lun=0)
    assert disks.update_disk("p", tier="P30")["state"] == "Attached"


# -- the CLI ------------------------------------------------------------------------------

def stamp_cli(*args, path):
    env = {**os.environ, "DISKSTAMP_STAMP": str(path)}
    return subprocess.run([sys.executable, "-m", "stamp", *args], capture_output=True, text=True, env=env)


def test_cli_create_update_show_and_list(tmp_path):
    path = tmp_path / "st"
    assert stamp_cli("init", path=path).returncode == 0
    r = stamp_cli("disk", "create", "u1", "--size-gib", "64", "--sku", "UltraSSD_LRS", "--disk-iops-read-write",
                  "20000", "--disk-mbps-read-write", "800", path=path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["disk_iops_read_write"] == 20000
    assert stamp_cli("disk", "create", "p1", "--size-gib", "128", "--tier", "P40", path=path).returncode == 0
    r = stamp_cli("disk", "update", "u1", "--disk-iops-read-write", "64000", "--disk-mbps-read-write", "10000",
                  path=path)
    assert r.returncode == 0 and json.loads(r.stdout)["performance_version"] == 1
    shown = json.loads(stamp_cli("disk", "show", "u1", "--json", path=path).stdout)
    assert (shown["disk_iops_read_write"], shown["disk_mbps_read_write"]) == (64000, 10000)
    listed = json.loads(stamp_cli("disk", "list", "--json", path=path).stdout)
    assert {d["name"]: (d["tier"], d.get("disk_iops_read_write")) for d in listed} == {
        "u1": (None, 64000), "p1": ("P40", None)}


@pytest.mark.parametrize("args,code,words", [
    (("disk", "create", "u2", "--size-gib", "64", "--sku", "UltraSSD_LRS", "--disk-iops-read-write", "64001"), 1,
     "BadRequest: The value 64001 of parameter disk.diskIOPSReadWrite is not valid. The supported range for a "
     "UltraSSD_LRS disk of size 64 GB is between 100 and 64000."),
    (("disk", "create", "p2", "--size-gib", "128", "--tier", "P60"), 1, "InvalidParameter: the value 'P60'"),
    (("disk", "update", "p1", "--tier", "P6"), 1, "baseline tier, P10"),
    (("disk", "update", "p1", "--disk-iops-read-write", "900"), 1, "only settable for UltraSSD_LRS"),
    (("disk", "update", "p1"), 1, "nothing to change"),
    (("disk", "update", "p1", "--disk-iops-read-write", "many"), 2, "invalid int value"),
    (("disk", "update", "nope", "--tier", "P10"), 1, "no disk named 'nope'"),
])
def test_cli_errors_are_one_line_never_a_traceback(tmp_path, args, code, words):
    path = tmp_path / "st"
    stamp_cli("init", path=path)
    stamp_cli("disk", "create", "p1", "--size-gib", "128", path=path)
    r = stamp_cli(*args, path=path)
    assert r.returncode == code and words in r.stderr and "Traceback" not in r.stderr


def test_cli_help_teaches_the_rules_with_examples(tmp_path):
    for action in ("create", "update"):
        r = stamp_cli("disk", action, "--help", path=tmp_path)
        text = " ".join(r.stdout.split())
        assert r.returncode == 0
        assert "1,000 per GiB" in text and "500 per GiB" in text and "P60 to P80 only above 4,096 GiB" in text
        assert "stamp disk " + action in text and "--disk-iops-read-write" in text


def test_the_size_is_rounded_up_for_the_rules(disks):
    disks.create_empty("odd", 0, "UltraSSD_LRS", size_bytes=4 * GIB + (1 << 20), iops=5000, mbps=1)
    assert disks.record("odd")["disk_iops_read_write"] == 5000  # 4 GiB + 1 MiB performs as 5 GiB


# -- growing a disk ------------------------------------------------------------------------------

def test_a_disk_grows_keeping_its_data_and_its_tier_follows(disks):
    disks.create_empty("p", 4, "Premium_LRS", tier="P10")
    with disks.open_virtual("p", writable=True) as v:
        v.write(4 * GIB - 4096, b"\xab" * 4096)  # the last page before the growth
    p = disks.update_disk("p", size_gib=6)
    assert (p["size_bytes"], p["tier"], p["baseline_tier"], p["performance_version"]) == (6 * GIB, "P10", "P2", 1)
    with disks.open_virtual("p") as v:
        assert v.size == 6 * GIB
        assert v.read(4 * GIB - 4096, 4096) == b"\xab" * 4096
        assert v.read(4 * GIB, 1 << 20) == bytes(1 << 20)  # the new space reads as zeros (no old footer)
    assert disks.check_disk("p").ok
    assert disks.update_disk("p", size_gib=200)["tier"] == "P15"  # the new size's own tier is higher


def test_growing_follows_the_platforms_rules(disks):
    from stamp.disks import DiskState
    disks.create_empty("u", 4, "UltraSSD_LRS", iops=4000, mbps=1000)
    with pytest.raises(OperationNotAllowed, match="can only grow"):
        disks.update_disk("u", size_gib=3)
    u = disks.update_disk("u", size_gib=8, iops=8000)  # the larger size allows more IOPS, in the same change
    assert (u["size_bytes"], u["disk_iops_read_write"], len(u["performance_changes"])) == (8 * GIB, 8000, 1)
    disks.set_state("u", DiskState.ATTACHED, attached_to="vm1", lun=0)
    with pytest.raises(OperationNotAllowed, match="attached to running VM vm1"):
        disks.update_disk("u", size_gib=16)
    disks.set_state("u", DiskState.RESERVED)  # its VM deallocated: it may grow
    assert disks.update_disk("u", size_gib=16)["size_gib"] == 16
    with pytest.raises(BadRequest, match="size 20 GB is between 100 and 20000"):  # refused before anything grew
        disks.update_disk("u", size_gib=20, iops=20001)
    assert disks.record("u")["size_bytes"] == 16 * GIB
    with disks.open_virtual("u") as v:
        assert v.size == 16 * GIB
    with pytest.raises(StampError, match="65536 GiB"):
        disks.update_disk("u", size_gib=65537)


def test_a_disk_from_an_image_does_not_grow_here(disks, tmp_path):
    import vhd
    with vhd.create(str(tmp_path / "img.vhd"), 20 << 20, type="fixed"):
        pass
    disks.create_image("img", path=str(tmp_path / "img.vhd"))
    disks.create_from_image("os", "img")
    with pytest.raises(StampError, match="differencing VHD: only a disk holding a fixed VHD grows here"):
        disks.update_disk("os", size_gib=2)


def test_cli_grows_a_disk(tmp_path):
    path = tmp_path / "st"
    stamp_cli("init", path=path)
    stamp_cli("disk", "create", "p1", "--size-gib", "128", path=path)
    r = stamp_cli("disk", "update", "p1", "--size-gib", "200", path=path)
    assert r.returncode == 0 and json.loads(r.stdout)["tier"] == "P15"
    r = stamp_cli("disk", "update", "p1", "--size-gib", "100", path=path)
    assert r.returncode == 1 and "OperationNotAllowed: a disk can only grow" in r.stderr


def test_a_growth_killed_before_its_record_is_finished_by_the_same_update(disks):
    """The VHD grows first, then the record: a process killed in between (here:
    the growth alone) leaves the record behind, and the same update again
    writes it without growing the VHD twice."""
    disks.create_empty("p", 4, "Premium_LRS")
    disks._grow("p", 6, None, None, None)  # what a killed update had done
    assert disks.record("p")["size_bytes"] == 4 * GIB
    with disks.open_virtual("p") as v:
        assert v.size == 6 * GIB
    p = disks.update_disk("p", size_gib=6)
    assert (p["size_bytes"], p["baseline_tier"]) == (6 * GIB, "P2")
    with disks.open_virtual("p") as v:
        assert v.size == 6 * GIB
    assert disks.check_disk("p").ok


def test_a_disk_grows_only_while_nothing_else_has_it(disks, monkeypatch):
    """Growth is refused while a grant is out (a download reading the blob, an
    upload writing it), with the platform's code, and when the disk was
    attached to a running VM between the check and the record (another
    process's attach): the record keeps its size."""
    from stamp.disks import DiskState
    disks.create_empty("p", 4, "Premium_LRS")
    disks.grant_access("disk", "p", "Read", 600)
    with pytest.raises(OperationNotAllowed, match="ActiveSAS"):
        disks.update_disk("p", size_gib=6)
    assert disks.record("p")["size_bytes"] == 4 * GIB
    with disks.open_virtual("p") as v:
        assert v.size == 4 * GIB
    disks.create_for_upload("u", GIB + 512)
    disks.grant_access("disk", "u", "Write", 600)
    with pytest.raises(OperationNotAllowed, match="ActiveUpload"):
        disks.update_disk("u", size_gib=2)
    disks.create_empty("q", 4, "Premium_LRS")
    grow = disks._grow

    def attached_meanwhile(*args: object) -> None:
        grow(*args)
        disks.set_state("q", DiskState.ATTACHED, attached_to="vm1", lun=0)
    monkeypatch.setattr(disks, "_grow", attached_meanwhile)
    with pytest.raises(OperationNotAllowed, match="attached to running VM vm1"):
        disks.update_disk("q", size_gib=6)
    assert disks.record("q")["size_bytes"] == 4 * GIB


def test_growing_a_provisioned_disk_is_no_performance_change(disks):
    """The 4-in-24-hours rule counts changes of IOPS and MB/s: a growth alone
    neither uses one up nor is refused when the four are spent."""
    disks.create_empty("u", 8, "UltraSSD_LRS", iops=1000, mbps=100)
    for size in (9, 10, 11, 12, 13):
        assert disks.update_disk("u", size_gib=size)["performance_changes"] == []
    for iops in (1001, 1002, 1003, 1004):
        disks.update_disk("u", iops=iops)
    u = disks.update_disk("u", size_gib=16)
    assert (u["size_bytes"], u["disk_iops_read_write"], len(u["performance_changes"])) == (16 * GIB, 1004, 4)
    with pytest.raises(OperationNotAllowed, match="at most 4 times in 24 hours"):
        disks.update_disk("u", size_gib=20, iops=1005)


@pytest.mark.parametrize("sku", ["Premium_LRS", "StandardSSD_LRS", "Standard_LRS"])
def test_the_largest_tiered_disk_is_the_largest_tiers_size(disks, sku):
    """The size check and the tiers agree: 32,767 GiB (P80, E80, S80), not 32,768."""
    with pytest.raises(StampError, match="1 GiB to 32767 GiB; asked for 32768"):
        disks.create_empty("big", 32768, sku)
    disks.create_empty("p", 100, sku)
    with pytest.raises(StampError, match="1 GiB to 32767 GiB; asked for 32768"):
        disks.update_disk("p", size_gib=32768)
    assert perf.baseline_tier(sku, 32767)[1:] == "80"
