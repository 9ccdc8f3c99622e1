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
    assert json.loads(cli("vm-size", "D8s_v3").stdout)["uncached_iops"] == 12800


def test_simulate_shows_iops_rising_with_queue_depth():
    r = json.loads(cli("simulate", "Premium_LRS", "1024", "--qd", "1", "16", "--seconds", "3").stdout)
    assert [round(x["iops"]) for x in r["results"]] == [500, 5000]


def test_errors():
    r = cli("limits", "UltraSSD_LRS", "4", "--iops", "99999")
    assert r.returncode == 1 and "Ultra disk takes 100 to 4,000 IOPS" in r.stderr and "Traceback" not in r.stderr
    r = cli("vm-size", "Z9")
    assert r.returncode == 1 and "unknown VM size" in r.stderr
    assert cli("limits", "Bogus_LRS", "4").returncode == 2


def test_host_commands_end_to_end(tmp_path):
    import vhd
    from hostcache.boot import make_boot_sector

    with vhd.create(tmp_path / "img.vhd", 32 << 20, type="fixed") as img:
        img.write(0, make_boot_sector(2048, 60000))
    st = str(tmp_path / "st")
    subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "init"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "image", "create", "img", "--file",
                    str(tmp_path / "img.vhd")], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "disk", "create", "d1", "--size-gib", "8"],
                   check=True, capture_output=True)
    host = ["--host", str(tmp_path / "host")]
    assert cli(*host, "init", "--stamp", st).returncode == 0
    assert json.loads(cli(*host, "vm", "create", "vm1", "--size", "D4s_v3", "--image", "img").stdout)["state"] == "Running"
    assert cli(*host, "vm", "attach", "vm1", "d1", "--lun", "0", "--caching", "ReadOnly").returncode == 0
    boot = json.loads(cli(*host, "vm", "boot", "vm1").stdout)
    assert boot["partition"]["kind"] == "mbr 0x83" and boot["reads"] > 200
    r = cli(*host, "vm", "attach", "vm1", "d1", "--lun", "1")
    assert r.returncode == 1 and "Attached to VM vm1" in r.stderr
    assert cli(*host, "vm", "detach", "vm1", "--lun", "0").returncode == 0
    assert json.loads(cli(*host, "cache", "stats").stdout)["lines"] > 0
    assert json.loads(cli(*host, "vm", "stop", "vm1").stdout)["state"] == "Deallocated"
    r = cli("--host", str(tmp_path / "nohost"), "vm", "list")
    assert r.returncode == 1 and "hostcache init" in r.stderr
