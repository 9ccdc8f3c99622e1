#!/usr/bin/env python3
"""Benchmark the vault, with restic backing up the same bytes in the same run.

  .venv/bin/python tools/bench_vault.py [--size-gib 4] [--json]

Rows (goals from issues 5 and 11):
- a full backup of a disk half written with random data, then an
  incremental one after changing 1% of it (goal: >= 20x faster);
- backing up the same bytes, encrypted: the disk by the vault against
  `restic backup` of them as a raw file (also encrypted; goal: at least as
  fast, so the ratio is restic's time over ours);
- restore throughput to a raw file, against `restic restore`;
- ten disks made from one image: bytes stored against ten full copies;
- a 256 MiB disk, 1% of it changed in scattered 4 KiB pages: what the
  incremental backup reads, and what it stores, against the whole disk
  (goal: at most 10% each, so a ratio >= 10x);
- backing up a disk from an image while another process backs up a second
  disk from the same image (the same chunks) into the same vault and a gc
  waits for its lock, against the same backup alone.
Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from benchtable import show  # noqa: E402

import vhd  # noqa: E402
from stamp import Stamp  # noqa: E402
from stamp.disks import Disks  # noqa: E402
from stamp.vault import Vault  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
PASS = "benchmark passphrase"


def timed(fn):  # type: ignore[no-untyped-def]
    os.sync()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if shutil.which("restic") is None:
        print("bench_vault: restic is missing (bash tools/run.sh test installs it)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="bench-vault-", dir="/var/tmp")
    rows = []
    try:
        size = a.size_gib * GIB
        st = Stamp.create(os.path.join(work, "st"))
        disks = Disks(st)
        disks.create_empty("d", a.size_gib, "Premium_LRS")
        with disks.open_virtual("d", writable=True) as v:
            for off in range(0, size // 2, 4 * MIB):  # half written, random: no compression to hide behind
                v.write(off, os.urandom(4 * MIB))
        vault = Vault.create(os.path.join(work, "vault"), PASS)
        t_full, full = timed(lambda: vault.backup(disks, "d", show_progress=False))
        with disks.open_virtual("d", writable=True) as v:
            n = max(1, size // 100 // (4 * MIB))  # 1% of the disk, in 4 MiB pieces spread over it
            for i in range(n):
                v.write(i * (size // n) // (4 * MIB) * (4 * MIB), os.urandom(4 * MIB))
        t_inc, inc = timed(lambda: vault.backup(disks, "d", show_progress=False))
        rows.append({"test": f"full backup of {a.size_gib} GiB (half written) vs incremental after 1%",
                     "ours": t_inc, "peer": t_full, "peer_name": "our full backup", "unit": "s",
                     "ratio": t_full / t_inc, "goal": 20.0})
        raw = os.path.join(work, "d.raw")
        first = vault.points("d")[0]["id"]
        t_restore, _ = timed(lambda: vault.restore_to_file(first, raw, "raw"))
        env = dict(os.environ, RESTIC_PASSWORD=PASS, RESTIC_REPOSITORY=os.path.join(work, "restic"))
        subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
        t_restic, _ = timed(lambda: subprocess.run(["restic", "backup", "-q", raw], env=env, check=True,
                                                   capture_output=True))
        # The same bytes: the whole disk (restic reads the raw file, zeros included;
        # the vault reads what the disk holds). Time for the same job, both encrypting.
        rows.append({"test": f"back up the same {a.size_gib} GiB disk, encrypted", "ours": t_full,
                     "peer": t_restic, "peer_name": "restic backup (raw file)", "unit": "s",
                     "ratio": t_restic / t_full, "goal": 1.0})
        t_rr, _ = timed(lambda: subprocess.run(["restic", "restore", "-q", "latest", "--target",
                                                os.path.join(work, "rr")], env=env, check=True, capture_output=True))
        rows.append({"test": "restore throughput", "ours": (size / MIB) / t_restore, "peer": (size / MIB) / t_rr,
                     "peer_name": "restic restore", "unit": "MiB/s", "ratio": t_rr / t_restore, "goal": None})
        img = os.path.join(work, "base.vhd")
        with vhd.create(img, GIB, type="fixed") as base:
            for off in range(0, GIB // 2, 4 * MIB):
                base.write(off, os.urandom(4 * MIB))
        disks.create_image("base", path=img)
        v10 = Vault.create(os.path.join(work, "v10"))
        for i in range(10):
            disks.create_from_image(f"vm{i}", "base")
            with disks.open_virtual(f"vm{i}", writable=True) as v:
                v.write(900 * MIB, os.urandom(MIB))
            v10.backup(disks, f"vm{i}", show_progress=False)
        stored = du(os.path.join(work, "v10", "chunks"))
        copies = 10 * (GIB // 2 + MIB)
        rows.append({"test": "ten disks from one image: stored vs ten copies", "ours": stored / MIB,
                     "peer": copies / MIB, "peer_name": "ten full copies", "unit": "MiB", "ratio": copies / stored,
                     "goal": None})
        rows += scattered_rows(disks, vault)
        rows.append(concurrent_row(work, disks))
        vault.close()
        v10.close()
        st.close()
        del inc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    show(rows, a.json)
    return 0


def scattered_rows(disks: Disks, vault: Vault) -> list[dict]:
    size = 256 * MIB
    disks.create_empty("s", 0, "Premium_LRS", size_bytes=size)
    with disks.open_virtual("s", writable=True) as v:
        for off in range(0, size, 4 * MIB):
            v.write(off, os.urandom(4 * MIB))
    vault.backup(disks, "s", show_progress=False)
    pages = random.Random(11).sample(range(size // 4096), size // 4096 // 100)
    with disks.open_virtual("s", writable=True) as v:
        for page in pages:
            v.write(page * 4096, os.urandom(4096))
    r = vault.backup(disks, "s", show_progress=False)
    return [{"test": f"1% of 256 MiB in scattered 4 KiB pages: {what}", "ours": got / MIB, "peer": size / MIB,
             "peer_name": "the whole disk", "unit": "MiB", "ratio": size / max(got, 1), "goal": 10.0}
            for what, got in (("read", r.bytes_read), ("stored", r.new_bytes_stored))]


def concurrent_row(work: str, disks: Disks) -> dict:
    """c1's backup alone, then with c2's backup (another process) and a gc beside it."""
    for name in ("c1", "c2", "c1b"):
        disks.create_from_image(name, "base")
        with disks.open_virtual(name, writable=True) as v:
            v.write(700 * MIB, os.urandom(64 * MIB))
    alone = Vault.create(os.path.join(work, "alone"), PASS)
    t_alone, _ = timed(lambda: alone.backup(disks, "c1", show_progress=False))
    alone.close()
    folder = os.path.join(work, "shared")
    shared = Vault.create(folder, PASS)
    env = dict(os.environ, DISKSTAMP_VAULT_PASSPHRASE=PASS)
    cli = [sys.executable, "-m", "stamp", "--stamp", disks.stamp.path, "backup", "--vault", folder]
    root = os.path.join(os.path.dirname(__file__), "..")
    other = subprocess.Popen([*cli, "create", "c2"], env=env, cwd=root, stdout=subprocess.DEVNULL)
    gc = subprocess.Popen([*cli, "gc", "--retry-lock", "600"], env=env, cwd=root, stdout=subprocess.DEVNULL)
    t_busy, _ = timed(lambda: shared.backup(disks, "c1b", show_progress=False))
    if other.wait(timeout=600) or gc.wait(timeout=600):
        raise SystemExit("bench_vault: the other backup or the gc failed")
    problems = shared.check()
    shared.close()
    if problems:
        raise SystemExit(f"bench_vault: the shared vault has problems: {problems}")
    return {"test": "backup beside another backup and a gc", "ours": t_busy, "peer": t_alone,
            "peer_name": "the same backup alone", "unit": "s", "ratio": t_alone / t_busy, "goal": None}


if __name__ == "__main__":
    sys.exit(main())
