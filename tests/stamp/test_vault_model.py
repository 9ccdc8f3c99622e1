"""The vault against a model: random writes, backups, restores, prunes and gc,
a backup in another process at the same time as one here and a gc, the index
lost, manifests swapped; every restore equals the model's copy of that moment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vhd
from stamp import Stamp
from stamp.disks import Disks
from stamp.vault import CHUNK, Vault, VaultError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from stamp import Stamp
    from stamp.disks import Disks
    from stamp.vault import Vault
    with Stamp.open(sys.argv[2]) as st, Vault(sys.argv[3], passphrase="model") as vault:
        print(vault.backup(Disks(st), "e", show_progress=False).point)
""")

MIB = 1 << 20
SIZE = 24 * MIB  # six chunks


class VaultMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vault-model-")
        base = os.path.join(self.dir, "base.vhd")
        with vhd.create(base, SIZE, type="fixed") as img:
            img.write(CHUNK, b"\x11" * CHUNK)
        self.stamp = Stamp.create(os.path.join(self.dir, "st"), extent_size=8 * MIB)
        self.disks = Disks(self.stamp)
        self.disks.create_image("base", path=base)
        self.disks.create_from_image("d", "base")
        self.disks.create_from_image("e", "base")
        self.model = bytearray(SIZE)
        self.model[CHUNK:2 * CHUNK] = b"\x11" * CHUNK
        self.model_e = bytes(self.model)
        self.vault = Vault.create(os.path.join(self.dir, "vault"), passphrase="model", kdf_seconds=0)
        self.moments: dict[str, bytes] = {}

    @rule(offset=st.integers(0, SIZE // 512 - 1), sectors=st.integers(1, 3 * CHUNK // 512), value=st.integers(0, 255))
    def write(self, offset, sectors, value):
        offset *= 512
        n = min(sectors * 512, SIZE - offset)
        with self.disks.open_virtual("d", writable=True) as v:
            v.write(offset, bytes([value]) * n)
        self.model[offset:offset + n] = bytes([value]) * n

    @rule()
    def backup(self):
        self.vault.backup(self.disks, "d", show_progress=False)
        self.moments[self.vault.points("d")[-1]["id"]] = bytes(self.model)

    @rule(offset=st.integers(0, SIZE // CHUNK - 1), value=st.integers(1, 255))
    def backups_at_once_and_a_gc(self, offset, value):
        """Disk e is backed up by another process while this one backs d up and runs gc."""
        e = bytearray(self.model_e)
        e[offset * CHUNK:(offset + 1) * CHUNK] = bytes([value]) * CHUNK
        with self.disks.open_virtual("e", writable=True) as v:
            v.write(offset * CHUNK, bytes([value]) * CHUNK)
        self.model_e = bytes(e)
        child = subprocess.Popen([sys.executable, "-c", OTHER, ROOT, self.stamp.path, self.vault.folder],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.backup()
        self.vault.gc(wait=120)  # waits for the other backup's lock; never deletes its chunks
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        self.moments[out.strip()] = self.model_e

    @precondition(lambda self: self.moments)
    @rule()
    def lose_the_index(self):
        before = {p["id"] for p in self.vault.points()}
        self.vault.close()
        shutil.rmtree(os.path.join(self.dir, "vault", "index"))
        self.vault = Vault(os.path.join(self.dir, "vault"), passphrase="model")
        assert {p["id"] for p in self.vault.points()} == before

    @precondition(lambda self: len(self.moments) >= 2)
    @rule(i=st.integers(0, 100), j=st.integers(1, 100))
    def swap_two_manifests(self, i, j):
        ids = sorted(self.moments)
        a, b = ids[i % len(ids)], ids[(i + j) % len(ids)]
        if a == b:
            return
        pa, pb = (os.path.join(self.dir, "vault", "points", p) for p in (a, b))
        ra, rb = open(pa, "rb").read(), open(pb, "rb").read()
        open(pa, "wb").write(rb)
        open(pb, "wb").write(ra)
        for p in (a, b):
            with pytest.raises(VaultError, match="does not authenticate"):
                self.vault.restore_to_file(p, os.path.join(self.dir, "never.raw"), "raw")
        with pytest.raises(VaultError, match="gc refuses"):
            self.vault.gc()
        problems = self.vault.check()
        assert any(a in x for x in problems) and any(b in x for x in problems)
        open(pa, "wb").write(ra)
        open(pb, "wb").write(rb)
        self.vault.rebuild_index()

    @precondition(lambda self: self.moments)
    @rule(i=st.integers(0, 100), fmt=st.sampled_from(["raw", "dynamic"]))
    def restore(self, i, fmt):
        point = sorted(self.moments)[i % len(self.moments)]
        out = os.path.join(self.dir, f"r.{fmt}")
        self.vault.restore_to_file(point, out, fmt)
        with vhd.open_device(out, fmt="raw" if fmt == "raw" else "vhd") as dev:  # type: ignore[attr-defined]
            assert dev.read(0, SIZE) == self.moments[point]
        os.unlink(out)

    @precondition(lambda self: self.moments)
    @rule(keep=st.integers(1, 3))
    def prune_and_gc(self, keep):
        for point in self.vault.prune(keep_last=keep):
            del self.moments[point]
        self.vault.gc()
        assert self.vault.leftovers(self.disks) == []

    @invariant()
    def vault_checks(self):
        assert self.vault.check() == []

    def teardown(self):
        assert self.vault.verify()["ok"]
        self.vault.close()
        self.stamp.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestVault = VaultMachine.TestCase
TestVault.settings = settings(max_examples=100 if os.environ.get("DISKSTAMP_SLOW") else 10,
                              stateful_step_count=20, deadline=None)
