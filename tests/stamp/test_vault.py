"""The vault: incremental, deduplicated, compressed, encrypted backups of disks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import zstandard

import vhd
from stamp import Stamp
from stamp.disks import Disks
from stamp.vault import CHUNK, ChunkError, Vault, VaultError, VaultKeyError
from stamp.vault import chunk as ck
from stamp.vault.vault import _kept

MIB = 1 << 20


def stamp_with_image(tmp_path):
    """A stamp with image "base": 64 MiB, random data in chunks 0, 1 and 10."""
    base = tmp_path / "base.vhd"
    with vhd.create(base, 64 * MIB, type="fixed") as img:
        img.write(0, os.urandom(6 * MIB))
        img.write(40 * MIB, os.urandom(MIB))
    st = Stamp.create(str(tmp_path / "st"))
    disks = Disks(st)
    disks.create_image("base", path=str(base))
    yield tmp_path, disks
    st.close()


@pytest.fixture
def env(tmp_path):
    yield from stamp_with_image(tmp_path)


def view(disks: Disks, name: str) -> bytes:
    with disks.open_virtual(name) as v:
        return v.read(0, v.size)


def write(disks: Disks, name: str, offset: int, data: bytes) -> None:
    with disks.open_virtual(name, writable=True) as v:
        v.write(offset, data)


def test_full_then_incremental_backups_restore_byte_exact(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    write(disks, "vm1", 10 * MIB, b"A" * MIB)
    vault = Vault.create(str(tmp / "vault"))
    first = vault.backup(disks, "vm1")
    moment1 = view(disks, "vm1")
    assert not first.incremental and first.chunks_written >= 3
    write(disks, "vm1", 20 * MIB + 4096, b"B" * 8192)  # a small change
    second = vault.backup(disks, "vm1")
    moment2 = view(disks, "vm1")
    assert second.incremental and second.bytes_read <= 2 * CHUNK  # only what changed was read
    assert second.chunks_written == 1
    p1, p2 = (p["id"] for p in vault.points("vm1"))
    vault.restore_to_file(p1, str(tmp / "r1.vhd"), "dynamic")
    vault.restore_to_file(p2, str(tmp / "r2.vhd"), "fixed")
    with vhd.open(tmp / "r1.vhd") as r1, vhd.open(tmp / "r2.vhd") as r2:
        assert r1.read(0, r1.size) == moment1 and r2.read(0, r2.size) == moment2
    vault.restore_to_disk(p2, disks, "vm1-restored")
    assert view(disks, "vm1-restored")[:64 * MIB] == moment2
    assert vault.check() == [] and vault.verify()["ok"]


def test_a_restore_needs_no_image(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    before = view(disks, "vm1")
    point = vault.points()[0]["id"]
    for s in disks.snapshots():
        disks.delete_snapshot(s["name"])
    disks.delete_disk("vm1")
    disks.delete_image("base")  # the image is gone; the recovery point holds the guest's view
    vault.restore_to_disk(point, disks, "back")
    assert view(disks, "back")[:64 * MIB] == before


def test_ten_disks_from_one_image_store_its_data_once(env):
    tmp, disks = env
    vault = Vault.create(str(tmp / "vault"))
    reports = []
    for i in range(10):
        disks.create_from_image(f"vm{i}", "base")
        write(disks, f"vm{i}", 30 * MIB, bytes([i + 1]) * 4096)
        reports.append(vault.backup(disks, f"vm{i}"))
    assert reports[0].chunks_written == 4  # the image's data (chunks 0, 1 and 10), and vm0's own (7)
    assert all(r.chunks_written == 1 and r.chunks_reused == 3 for r in reports[1:])  # only each disk's own


def test_encryption_keys_and_names(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    a = Vault.create(str(tmp / "a"), passphrase="correct horse", kdf_seconds=0)
    b = Vault.create(str(tmp / "b"), passphrase="battery staple", kdf_seconds=0)
    ra, rb = a.backup(disks, "vm1"), b.backup(disks, "vm1")
    a.close()
    with pytest.raises(VaultKeyError, match="wrong passphrase"):
        Vault(str(tmp / "a"), passphrase="wrong")
    with pytest.raises(VaultKeyError, match="encrypted"):
        Vault(str(tmp / "a"))
    names_a = {f for _, _, files in os.walk(tmp / "a" / "chunks") for f in files}  # the chunks, not their
    names_b = {f for _, _, files in os.walk(tmp / "b" / "chunks") for f in files}  # 2-hex-digit fan-out folders
    assert ra.chunks_written == rb.chunks_written and not names_a & names_b  # equal plaintexts, unlike names
    a = Vault(str(tmp / "a"), passphrase="correct horse")
    point = a.points()[0]["id"]
    a.restore_to_file(point, str(tmp / "ra.raw"), "raw")
    assert (tmp / "ra.raw").read_bytes() == view(disks, "vm1")
    manifest = tmp / "a" / "points" / point
    raw = bytearray(manifest.read_bytes())
    raw[-20] ^= 1  # tampering: the manifest no longer authenticates
    manifest.write_bytes(raw)
    with pytest.raises(VaultError, match="does not authenticate"):
        a.manifest(point)


def test_a_corrupt_chunk_is_found_by_verify_and_refused_by_restore(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    name = sorted(vault.manifest(point)["chunks"].values())[0]
    path = vault._chunk_path(name)
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF
    open(path, "wb").write(raw)
    report = vault.verify()
    assert report["bad_chunks"] == [name] and report["points_affected"] == [point]
    index = next(int(i) for i, n in vault.manifest(point)["chunks"].items() if n == name)
    with pytest.raises(ChunkError, match=f"bytes {index * CHUNK} to {(index + 1) * CHUNK} of the disk.*{name}"):
        vault.restore_to_file(point, str(tmp / "r.vhd"))
    assert not os.path.exists(tmp / "r.vhd")



def test_a_restore_that_fails_midway_leaves_no_disk_and_the_disk_it_would_replace_intact(env):
    """A bad chunk late in a point: restore to a new disk makes no disk, and
    restore over a disk leaves that disk as it was (its data, its snapshots)."""
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    chunks = vault.manifest(point)["chunks"]
    last = chunks[str(max(int(i) for i in chunks))]  # restored after the others were written
    path = vault._chunk_path(last)
    raw = bytearray(open(path, "rb").read())
    raw[-10] ^= 0xFF
    open(path, "wb").write(raw)
    disks.create_empty("keep", 1, "Standard_LRS")
    write(disks, "keep", 0, b"mine" * 128)
    disks.create_snapshot("keep-s", "keep")
    blobs_before = sorted(disks.blobs.names())
    with pytest.raises(ChunkError):
        vault.restore_to_disk(point, disks, "new")
    with pytest.raises(ChunkError):
        vault.restore_to_disk(point, disks, "keep", overwrite=True)
    assert sorted(d["name"] for d in disks.disks()) == ["keep", "vm1"]
    assert view(disks, "keep")[:512] == b"mine" * 128
    assert sorted(disks.blobs.names()) == blobs_before
    assert disks.stamp.check().ok

def test_decompression_is_bounded_before_it_starts():
    data = bytes(ck.CHUNK)
    name = ck.name_of(b"x", None)
    frame = zstandard.ZstdCompressor().compress(data)  # 4 MiB of zeros in a few bytes
    head = ck._HEAD.pack(ck.MAGIC, ck.VERSION, ck.F_ZSTD, 0) + ck._LENGTHS.pack(1, len(frame))  # claims one byte
    with pytest.raises(ChunkError):
        ck.open_chunk(head + frame, name, None, None)


def test_prune_and_gc(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    for i in range(4):
        write(disks, "vm1", 50 * MIB, bytes([i + 1]) * CHUNK)
        vault.backup(disks, "vm1")
    assert len(vault.points("vm1")) == 4
    dropped = vault.prune(keep_last=2)
    assert len(dropped) == 2 and len(vault.points("vm1")) == 2
    for sub in os.listdir(tmp / "vault" / "chunks"):  # age the chunks, as if written long ago
        for name in os.listdir(tmp / "vault" / "chunks" / sub):
            os.utime(tmp / "vault" / "chunks" / sub / name, (0, 0))
    assert vault.gc()["chunks_removed"] == 4  # two dropped versions of chunks 12 and 13 (the write spans both)
    newest = vault.points("vm1")[-1]["id"]
    vault.restore_to_file(newest, str(tmp / "n.raw"), "raw")
    assert (tmp / "n.raw").read_bytes() == view(disks, "vm1")
    assert vault.check() == []


CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from stamp import Stamp
    from stamp.disks import Disks
    from stamp.vault import Vault
    st = Stamp.open(sys.argv[1])
    disks = Disks(st)
    vault = Vault(sys.argv[2])
    i = 0
    while True:
        with disks.open_virtual("vm1", writable=True) as v:
            v.write((i % 50) * 1048576, bytes([i % 250 + 1]) * 65536)
        vault.backup(disks, "vm1")
        if i % 3 == 2:  # and prune and gc, so kills land in those too
            vault.prune(keep_last=2)
            for sub in os.listdir(sys.argv[2] + "/chunks"):
                for name in os.listdir(sys.argv[2] + "/chunks/" + sub):
                    os.utime(sys.argv[2] + "/chunks/" + sub + "/" + name, (0, 0))
            vault.gc()
        print(i, flush=True)
        i += 1
""")


