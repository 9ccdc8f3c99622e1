"""The hostcache command: JSON out, one-line errors, exit codes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import lmdb
import pytest

from hostcache.errors import HostError
from hostcache.host import Host


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


def test_every_number_is_checked_where_it_is_read(tmp_path):
    st = str(tmp_path / "st")
    subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "init"], check=True, capture_output=True)
    host = ["--host", str(tmp_path / "host")]
    for args, why in [
        (["simulate", "Premium_LRS", "128", "--seconds", "0"], "--seconds: 0 is too small: more than 0"),
        (["simulate", "Premium_LRS", "128", "--qd", "0"], "--qd: 0 is too small: at least 1"),
        (["simulate", "Premium_LRS", "128", "--size", "0"], "--size: size '0' must be positive"),
        (["limits", "Premium_LRS", "0"], "size_gib: 0 is too small"),
        ([*host, "init", "--stamp", st, "--cache-mib", "0"], "--cache-mib: 0 is too small: at least 1"),
        ([*host, "init", "--stamp", st, "--cache-scale", "-1"], "--cache-scale: -1 is too small: more than 0"),
        ([*host, "init", "--stamp", st, "--ram-mib", "-1"], "--ram-mib: -1 is too small"),
        (["bootable-image", str(tmp_path / "x.vhd"), "--size", "ten"], "cannot read size 'ten'"),
        (["bootable-image", str(tmp_path / "x.vhd"), "--sectors", "128"], "--sectors: 128 is too large: 1 to 127"),
        ([*host, "mount", "vm1", str(tmp_path), "--partition", "0"], "--partition: 0 is too small: at least 1"),
        (["simulate", "Premium_LRS", "128", "--seconds", "nan"], "--seconds: nan is not a finite number"),
        ([*host, "serve", "vm1", "--port", "70000"], "--port: 70000 is too large: a TCP port, 1 to 65535"),
    ]:
        r = cli(*args)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "host").exists()


def test_sizes_read_with_binary_units():
    from hostcache.cli import build_parser

    a = build_parser().parse_args(["bootable-image", "x.vhd", "--size", "10G"])
    assert a.size == 10 << 30
    assert build_parser().parse_args(["simulate", "Premium_LRS", "128", "--size", "64KiB"]).size == 64 << 10


def test_simulate_gives_mb_per_second_in_the_disks_own_unit():
    r = json.loads(cli("simulate", "Premium_LRS", "1024", "--qd", "32", "--size", "64K", "--seconds", "3").stdout)
    assert r["mbps_unit"] == r["disk"]["mbps_unit"] == "MiB/s"
    assert r["results"][0] == {"qd": 32, "iops": 3200.0, "mbps": 200.0}  # the P30 example: 200 MB/s of 64 KiB
    r = json.loads(cli("simulate", "UltraSSD_LRS", "64", "--iops", "1000", "--mbps", "250", "--qd", "16",
                       "--size", "256K", "--seconds", "3").stdout)
    assert r["mbps_unit"] == "MB/s" and r["results"][0]["mbps"] == pytest.approx(250, rel=0.003)


def test_sizes_lists_and_filters_every_published_size():
    assert len(json.loads(cli("sizes").stdout)) == 313
    dsv5 = json.loads(cli("sizes", "--family", "dsv5", "--premium").stdout)
    assert [s["name"] for s in dsv5][:2] == ["Standard_D2s_v5", "Standard_D4s_v5"] and len(dsv5) == 8
    assert all(not s["host_caching"] for s in json.loads(cli("sizes", "--no-caching").stdout))
    d2 = json.loads(cli("vm-size", "standard_d2s_v5").stdout)
    assert d2["host_caching"] and d2["cache_size_gib"] is None
    assert d2["source"]["primary"]["path"].endswith("dsv5-series.md")
    d2ads = json.loads(cli("vm-size", "D2ads_v5").stdout)  # the 2021 page said no premium storage
    assert {"field": "premium_storage", "primary_value": True, "secondary_value": False}.items() <= \
        d2ads["disagreements"][0].items()
    assert "host cache size: not published; the host's cache is not grown for this size" in d2["not_published"]


def test_refusals_carry_the_platforms_code():
    r = cli("limits", "Premium_LRS", "128", "--on-demand-bursting")
    assert r.returncode == 1 and "InvalidParameter: on-demand bursting is only for Premium_LRS disks above 512 GiB" \
        in r.stderr


def test_a_reader_that_stops_early_gets_no_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "hostcache", "sizes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # as `hostcache sizes | head -1` does
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_a_host_that_cannot_be_made_is_refused_and_leaves_nothing(tmp_path):
    st = str(tmp_path / "st")
    subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "init"], check=True, capture_output=True)
    host = ["--host", str(tmp_path / "host")]
    for args, why in [
        ([*host, "init", "--stamp", st, "--cache-mib", "99999999999999"], "--cache-mib: 99999999999999 is too large"),
        ([*host, "init", "--stamp", st, "--cache-scale", "1e300"], "--cache-scale: 1e300 is too large"),
    ]:
        r = cli(*args)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    for kw in ({"cache_bytes": 1 << 60}, {"cache_scale": 1e300}):
        with pytest.raises(HostError, match="cannot be|at most 1"):
            Host.create(str(tmp_path / "host"), st, **kw)
    assert not (tmp_path / "host").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "cache").write_text("a file of mine where the cache folder goes")
    with pytest.raises(HostError, match="cannot make the host in"):
        Host.create(str(tmp_path / "mine"), st)
    assert sorted(os.listdir(tmp_path / "mine")) == ["cache"]  # host.json gone, my file kept
    (tmp_path / "mine" / "cache").unlink()
    Host.create(str(tmp_path / "mine"), st).close()  # the retry works


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   lmdb.DiskError("mdb_txn_commit: No space left on device")])
def test_a_full_host_folder_is_a_clear_error(tmp_path, monkeypatch, capsys, error):
    from hostcache import cli as cli_module

    def full(*args, **kw):
        raise error
    monkeypatch.setattr(cli_module, "run", full)
    assert cli_module.main(["--host", str(tmp_path), "vm", "list"]) == 1
    err = capsys.readouterr().err
    assert "hostcache vm: a file of the host or the stamp cannot be written" in err and "No space left" in err


@pytest.mark.parametrize("size", ["5K", "1537K"])
def test_a_bootable_image_that_is_not_whole_mib_is_refused_and_not_made(tmp_path, size):
    out = tmp_path / "boot.vhd"
    r = cli("bootable-image", str(out), "--size", size)
    assert r.returncode == 1 and "give a multiple of 1 MiB" in r.stderr, r.stderr
    assert not out.exists()
