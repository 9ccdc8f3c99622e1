"""tools/fio_tiers.py: its plan covers every tier, its provisioning says what it cannot make yet,
and one short real run (fio through hostcache serve) writes its JSON and PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hostcache.measure import VERDICTS
from stamp import Stamp
from stamp.disks import Disks
from stamp.errors import StampError

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import fio_tiers  # noqa: E402


def test_every_tier_of_every_family_gets_a_vm_size_that_does_not_cap_it():
    plans = fio_tiers.plan(list(fio_tiers.ALL))
    names = [p.tier.name for p in plans]
    for family, first, last in (("P", "P1", "P80"), ("E", "E1", "E80"), ("S", "S4", "S80")):
        assert first in names and last in names, family
    assert [p.tier.name for p in plans if p.vm is None] == []
    assert {p.vm.name for p in plans if p.tier.name in ("P60", "P70", "P80")} & {"Standard_D8s_v3"} == set()


def test_the_default_sample_has_each_familys_smallest_a_bursting_one_and_largest():
    default = [fio_tiers.ALL[n].limits() for n in fio_tiers.DEFAULT]
    for sku, smallest, largest in (("Premium_LRS", "P1", "P80"), ("StandardSSD_LRS", "E1", "E80"),
                                   ("Standard_LRS", "S4", "S80")):
        tiers = [d for d in default if d.sku == sku]
        assert {smallest, largest} <= {d.tier for d in tiers}
        if sku != "Standard_LRS":  # HDD does not burst
            assert any(d.burst.value == "credit" for d in tiers), sku
    assert any(d.sku == "UltraSSD_LRS" for d in default) and any(d.sku == "PremiumV2_LRS" for d in default)


def test_groups_keep_to_the_sizes_data_disks():
    plans = fio_tiers.plan(["S4"] * 1 + ["S6", "S10", "S15", "S20", "S30", "S40", "S50"] + ["E40", "E50"])
    for vm, ps in fio_tiers.groups(plans):
        assert 0 < len(ps) <= vm.max_data_disks and all(p.vm.name == vm.name for p in ps)
    assert sum(len(ps) for _, ps in fio_tiers.groups(plans)) == len(plans)


def test_provision_gives_each_disk_its_figures(tmp_path):
    with Stamp.create(str(tmp_path / "st")) as st:
        d = Disks(st)
        for name in ("Ultra-4000", "V2-20000", "V2-80000", "Ultra-400000"):
            t = fio_tiers.ALL[name]
            fio_tiers.provision(d, name.lower(), t)
            rec = d.record(name.lower())
            assert (rec["disk_iops_read_write"], rec["disk_mbps_read_write"]) == (t.iops, t.mbps), rec
        with pytest.raises(StampError, match="diskIOPSReadWrite"):
            fio_tiers.provision(d, "bad", fio_tiers.Tier("bad", "PremiumV2_LRS", 8, 20000, 500))
        assert "bad" not in [r["name"] for r in d.disks()]


def test_arguments_are_checked(capsys):
    assert fio_tiers.parse(["--tiers", "all"]).tiers == list(fio_tiers.ALL)
    assert fio_tiers.parse(["--seconds", "400", "--retries", "0"]).seconds == 400  # 4 x 401 s < 30 minutes
    for bad in (["--seconds", "0"], ["--seconds", "401"], ["--seconds", "400"], ["--tiers", "P5"]):
        with pytest.raises(SystemExit) as e:
            fio_tiers.parse(bad)
        assert e.value.code == 2
    assert "unknown tier P5" in capsys.readouterr().err


def test_a_short_run_measures_the_ceiling_and_the_tiers(tmp_path):
    out, png = tmp_path / "rows.json", tmp_path / "rows.png"
    proc = subprocess.run([sys.executable, os.path.join(TOOLS, "fio_tiers.py"), "--no-peers", "--seconds", "0.5",
                           "--tiers", "E1", "V2-20000", "--json", str(out), "--png", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows["ceiling"]) == 4 and all(r["ours"] > 0 for r in rows["ceiling"])
    e1 = [r for r in rows["tiers"] if r["tier"] == "E1"]
    assert [(r["bs"], r["rw"]) for r in e1] == [(4096, "randwrite"), (4096, "randread"), (65536, "randwrite"),
                                              (65536, "randread")]
    for r in e1:  # a new E1 bursts to 600 IOPS; the throttle lets no more through
        assert r["verdict"] in VERDICTS and r["measures"].startswith("burst")
        assert 0 < r["iops"] <= 600 * 1.1 and r["limit_iops"] == 600
    v2 = [r for r in rows["tiers"] if r["tier"] == "V2-20000"]  # provisioned above its baseline of 3,000
    assert len(v2) == 4 and all(r["iops"] and r["verdict"] in VERDICTS for r in v2)
    assert [round(r["limit_iops"]) for r in v2] == [20000, 20000, round(500e6 / 65536), round(500e6 / 65536)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bucket_that_is_not_full_stops_the_run():
    fio_tiers.full_buckets({"disk lun0 P1 IOPS": 100.0, "VM B4ms uncached IOPS": 100.0, "disk lun0 S4 IOPS": None})
    with pytest.raises(RuntimeError, match="not full"):
        fio_tiers.full_buckets({"disk lun0 P1 IOPS": 99.0})
