"""The vault tried as an adversary would (issue 11): concurrency, tampering, a
lost index, damaged chunks, failed restores, leftovers and metadata leaks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import vhd
from stamp import Stamp
from stamp.disks import Disks
from stamp.errors import StampError
from stamp.stream import own_start
from stamp.vault import CHUNK, ChunkError, Vault, VaultError
from stamp.vault import chunk as ck

from .test_vault import MIB, stamp_with_image, view, write


@pytest.fixture
def env(tmp_path):
    yield from stamp_with_image(tmp_path)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def age_chunks(vault_dir) -> None:
    """Make every chunk look written long ago, as in a backup that runs for minutes."""
    for d, _, names in os.walk(os.path.join(vault_dir, "chunks")):
        for name in names:
            os.utime(os.path.join(d, name), (0, 0))


def chunk_files(vault_dir) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, ns in os.walk(os.path.join(vault_dir, "chunks")) for n in ns)


def manifest_file(vault_dir, point: str) -> str:
    folder = os.path.join(vault_dir, "points")
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.startswith(point)))


def during_backup(monkeypatch, after: int, action) -> None:
    """Run `action` once from inside the next backup, when it has stored `after` chunks."""
    which = "seal_parts" if hasattr(ck, "seal_parts") else "seal"  # what the vault calls per new chunk
    real, calls = getattr(ck, which), []

    def seal(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, which, seal)


def restored(vault: Vault, point: str, tmp) -> bytes:
    out = tmp / f"restored-{uuid.uuid4().hex[:6]}.raw"
    vault.restore_to_file(point, str(out), "raw")
    data = out.read_bytes()
    out.unlink()
    return data


def new_chunks(disks: Disks, name: str, seed: int, count: int = 4) -> None:
    for k in range(count):
        write(disks, name, (20 + 4 * k) * MIB, bytes([seed + k]) * CHUNK)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def plant_lock(vault: Vault, **info) -> str:
    from stamp.vault import files

    lock_id = uuid.uuid4().hex[:16]
    body = {"id": lock_id, "op": "backup", "exclusive": False, "disk": "vm9", "start": None, "time": time.time(),
            **info}
    files.write_atomic(os.path.join(vault.folder, "locks", lock_id), vault._seal(body, f"lock {lock_id}"), lock_id)
    return lock_id


# -- 1. locks ----------------------------------------------------------------------------------


def in_other_process(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` (with sys.argv[1:] = args) in another Python process, as another command would."""
    prelude = f"import sys; sys.path.insert(0, {ROOT!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120)


GC = """
    import sys
    from stamp.vault import Vault, VaultError
    try:
        print(Vault(sys.argv[1]).gc())
    except VaultError as e:
        print(e)
"""


def test_gc_during_a_backup_deletes_none_of_its_chunks(env, monkeypatch):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    new_chunks(disks, "vm1", 1)
    vault = Vault.create(str(tmp / "vault"))
    outcome = []

    def gc():
        age_chunks(tmp / "vault")  # a long backup: its first chunks are old by now
        outcome.append(in_other_process(GC, str(tmp / "vault")).stdout)

    during_backup(monkeypatch, 3, gc)
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    assert restored(vault, point, tmp) == view(disks, "vm1")
    assert "locked" in outcome[0] and "backup of disk vm1" in outcome[0]
    assert vault.gc()["chunks_removed"] == 0  # once the backup is done, nothing is garbage


def test_a_dead_holders_lock_is_removed_and_an_old_one_is_named(env):
    tmp, disks = env
    vault = Vault.create(str(tmp / "vault"))
    import socket

    dead = plant_lock(vault, pid=dead_pid(), host=socket.gethostname())
    vault.gc()  # the dead backup's lock does not stop gc
    assert not os.path.exists(tmp / "vault" / "locks" / dead)
    old = plant_lock(vault, pid=1, host="elsewhere", time=time.time() - 3600)
    with pytest.raises(VaultError, match=f"stale lock {old}.*stamp backup unlock"):
        vault.gc()
    assert vault.unlock() == [old]
    vault.gc()


BACKUP = """
    import sys
    from stamp import Stamp
    from stamp.disks import Disks
    from stamp.vault import Vault, VaultError
    with Stamp.open(sys.argv[1]) as st:
        try:
            print(Vault(sys.argv[2]).backup(Disks(st), sys.argv[3]).point)
        except VaultError as e:
            print(e)
"""


