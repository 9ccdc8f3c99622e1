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


@pytest.mark.parametrize("make", ["vhd", "stamp", "hostcache"])
def test_a_closed_stdout_or_stderr_is_no_traceback_and_no_error_in_the_output(tmp_path, make):
    """`cmd >&-` (stdout closed, not a pipe): Python gives sys.stdout = None and
    the command's first flush raised AttributeError; with stderr closed its
    error went to stdout, into what a script parses."""
    vhd.create(tmp_path / "d.vhd", 8 << 20).close()
    Stamp.create(str(tmp_path / "st")).close()
    ok, bad = {"vhd": (["info", str(tmp_path / "d.vhd")], ["info", str(tmp_path / "none.vhd")]),
               "stamp": (["--stamp", str(tmp_path / "st"), "disk", "list"],
                         ["--stamp", str(tmp_path / "st"), "disk", "show", "none"]),
               "hostcache": (["tiers", "Premium_LRS"], ["vm-size", "NoSuchSize"])}[make]
    closed_out = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", make, *ok],
                                capture_output=True, text=True, timeout=60)
    assert closed_out.returncode == 0 and closed_out.stderr == "", closed_out.stderr
    closed_err = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-m", make, *bad],
                                capture_output=True, text=True, timeout=60)
    assert closed_err.returncode != 0 and closed_err.stdout == "", closed_err.stdout
