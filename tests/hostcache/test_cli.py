"""The hostcache command: JSON out, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostcache", *args], capture_output=True, text=True)


def test_catalog_and_limits():
    tiers = json.loads(cli("tiers", "Premium_LRS").stdout)
    assert [t["tier"] for t in tiers][:6] == ["P1", "P2", "P3", "P4", "P6", "P10"]
    assert json.loads(cli("limits", "Premium_LRS", "100").stdout)["tier"] == "P10"
    assert json.loads(cli("vm", "D8s_v3").stdout)["uncached_iops"] == 12800


def test_simulate_shows_iops_rising_with_queue_depth():
    r = json.loads(cli("simulate", "Premium_LRS", "1024", "--qd", "1", "16", "--seconds", "3").stdout)
    assert [round(x["iops"]) for x in r["results"]] == [500, 5000]


def test_errors():
    r = cli("limits", "UltraSSD_LRS", "4", "--iops", "99999")
    assert r.returncode == 1 and "Ultra disk takes 100 to 4,000 IOPS" in r.stderr and "Traceback" not in r.stderr
    r = cli("vm", "Z9")
    assert r.returncode == 1 and "unknown VM size" in r.stderr
    assert cli("limits", "Bogus_LRS", "4").returncode == 2