def test_two_backups_of_one_disk_at_once_are_refused(env, monkeypatch):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    seen = []
    during_backup(monkeypatch, 0, lambda: seen.append(
        in_other_process(BACKUP, str(tmp / "st"), str(tmp / "vault"), "vm1").stdout))
    vault.backup(disks, "vm1")
    assert "backup of disk vm1" in seen[0] and len(vault.points()) == 1
    assert restored(vault, vault.points()[0]["id"], tmp) == view(disks, "vm1")


# -- 2. the index is a cache ------------------------------------------------------------------


def test_a_lost_index_is_rebuilt_from_the_manifests(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    new_chunks(disks, "vm1", 7)
    vault.backup(disks, "vm1")
    moment = view(disks, "vm1")
    points = [p["id"] for p in vault.points()]
    vault.close()
    shutil.rmtree(tmp / "vault" / "index")
    vault = Vault(str(tmp / "vault"))
    assert [p["id"] for p in vault.points()] == points
    age_chunks(tmp / "vault")
    before = chunk_files(tmp / "vault")
    vault.gc()
    assert chunk_files(tmp / "vault") == before
    assert restored(vault, points[-1], tmp) == moment
    assert vault.rebuild_index() == {"points": 2, "unreadable": []}


def test_gc_refuses_to_run_while_a_manifest_does_not_open(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    path = manifest_file(tmp / "vault", point)
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0x40
    open(path, "wb").write(raw)
    age_chunks(tmp / "vault")
    before = chunk_files(tmp / "vault")
    with pytest.raises(VaultError, match="gc refuses to run"):
        vault.gc()
    assert chunk_files(tmp / "vault") == before
    assert any(point in p for p in vault.check())


# -- 3. manifests authenticate as what they claim ---------------------------------------------


def test_a_swapped_manifest_does_not_authenticate(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.create_from_image("vm2", "base")
    write(disks, "vm2", 0, b"\x77" * (8 * MIB))
    vault = Vault.create(str(tmp / "vault"), passphrase="pw", kdf_seconds=0)
    vault.backup(disks, "vm1")
    vault.backup(disks, "vm2")
    p1, p2 = (vault.points(d)[0]["id"] for d in ("vm1", "vm2"))
    shutil.copyfile(manifest_file(tmp / "vault", p2), manifest_file(tmp / "vault", p1))  # replayed under p1's name
    with pytest.raises(VaultError, match="does not authenticate"):
        vault.restore_to_file(p1, str(tmp / "r.raw"), "raw")
    assert not (tmp / "r.raw").exists()
    assert vault.verify()["unreadable_points"] == [p1] and any(p1 in p for p in vault.check())
    report = vault.backup(disks, "vm1")  # the next backup does not build on it
    assert not report.incremental
    assert restored(vault, vault.points("vm1")[-1]["id"], tmp) == view(disks, "vm1")
    assert restored(vault, p2, tmp) == view(disks, "vm2")


def test_a_manifest_of_another_disk_is_not_a_previous_point(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    m = vault.manifest(vault.points()[0]["id"])
    assert (m["disk"], m["seq"], m["previous"]) == ("vm1", 1, None)
    vault.backup(disks, "vm1")
    m2 = vault.manifest(vault.points()[-1]["id"])
    assert (m2["seq"], m2["previous"]) == (2, m["id"])


# -- 4. damaged chunks are replaced -------------------------------------------------------------


def damage_one_chunk(vault: Vault, point: str) -> str:
    name = sorted(vault.manifest(point)["chunks"].values())[0]
    path = vault._chunk_path(name)
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF
    open(path, "wb").write(raw)
    return name


def test_a_damaged_chunk_is_rewritten_by_the_next_backup(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    first = vault.points()[0]["id"]
    name = damage_one_chunk(vault, first)
    assert vault.verify()["bad_chunks"] == [name]  # recorded
    write(disks, "vm1", 30 * MIB, b"x" * 4096)
    vault.backup(disks, "vm1")
    assert restored(vault, vault.points()[-1]["id"], tmp) == view(disks, "vm1")
    assert vault.verify()["ok"] and vault.check() == []  # the first point is whole again too


def test_a_missing_chunk_is_rewritten_by_the_next_backup(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    name = sorted(vault.manifest(vault.points()[0]["id"])["chunks"].values())[0]
    os.unlink(vault._chunk_path(name))
    vault.backup(disks, "vm1")
    assert restored(vault, vault.points()[-1]["id"], tmp) == view(disks, "vm1")


def test_repair_rewrites_damaged_chunks_from_the_disk(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    name = damage_one_chunk(vault, point)
    report = vault.repair(disks)
    assert report["repaired"] == [name] and report["still_bad"] == []
    assert vault.verify()["ok"] and restored(vault, point, tmp) == view(disks, "vm1")


# -- 5. two backups at once ----------------------------------------------------------------------

TWIN = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from stamp import Stamp
    from stamp.disks import Disks
    from stamp.vault import Vault
    stamp_dir, vault_dir, go, disk, other = sys.argv[2:7]
    st = Stamp.open(stamp_dir)
    disks, vault = Disks(st), Vault(vault_dir)
    for r in range(3):
        with disks.open_virtual(disk, writable=True) as v:
            for k in range(4):  # the same data on both disks: the same chunk names
                v.write((20 + 4 * k) << 20, bytes([16 * r + k + 1]) * (4 << 20))
        open(f"{go}.{disk}.{r}", "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{go}.{other}.{r}") and time.monotonic() < deadline:
            time.sleep(0.001)
        vault.backup(disks, disk)
    vault.close()
    st.close()
""")


def test_two_backups_at_once_sharing_chunks(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.create_from_image("vm2", "base")
    disks.stamp.close()
    Vault.create(str(tmp / "vault")).close()
    go = str(tmp / "go")
    kids = [subprocess.Popen([sys.executable, "-c", TWIN, ROOT, str(tmp / "st"), str(tmp / "vault"), go, d, o],
                             stderr=subprocess.PIPE, text=True) for d, o in (("vm1", "vm2"), ("vm2", "vm1"))]
    errors = [k.communicate(timeout=300)[1] for k in kids]
    assert [k.returncode for k in kids] == [0, 0], errors
    with Stamp.open(str(tmp / "st")) as st, Vault(str(tmp / "vault")) as vault:
        assert len(vault.points()) == 6 and vault.check() == [] and vault.verify()["ok"]
        for d in ("vm1", "vm2"):
            assert restored(vault, vault.points(d)[-1]["id"], tmp) == view(Disks(st), d)


# -- 6. restores that fail change nothing -----------------------------------------------------------


def test_restore_over_the_disk_that_was_backed_up(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    moment = view(disks, "vm1")
    write(disks, "vm1", 0, b"later" * 1000)
    vault.restore_to_disk(vault.points()[0]["id"], disks, "vm1", overwrite=True)
    assert view(disks, "vm1") == moment
    write(disks, "vm1", 9 * MIB, b"after the restore" * 100)
    vault.backup(disks, "vm1")  # the next backup sees the restored disk, not the old blob
    assert restored(vault, vault.points()[-1]["id"], tmp) == view(disks, "vm1")


def test_a_failed_restore_leaves_the_target_as_it_was_and_nothing_behind(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    names = sorted(vault.manifest(point)["chunks"].items(), key=lambda kv: int(kv[0]))
    path = vault._chunk_path(names[-1][1])  # the last piece: the others are written by then
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF
    open(path, "wb").write(raw)
    disks.create_empty("scratch", 1, "Standard_LRS")
    write(disks, "scratch", 0, b"mine" * 1024)
    before = view(disks, "scratch")
    with pytest.raises(ChunkError):
        vault.restore_to_disk(point, disks, "scratch", overwrite=True)
    assert view(disks, "scratch") == before
    with pytest.raises(ChunkError):
        vault.restore_to_disk(point, disks, "fresh")
    assert sorted(d["name"] for d in disks.disks()) == ["scratch", "vm1"]


def test_a_restored_disk_keeps_its_size(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    vault.restore_to_disk(vault.points()[0]["id"], disks, "copy")
    assert disks.record("copy")["size_bytes"] == 64 * MIB
    assert view(disks, "copy") == view(disks, "vm1")


# -- 7. no destructive defaults ---------------------------------------------------------------------


def test_prune_needs_a_rule_and_counts(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    for _ in range(3):
        vault.backup(disks, "vm1")
    with pytest.raises(VaultError, match="needs at least one rule"):
        vault.prune()
    with pytest.raises(VaultError, match="--keep-last is a count"):
        vault.prune(keep_last=-1)
    assert len(vault.points()) == 3
    assert len(vault.prune(keep_last=2)) == 1


# -- 8. leftovers ------------------------------------------------------------------------------------


def test_leftovers_of_dead_writers_are_reported_then_cleaned(env):
    tmp, disks = env
    import socket

    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    lock_id = plant_lock(vault, pid=dead_pid(), host=socket.gethostname())
    os.makedirs(tmp / "vault" / "chunks" / "00", exist_ok=True)
    (tmp / "vault" / "chunks" / "00" / f"{'0' * 64}.{lock_id}.tmp").write_bytes(b"half")
    disks.create_snapshot(f"vault-{vault.id}-{'0' * 16}", "vm1")  # a killed backup's snapshot
    left = vault.leftovers(disks)
    assert len(left) == 3 and any(lock_id in x for x in left) and any("snapshot" in x for x in left)
    assert vault.check() == []  # leftovers are not damage
    vault.backup(disks, "vm1")
    assert vault.leftovers(disks) == []
    assert [s["name"] for s in disks.snapshots()] == [vault.points()[-1]["snapshot"]]


# -- 9. an encrypted vault leaks nothing ------------------------------------------------------------


def test_an_encrypted_vault_shows_no_metadata(env):
    tmp, disks = env
    src = tmp / "distinctive-import-path.vhd"
    with vhd.create(src, 64 * MIB, type="fixed") as img:
        img.write(0, os.urandom(MIB) * 2)  # a chunk that repeats within itself
    disks.import_vhd("secret-disk-name", str(src))
    vault = Vault.create(str(tmp / "vault"), passphrase="pw", kdf_seconds=0)
    vault.backup(disks, "secret-disk-name")
    vault.verify()
    for d, _, names in os.walk(tmp / "vault"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        for name in names:
            path = os.path.join(d, name)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
            raw = open(path, "rb").read()
            for secret in (b"secret-disk-name", b"distinctive-import-path", b'"size"', b"Premium"):
                assert secret not in raw, (path, secret)
    for path in chunk_files(tmp / "vault"):  # no lengths in the clear after the header (a nonce is there)
        raw = open(path, "rb").read()
        assert struct.unpack_from("<II", raw, 8)[1] != len(raw) - 16
    kdf = json.loads((tmp / "vault" / "vault.json").read_text())["kdf"]
    assert kdf["n"] >= 2 ** 15 and kdf["r"] == 8 and kdf["p"] >= 1


def test_kdf_parameters_are_bounded_at_open(env):
    tmp, disks = env
    Vault.create(str(tmp / "vault"), passphrase="pw", kdf_seconds=0).close()
    config = json.loads((tmp / "vault" / "vault.json").read_text())
    config["kdf"]["n"] = 2 ** 30  # a doctored file: 128 GiB of memory
    (tmp / "vault" / "vault.json").write_text(json.dumps(config))
    with pytest.raises(VaultError, match="out of range"):
        Vault(str(tmp / "vault"), passphrase="pw")


def test_calibration_never_goes_below_the_floor():
    from stamp.vault import crypto

    params, keys = crypto.calibrate("pw", 0)
    assert (params["n"], params["r"], params["p"]) == (2 ** 15, 8, 1)  # restic's default cost is below this
    assert crypto.derive("pw", params) == keys
    with pytest.raises(VaultError, match="empty"):
        crypto.calibrate("", 0)


# -- 10. the command line ------------------------------------------------------------------------------


def test_cli_messages_name_the_command_and_the_variable(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.stamp.close()

    def cli(*args: str, passphrase: str | None = "pw", stamp: str = str(tmp / "st")):
        e = {k: v for k, v in os.environ.items() if k != "DISKSTAMP_VAULT_PASSPHRASE"}
        if passphrase is not None:
            e["DISKSTAMP_VAULT_PASSPHRASE"] = passphrase
        r = subprocess.run([sys.executable, "-m", "stamp", "--stamp", stamp, "backup", "--vault", str(tmp / "vault"),
                            *args], capture_output=True, text=True, env=e, timeout=120)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    r = cli("list")
    assert r.returncode == 1 and "`stamp backup init`" in r.stderr
    r = cli("init", passphrase=None)
    assert r.returncode == 2 and "$DISKSTAMP_VAULT_PASSPHRASE" in r.stderr and "--no-encryption" in r.stderr
    r = cli("init", passphrase="")
    assert r.returncode == 1 and "empty" in r.stderr and not (tmp / "vault" / "vault.json").exists()
    assert cli("init").returncode == 0
    r = cli("list", passphrase=None)
    assert r.returncode == 1 and "$DISKSTAMP_VAULT_PASSPHRASE" in r.stderr
    assert cli("create", "vm1").returncode == 0
    nowhere = str(tmp / "no-stamp-here")  # list, verify and restoring to a file need no stamp
    point = json.loads(cli("list", stamp=nowhere).stdout)[0]["id"]
    assert cli("verify", stamp=nowhere).returncode == 0
    assert cli("restore", point, "--to-file", str(tmp / "r.raw"), "--format", "raw", stamp=nowhere).returncode == 0
    r = cli("restore", point, "--to-disk", "copy", "--format", "dynamic")
    assert r.returncode == 2 and "--format" in r.stderr
    assert json.loads(cli("restore", point, "--to-disk", "copy").stdout)["size_bytes"] == 64 * MIB
    r = cli("prune")
    assert r.returncode == 1 and "needs at least one rule" in r.stderr
    assert cli("prune", "--keep-last", "-1").returncode == 1
    assert json.loads(cli("check").stdout) == {"ok": True, "problems": [], "leftovers": []}
    (tmp / "vault" / "vault.json").write_text("{not json")
    r = cli("list")
    assert r.returncode == 1 and "vault.json is damaged" in r.stderr


# -- 11. scattered changes cost what changed -------------------------------------------------------


def test_scattered_pages_are_read_and_stored_alone(env):
    import random

    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"), passphrase="pw", kdf_seconds=0)
    vault.backup(disks, "vm1")
    rng = random.Random(11)
    moments = {}
    for _ in range(3):
        for page in rng.sample(range(64 * MIB // 4096), 64 * MIB // 4096 // 100):  # 1%, scattered
            write(disks, "vm1", page * 4096, os.urandom(4096))
        report = vault.backup(disks, "vm1")
        assert report.incremental
        assert report.bytes_read <= 64 * MIB // 10 and report.new_bytes_raw <= 64 * MIB // 10
        moments[report.point] = view(disks, "vm1")
    for point, moment in moments.items():
        assert restored(vault, point, tmp) == moment
    assert vault.verify()["ok"] and vault.check() == []
    vault.restore_to_disk(report.point, disks, "copy")
    assert view(disks, "copy") == moments[report.point]


def test_ten_disks_from_one_image_still_share_its_chunks_after_scattered_changes(env):
    tmp, disks = env
    vault = Vault.create(str(tmp / "vault"))
    for i in range(3):
        disks.create_from_image(f"vm{i}", "base")
        vault.backup(disks, f"vm{i}")
        write(disks, f"vm{i}", 4096 * (i + 1), bytes([i + 1]) * 4096)  # inside the image's chunk 0
        report = vault.backup(disks, f"vm{i}")
        assert report.chunks_written == 1 and report.bytes_read == 4096  # a patch over the shared chunk
    shared = {vault.manifest(p["id"])["chunks"]["0"][0] for p in vault.points() if p["seq"] == 2}
    assert len(shared) == 1


def test_patches_decode_to_what_was_encoded_and_refuse_anything_else():
    from hypothesis import given
    from hypothesis import strategies as hs

    from stamp.vault import patch

    runs = [(0, b"a" * 512), (4096, b"b" * 1024), (CHUNK - 512, b"c" * 512)]
    assert patch.decode(patch.encode(runs)) == runs
    assert patch.overlay(runs, [(512, b"d" * 512)]) == [(0, b"a" * 512 + b"d" * 512), *runs[1:]]
    assert patch.sector_ranges([(100, 10), (600, 3000), (CHUNK - 1, 2)], 0, CHUNK) == [(0, 4096), (CHUNK - 512, 512)]

    @given(hs.binary(max_size=256))
    def any_bytes(raw):
        try:
            patch.decode(raw)
        except ChunkError:
            pass

    any_bytes()


# -- outside attack (adv11) ---------------------------------------------------------------------


def test_restore_to_a_new_disk_never_replaces_one_made_meanwhile(env, monkeypatch):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    real = disks.create_empty

    def and_another_process_makes_the_name(name, *args, **kwargs):
        out = real(name, *args, **kwargs)
        if ".restoring-" in name:
            real("fresh", 1, "Standard_LRS")
            write(disks, "fresh", 0, b"theirs" * 1000)
        return out

    monkeypatch.setattr(disks, "create_empty", and_another_process_makes_the_name)
    with pytest.raises(StampError, match="already exists"):
        vault.restore_to_disk(vault.points()[0]["id"], disks, "fresh")
    assert view(disks, "fresh")[:6000] == b"theirs" * 1000
    assert sorted(d["name"] for d in disks.disks()) == ["fresh", "vm1"]


@pytest.mark.parametrize("damage", [
    {"disk": None}, {"seq": "1"}, {"size": -1}, {"chunk_size": 0}, {"chunks": {"x": "ab"}},
    {"chunks": {"0": 7}}, {"chunks": {"0": ["ab"]}}, {"snapshot": 3}, {"time": "now"}, {"previous": 5},
])
def test_a_manifest_that_checks_out_but_is_malformed_is_listed_as_unreadable(env, damage):
    from stamp.vault import crypto

    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    body = {**vault.manifest(point), **damage}
    if damage.get("disk", "") is None:
        del body["disk"]
    other = "a" * 16
    body["id"] = other
    open(os.path.join(vault.folder, "points", other), "wb").write(crypto.seal(body, f"manifest {other}", None))
    vault.close()
    vault = Vault(str(tmp / "vault"))  # no KeyError: the index is rebuilt, the point listed as unreadable
    assert vault.rebuild_index()["unreadable"] == [other]
    assert [p["id"] for p in vault.points()] == [point]
    with pytest.raises(VaultError, match=other):
        vault.restore_to_file(other, str(tmp / "out.raw"), "raw")
    assert any(other in problem for problem in vault.check())


def test_a_live_process_on_this_host_keeps_its_lock_however_old(env):
    """A restore or a backup storing nothing new may not refresh its lock for a
    while: on its own host its process is checked, so it never counts as stale."""
    import socket


    tmp, disks = env
    vault = Vault.create(str(tmp / "vault"))
    mine = plant_lock(vault, pid=os.getpid(), start=own_start(), host=socket.gethostname(),
                      op="restore", disk=None, time=time.time() - 3 * 3600)
    assert vault.unlock() == []
    with pytest.raises(VaultError, match=f"the vault is locked: restore .*lock {mine}"):
        vault.gc()
    assert os.path.exists(tmp / "vault" / "locks" / mine)


def test_a_write_that_fails_midway_leaves_no_temporary_file(env, monkeypatch):
    """A full file system under the vault: the failed chunk's bytes go at once,
    not after the leftovers' grace period (they would keep the disk full)."""
    import errno

    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    real = ck.seal_parts

    class FullDisk(list):
        def __iter__(self):
            yield self[0]
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "seal_parts", lambda *a, **k: FullDisk(real(*a, **k)))
    with pytest.raises(OSError, match="No space"):
        vault.backup(disks, "vm1")
    assert [f for f in chunk_files(tmp / "vault") if f.endswith(".tmp")] == []
    assert [s for s in disks.snapshots() if s["name"].startswith("vault-")] == []


@pytest.mark.parametrize("wait", [-5.0, float("nan"), float("inf")])
def test_a_lock_wait_is_a_finite_count_of_seconds(env, wait):
    """NaN never reaches its deadline (gc would wait forever for a live holder)."""
    tmp, disks = env
    vault = Vault.create(str(tmp / "vault"))
    with pytest.raises(VaultError, match="--retry-lock"):
        vault.gc(wait=wait)
    with pytest.raises(VaultError, match="--retry-lock"):
        vault.prune(keep_last=1, wait=wait)


def test_a_restore_to_a_disk_of_the_longest_name(env):
    """The half-restored disk's name does not grow from the target's (80 characters is a valid name)."""
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    longest = "d" * 80
    vault.restore_to_disk(point, disks, longest)
    vault.restore_to_disk(point, disks, longest, overwrite=True)
    assert view(disks, longest) == view(disks, "vm1")
    assert sorted(d["name"] for d in disks.disks()) == [longest, "vm1"]


def test_stray_entries_in_the_vaults_folders_stop_nothing(env):
    """A file where a chunk folder should be, a folder where a manifest should be:
    the vault still opens, backs up and collects; the odd manifest is unreadable."""
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    (tmp / "vault" / "chunks" / "README").write_text("notes")
    (tmp / "vault" / "chunks" / "ab" / "old").mkdir(parents=True)
    (tmp / "vault" / "points" / ("b" * 16)).mkdir()
    vault.close()
    vault = Vault(str(tmp / "vault"))
    assert vault.rebuild_index()["unreadable"] == ["b" * 16]
    vault.backup(disks, "vm1")
    assert len(vault.points()) == 2
    with pytest.raises(VaultError, match="gc refuses to run"):
        vault.gc()
    os.rmdir(tmp / "vault" / "points" / ("b" * 16))
    vault.gc()
    assert restored(vault, vault.points()[-1]["id"], tmp) == view(disks, "vm1")


def test_a_backup_whose_lock_was_removed_does_not_commit(env, monkeypatch):
    """`stamp backup unlock` run against a live backup (its lock looked stale
    from another host), then gc: the backup's new chunks are gone, so it must
    fail rather than commit a point that names them."""
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    new_chunks(disks, "vm1", 1)
    vault = Vault.create(str(tmp / "vault"))
    outcome = []

    def unlock_then_gc():
        for name in os.listdir(tmp / "vault" / "locks"):
            os.unlink(tmp / "vault" / "locks" / name)
        outcome.append(in_other_process(GC, str(tmp / "vault")).stdout)

    during_backup(monkeypatch, 3, unlock_then_gc)
    with pytest.raises(VaultError, match="lock .* was removed"):
        vault.backup(disks, "vm1")
    assert "chunks_removed" in outcome[0]
    assert vault.points() == [] and vault.check() == []
    assert [s for s in disks.snapshots() if s["name"].startswith("vault-")] == []


def test_a_reused_chunks_folder_is_synced_before_the_manifest(env, monkeypatch):
    """Another backup may have just renamed that chunk into place without syncing
    its folder yet: a point naming it syncs the folder itself before its commit."""
    from stamp.vault import files

    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.create_from_image("vm2", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    synced: list[str] = []
    real = files.sync_dirs
    monkeypatch.setattr(files, "sync_dirs", lambda paths: (synced.extend(paths), real(paths)))
    report = vault.backup(disks, "vm2")  # every chunk is vm1's
    assert report.chunks_reused > 0 and report.chunks_written == 0
    names = [nm for entry in vault.manifest(report.point)["chunks"].values() for nm in ([entry] if isinstance(entry, str) else entry) if nm]
    assert {os.path.dirname(vault._chunk_path(nm)) for nm in names} <= set(synced)


def test_long_restores_verifies_and_unchanged_backups_keep_their_lock_fresh(env, monkeypatch):
    """Restores and verify never refreshed their lock, nor did a backup that
    stored nothing new: past lock.STALE_AFTER another host took them for
    abandoned, and its gc could delete the chunks a running restore reads."""
    from stamp.vault import lock as lk

    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.create_from_image("vm2", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    writes: list[str] = []
    real = lk.Lock._write

    def counted(self: lk.Lock) -> None:
        writes.append(self.op)
        real(self)

    monkeypatch.setattr(lk, "REFRESH", 0.0)  # every chance to refresh is taken
    monkeypatch.setattr(lk.Lock, "_write", counted)
    vault.restore_to_file(point, str(tmp / "r.vhd"))
    vault.restore_to_disk(point, disks, "r")
    vault.verify()
    vault.backup(disks, "vm2")  # the same data as vm1: every chunk is reused, none stored
    for op in ("restore", "verify", "backup"):
        assert writes.count(op) > {"restore": 2}.get(op, 1), (op, writes)
