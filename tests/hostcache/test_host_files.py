"""The host folder's own files: host.json is replaced whole (a kill at any
instant leaves the old or the new one), and the account key it may hold is
never in a file anyone else can read, not even for an instant."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from hostcache.host import Host
from stamp import Stamp
from stamp.disks import Disks
from tests.hostcache.test_host import make_image

MIB = 1 << 20
SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))

# Grows the host cache over and over: each round rewrites host.json (Host._size_cache, as a VM's arrival does)
REWRITER = """
import sys
from hostcache.host import Host
h = Host(sys.argv[1])
print("rewriting", flush=True)
n = 0
while True:
    n += 1
    h.config["cache_bytes"] = 1 << 20  # less than the VMs' scaled cache sizes: written again each round
    h.config["round"] = n
    h._size_cache()
"""


@pytest.fixture
def local_host(tmp_path):
    st = Stamp.create(str(tmp_path / "st"))
    Disks(st).create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
    st.close()
    with Host.create(str(tmp_path / "h"), str(tmp_path / "st")) as h:
        h.create_vm("vm1", "D8s_v3", "mbr")
    return str(tmp_path / "h")


def test_host_json_survives_kill_9_while_it_is_rewritten(local_host):
    """kill -9 of a process rewriting host.json, at a random instant, again and
    again: the host opens every time, with a whole host.json."""
    for i in range(60 if SLOW else 25):
        proc = subprocess.Popen([sys.executable, "-c", REWRITER, local_host], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "rewriting\n"
        time.sleep(random.uniform(0, 0.03))
        proc.kill()
        proc.wait()
        with open(os.path.join(local_host, "host.json")) as f:
            text = f.read()
        assert text.strip(), f"round {i}: host.json is empty"
        json.loads(text)  # whole
        with Host(local_host) as h:
            assert h.config["cache_bytes"] > MIB and h.vm("vm1")["size"] == "Standard_D8s_v3"
    leftovers = [n for n in os.listdir(local_host) if n.endswith(".tmp")]
    with Host(local_host) as h:
        h.create_vm("vm2", "D2s_v3", "mbr")  # a rewrite by a live process sweeps the dead ones' temp files
    assert len(leftovers) <= 25
    assert [n for n in os.listdir(local_host) if n.endswith(".tmp")] == []
