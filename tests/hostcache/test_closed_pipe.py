"""`... | head`: every command (vhd, stamp, hostcache) stops quietly when the
reader of its output has gone, with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import vhd
from stamp import Stamp


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a command whose stdout is a pipe already closed at the reading end
    (what `| head` becomes once head has exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", *args], stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    finally:
        os.close(w)


@pytest.mark.parametrize("make", ["vhd", "stamp", "hostcache"])
def test_a_closed_pipe_ends_the_command_quietly(tmp_path, make):
    if make == "vhd":
        vhd.create(tmp_path / "d.vhd", 8 << 20).close()
        args = ["vhd", "info", str(tmp_path / "d.vhd")]
    elif make == "stamp":
        Stamp.create(str(tmp_path / "st")).close()
        args = ["stamp", "--stamp", str(tmp_path / "st"), "disk", "list"]
    else:
        args = ["hostcache", "tiers", "Premium_LRS"]
    r = closed_pipe_run(*args)
    assert r.returncode == 1 and r.stderr == "", r.stderr
