"""tools/bench_reclaim.py: with --workers N, fio runs N jobs of QD/N and their rates are summed."""

from __future__ import annotations

import argparse
import os
import sys

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import bench_reclaim  # noqa: E402


def test_n_workers_get_n_fio_jobs_sharing_the_queue_depth():
    a = argparse.Namespace(qd=64, workers=2, region_gib=4, minutes=1, sample=10, probe_iops=0)
    cmd = bench_reclaim.fio_cmd("nbd+unix:///lun0?socket=s", a, "log")
    assert "--numjobs=2" in cmd and "--iodepth=32" in cmd and "--group_reporting" in cmd
    assert "--name=probe" not in cmd


def test_the_probe_is_a_qd1_job_of_its_own_past_the_loads_region():
    a = argparse.Namespace(qd=64, workers=2, region_gib=4, minutes=1, sample=10, probe_iops=50)
    cmd = bench_reclaim.fio_cmd("nbd+unix:///lun0?socket=s", a, "log")
    probe = cmd[cmd.index("--name=probe"):]
    assert "--new_group" in probe and "--iodepth=1" in probe and "--rate_iops=50" in probe
    assert "--offset=4G" in probe  # after the load's 4 GiB: the probe reads and writes pages of its own


def test_the_jobs_rates_are_summed_interval_by_interval(tmp_path):
    log = str(tmp_path / "fio")
    with open(f"{log}_bw.1.log", "w") as f:
        f.write("10000, 102400, 1, 0, 0\n20000, 51200, 1, 0, 0\n30000, 1024, 1, 0, 0\n")
    with open(f"{log}_bw.2.log", "w") as f:
        f.write("10003, 102400, 1, 0, 0\n20004, 102400, 1, 0, 0\n")
    assert bench_reclaim.rates(log, 2) == [(10.0, 200.0), (20.0, 150.0)]  # an interval one job lacks is left out
    assert bench_reclaim.rates(log, 1) == [(10.0, 100.0), (20.0, 50.0), (30.0, 1.0)]
    assert bench_reclaim.rates(str(tmp_path / "none"), 2) == []


def test_use_counts_files_deleted_from_the_stamp_but_held_open(tmp_path):
    """A file deleted while a process holds it keeps its blocks: `du` misses
    them, so the tool adds them (each file once, however many descriptors)."""
    inside, outside = tmp_path / "st", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    fds = []
    for folder in (inside, outside):
        path = folder / "x.ext"
        path.write_bytes(b"x" * (1 << 20))
        fds += [os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)]
        path.unlink()
    try:
        held = bench_reclaim.held_deleted(str(inside))
        assert 1 << 20 <= held < 2 << 20
    finally:
        for fd in fds:
            os.close(fd)
    assert bench_reclaim.held_deleted(str(inside)) == 0
