"""The vault against a model: random writes, backups, restores, prunes and gc;
every restore equals the model's copy of that moment."""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vhd
from stamp import Stamp
from stamp.disks import Disks
from stamp.vault import CHUNK, Vault

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
        self.model = bytearray(SIZE)
        self.model[CHUNK:2 * CHUNK] = b"\x11" * CHUNK
        self.vault = Vault.create(os.path.join(self.dir, "vault"), passphrase="model")
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
        for sub in os.listdir(os.path.join(self.vault.folder, "chunks")):
            for name in os.listdir(os.path.join(self.vault.folder, "chunks", sub)):
                os.utime(os.path.join(self.vault.folder, "chunks", sub, name), (0, 0))
        self.vault.gc()

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