def test_kill_9_during_backups_leaves_a_consistent_vault(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.stamp.close()
    Vault.create(str(tmp / "vault")).close()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for rounds in (1, 2, 3, 4, 5, 7, 8) if not os.environ.get("DISKSTAMP_SLOW") else range(1, 30):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp / "st"), str(tmp / "vault"), root],
                                 stdout=subprocess.PIPE, text=True)
        for _ in range(rounds):
            child.stdout.readline()  # type: ignore[union-attr]
        child.send_signal(signal.SIGKILL)
        child.wait()
        with Stamp.open(str(tmp / "st")) as st, Vault(str(tmp / "vault")) as vault:
            assert vault.check() == []
            d = Disks(st)
            for p in vault.points():
                out = tmp / f"{p['id']}.raw"
                vault.restore_to_file(p["id"], str(out), "raw")
                out.unlink()
            vault.backup(d, "vm1")  # and the next backup completes, and removes what the kill left
            assert vault.leftovers(d) == []
            assert [s["name"] for s in d.snapshots()] == [vault.points()[-1]["snapshot"]]



RESTORE_KILLED = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from stamp import Stamp
    from stamp.disks import Disks
    from stamp.vault import Vault
    def write_then_die(self, pieces, size, target, held, digests=None):
        target.write(0, b"half" * 128)
        os._exit(9)  # killed midway through the restore
    Vault._write_pieces = write_then_die
    Vault(sys.argv[2]).restore_to_disk(sys.argv[4], Disks(Stamp.open(sys.argv[1])), "keep", overwrite=True)
