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
from stamp.rest import DEVSTORE_KEY
from tests.hostcache.test_host import make_image
from tests.hostcache.test_remote import served  # noqa: F401 (a fixture)

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


def _init(tmp_path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hostcache", "--host", str(tmp_path / name), "init", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DISKSTAMP_REMOTE_RETRY_SECONDS": "1", **(env or {})})


def _key_file(tmp_path, name: str, key: str, mode: int) -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write(key + "\n")
    os.chmod(path, mode)
    return path


def test_the_account_key_from_a_file_or_the_environment_never_the_command_line(tmp_path, served):  # noqa: F811
    wrong = DEVSTORE_KEY[:-8] + "AAAAAAA="
    env = {k: v for k, v in os.environ.items() if k != "DISKSTAMP_ACCOUNT_KEY"}
    open_file = _key_file(tmp_path, "open.key", DEVSTORE_KEY, 0o640)
    out = _init(tmp_path, "a", "--stamp", served.endpoint, "--account-key-file", open_file)
    assert out.returncode == 1 and "chmod 600" in out.stderr and "mode 0640" in out.stderr
    assert not os.path.exists(tmp_path / "a")
    out = _init(tmp_path, "a", "--stamp", served.endpoint, "--account-key-file", str(tmp_path / "missing.key"))
    assert out.returncode == 1 and "cannot read the account key file" in out.stderr
    bad = _key_file(tmp_path, "wrong.key", wrong, 0o600)
    out = _init(tmp_path, "a", "--stamp", served.endpoint, "--account-key-file", bad)
    assert out.returncode == 1 and "refused the account key" in out.stderr
    good = _key_file(tmp_path, "good.key", DEVSTORE_KEY, 0o600)
    out = _init(tmp_path, "a", "--stamp", served.endpoint, "--account-key-file", good, env=env)
    assert out.returncode == 0, out.stderr
    assert DEVSTORE_KEY not in out.stdout
    with open(tmp_path / "a" / "host.json") as f:
        assert json.load(f)["account_key"] == DEVSTORE_KEY  # kept: later commands sign with it
    assert os.stat(tmp_path / "a" / "host.json").st_mode & 0o777 == 0o600
    listed = subprocess.run([sys.executable, "-m", "hostcache", "--host", str(tmp_path / "a"), "vm", "list"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    out = _init(tmp_path, "b", "--stamp", served.endpoint, env={"DISKSTAMP_ACCOUNT_KEY": wrong})
    assert out.returncode == 1 and "refused the account key" in out.stderr  # the environment's key is the one used
    out = _init(tmp_path, "b", "--stamp", served.endpoint, "--account-key", DEVSTORE_KEY,
                "--account-key-file", good)
    assert out.returncode == 2 and "not allowed with" in out.stderr
    helped = subprocess.run([sys.executable, "-m", "hostcache", "init", "--help"], capture_output=True, text=True)
    assert "/proc/PID/cmdline" in helped.stdout and "--account-key-file" in helped.stdout
    for r in (out, listed):
        assert "Traceback" not in r.stderr


def test_host_json_holding_a_key_is_created_0600_never_readable_first(tmp_path, served, monkeypatch):  # noqa: F811
    """Under umask 0 (a file made without a mode would be 0666), every file
    made in the host folder that holds the key was made 0600 by the call
    that created it: at creation, not by a chmod afterwards. host.json is
    written at init and again when the cache grows (a VM arrives)."""
    import builtins

    made: list[tuple[str, int]] = []
    real_os_open, real_open = os.open, builtins.open
    folder = str(tmp_path / "h")

    def note(path: object, fd: int, existed: bool) -> None:
        if not existed and str(path).startswith(folder):
            made.append((os.path.basename(str(path)), os.fstat(fd).st_mode & 0o777))

    def os_open(path, flags, mode=0o777, *a, **kw):
        existed = os.path.exists(path)
        fd = real_os_open(path, flags, mode, *a, **kw)
        note(path, fd, existed)
        return fd

    def open_(file, *a, **kw):
        existed = isinstance(file, str | os.PathLike) and os.path.exists(file)
        f = real_open(file, *a, **kw)
        if isinstance(file, str | os.PathLike):
            note(file, f.fileno(), existed)
        return f

    old = os.umask(0)
    try:
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        with Host.create(folder, served.endpoint, account_key=DEVSTORE_KEY) as h:
            h.create_vm("vm1", "D8s_v3", "mbr")  # the cache grows: host.json written again
    finally:
        os.umask(old)
        monkeypatch.undo()
    holding = [(name, mode) for name, mode in made if name.startswith("host.json")]
    assert len(holding) >= 2, made  # written twice, each time to a new file renamed over it
    assert all(mode == 0o600 for _, mode in holding), made
    with open(os.path.join(folder, "host.json")) as f:
        assert json.load(f)["account_key"] == DEVSTORE_KEY
    assert os.stat(os.path.join(folder, "host.json")).st_mode & 0o777 == 0o600


def test_guests_data_is_readable_by_its_owner_only(tmp_path):
    """The stamp's extents and the host's cache file hold the guests' disk
    data, and the bucket and lock files say what the VMs do: under the usual
    umask (022) they were made 0644 in folders made 0755, so any user of the
    machine could read every disk through them. Folders made by create are
    0700 and the host's files 0600."""
    old = os.umask(0o022)
    try:
        st = Stamp.create(str(tmp_path / "st"))
        Disks(st).create_image("mbr", path=make_image(tmp_path / "mbr.vhd"))
        Disks(st).create_empty("data1", 4)
        st.close()
        with Host.create(str(tmp_path / "h"), str(tmp_path / "st")) as h:
            h.create_vm("vm1", "D8s_v3", "mbr")
            h.attach("vm1", "data1", 0, "ReadWrite")
            disk = h.open_disk("vm1", 0)
            disk.write(4096, b"secret".ljust(4096, b"\0"))
            assert disk.read(4096, 6) == b"secret"
            h.detach("vm1", 0)
    finally:
        os.umask(old)
    for folder in (tmp_path / "st", tmp_path / "h"):
        assert os.stat(folder).st_mode & 0o077 == 0, (folder, oct(os.stat(folder).st_mode))
    loose = []
    for root, _, files in os.walk(tmp_path / "h"):
        for name in files:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o077
            if mode:
                loose.append((name, oct(mode)))
    assert not loose, loose