""")


def test_a_restore_killed_midway_leaves_the_disk_it_would_replace_intact(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    disks.create_empty("keep", 1, "Standard_LRS")
    write(disks, "keep", 0, b"mine" * 128)
    blobs_before = sorted(disks.blobs.names())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", RESTORE_KILLED, str(tmp / "st"), str(tmp / "vault"), root, point],
                          timeout=120)
    assert proc.returncode == 9
    d = Disks(disks.stamp)
    assert view(d, "keep")[:512] == b"mine" * 128
    assert vault.clean_leftovers(d)  # as the vault's next backup or gc does: the dead restore's disk goes
    assert sorted(d.blobs.names()) == blobs_before
    vault.restore_to_disk(point, d, "keep", overwrite=True)  # and a restore over it now works
    with d.open_virtual("keep") as v:
        assert v.read(0, 64 * MIB) == view(d, "vm1")
    assert sorted(r["name"] for r in d.disks()) == ["keep", "vm1"]
    d.stamp.close()  # the dead restore's open extent is sealed when the stamp is next opened
    with Stamp.open(str(tmp / "st")) as st:
        assert st.check().ok, st.check().problems

def test_cli(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    disks.stamp.close()
    st, vault = str(tmp / "st"), str(tmp / "vault")

    def cli(*args: str, passphrase: str | None = "s3cret") -> subprocess.CompletedProcess[str]:
        e = dict(os.environ, DISKSTAMP_VAULT_PASSPHRASE=passphrase or "")
        return subprocess.run([sys.executable, "-m", "stamp", "--stamp", st, "backup", "--vault", vault, *args],
                              capture_output=True, text=True, env=e)

    assert json.loads(cli("init").stdout)["encrypted"] is True
    report = json.loads(cli("create", "vm1").stdout)
    assert report["chunks_written"] == 3 and report["compression_ratio"] >= 1
    point = json.loads(cli("list").stdout)[0]["id"]
    assert json.loads(cli("restore", point, "--to-file", str(tmp / "r.vhd")).stdout)["format"] == "fixed"
    assert json.loads(cli("restore", point, "--to-disk", "copy").stdout)["disk"] == "copy"
    assert cli("verify").returncode == 0 and cli("check").returncode == 0
    r = cli("list", passphrase="wrong")
    assert r.returncode == 1 and "wrong passphrase" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(cli("gc").stdout)["chunks_removed"] == 0


def test_restore_over_an_existing_disk_and_the_retention_rules(env):
    tmp, disks = env
    disks.create_from_image("vm1", "base")
    vault = Vault.create(str(tmp / "vault"))
    vault.backup(disks, "vm1")
    point = vault.points()[0]["id"]
    before = view(disks, "vm1")
    disks.create_empty("scratch", 1, "Standard_LRS")
    vault.restore_to_disk(point, disks, "scratch", overwrite=True)
    assert view(disks, "scratch") == before
    day = 86400.0  # six points over days and weeks, newest first
    pts = [{"id": str(k), "time": 1_800_000_000 - k * 3 * day} for k in range(6)]
    assert _kept(pts, 0, 2, 2, 0) == {"0", "1", "2"}  # two days, and one more week beyond them
    assert _kept(pts, 0, 0, 0, 0) == {"0"}  # the newest always stays
    assert vault.check() == []
