#!/usr/bin/env python3
"""The diskstamp demo: what `bash tools/run.sh demo` runs.

Creates, writes, inspects, chains, converts and verifies VHD images, then
runs a storage stamp (an image, disks made from it, snapshots and their
diff, a lost node and its repair, an export) and a host over it (a VM
booted through the host cache and throttle, a ReadWrite data disk, IOPS by
tier). Tools we did not write (qemu-img, libvhdi) confirm the results. Each step
prints what it did; any disagreement stops the demo with exit status 1.

  .venv/bin/python tools/demo.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import vhd  # noqa: E402
from hostcache import HostError  # noqa: E402
from hostcache.bootsector import build as build_bootable  # noqa: E402
from stamp import StampError  # noqa: E402

MIB = 1 << 20


class DemoFailed(Exception):
    pass


def step(text: str) -> None:
    print(f"\n== {text}")


def say(text: str) -> None:
    print(f"   {text}")


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoFailed(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise DemoFailed(what)
    say(f"ok: {what}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run(work: str) -> None:
    base, child, flat = (os.path.join(work, n) for n in ("base.vhd", "child.vhd", "flat-fixed.vhd"))

    step("create a 64 MiB dynamic VHD and write a boot record and some data")
    with vhd.create(base, 64 * MIB) as img:
        img.write(0, b"\xeb\x3c\x90diskstmp" + bytes(499) + b"\x55\xaa")
        img.write(8 * MIB, os.urandom(3 * MIB))
        img.write(40 * MIB + 100, b"unaligned writes work too")
        img.flush()
        say(f"allocated blocks: {img.allocated_blocks()} of {len(img.bat)} (2 MiB each)")
        base_bytes = img.read(0, img.size)
    info = json.loads(sh("qemu-img", "info", "-f", "vpc", "--output=json", base))
    expect(info["virtual-size"] == 64 * MIB, f"qemu-img reports the exact size: {info['virtual-size']} bytes")
    out = sh("vhdiinfo", base)
    expect("(67108864 bytes)" in out and "Dynamic" in out, "vhdiinfo reads it as a 64 MiB dynamic disk")
    qmap = json.loads(sh("qemu-img", "map", "-f", "vpc", "--output=json", base))
    with vhd.open(base) as img:
        ours = [(e.offset, e.length) for e in img.allocation(0, img.size) if e.state is vhd.Alloc.DATA]
    qdata = sorted((e["start"], e["length"]) for e in qmap if e["data"])
    expect(_merge(qdata) == ours, f"qemu-img map agrees with our allocation map: {ours}")

    step("create a differencing child and write into it; the parent stays untouched")
    with vhd.create(child, parent=base) as c:
        c.write(8 * MIB, b"C" * 8192)
        c.write(20 * MIB, b"D" * MIB)
        child_bytes = c.read(0, c.size)
    with vhd.open(base) as img:
        expect(sha(img.read(0, img.size)) == sha(base_bytes), "parent unchanged")
    report = vhd.check(child)
    expect(report.ok, f"vhd check of the chain: {len(report.problems)} problems")
    import pyvhdi

    f, p = pyvhdi.file(), pyvhdi.file()
    f.open(child)
    p.open(base)
    f.set_parent(p)
    theirs = f.read_buffer_at_offset(f.get_media_size(), 0)
    f.close()
    p.close()
    expect(theirs == child_bytes, f"libvhdi reads the chain byte for byte (sha256 {sha(theirs)})")

    step("flatten the chain into a fixed VHD, the format a managed disk's page blob holds")
    t = time.perf_counter()
    vhd.convert(child, flat, "fixed", show_progress=False)
    say(f"converted in {time.perf_counter() - t:.2f} s")
    report = vhd.check(flat, azure=True)
    expect(report.ok, "passes the Azure upload rules (fixed, 1 MiB multiple, 20 MiB to 32 TiB)")
    raw = os.path.join(work, "reference.raw")
    with open(raw, "wb") as fh:
        fh.write(child_bytes)
    rc = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", raw, flat]).returncode
    expect(rc == 0, "qemu-img compare: the fixed VHD equals the chain's bytes")

    step("the dynamic base is not uploadable as it is; check says how to fix it")
    for prob in vhd.check(base, azure=True).problems:
        say(str(prob))

    step("merge the child into its parent, then grow and compact the parent")
    moved = vhd.merge(child, show_progress=False)["merged_bytes"]
    say(f"merged {moved} bytes")
    with vhd.open(base) as img:
        expect(sha(img.read(0, img.size)) == sha(child_bytes), "the parent now holds the child's view")
    vhd.resize(base, 128 * MIB)
    with vhd.open(base, writable=True) as img:
        img.discard(8 * MIB, 4 * MIB)
    result = vhd.compact(base, show_progress=False)
    say(f"compact: {result['size_before']} -> {result['size_after']} bytes on disk")
    info = json.loads(sh("qemu-img", "info", "-f", "vpc", "--output=json", base))
    expect(info["virtual-size"] == 128 * MIB and vhd.check(base).ok, "qemu-img sees 128 MiB; check passes")


def run_stamp(work: str) -> None:
    from stamp import Stamp
    from stamp.disks import Disks

    base = os.path.join(work, "image.vhd")
    build_bootable(base, 64 * MIB, sectors=120)  # our boot sector (with a partition entry), then data
    with vhd.open(base, writable=True) as img:
        img.write(16 * MIB, os.urandom(4 * MIB))

    step("a storage stamp in a folder: 6 extent nodes in 3 fault domains, metadata in LMDB")
    st = Stamp.create(os.path.join(work, "stamp"), extent_size=16 * MIB)
    disks = Disks(st)
    image = disks.create_image("base", path=base)
    say(f"image 'base' imported: {image['size_bytes']} bytes in page blob {image['blob']}")

    step("two VMs' OS disks from the image: differencing VHDs over the image's blob")
    for name in ("vm1-os", "vm2-os"):
        disks.create_from_image(name, "base", sku="Premium_LRS")
    with disks.open_virtual("vm1-os", writable=True) as v:
        v.write(30 * MIB, b"vm1 was here".ljust(4096, b"\0"))
    with disks.open_virtual("vm2-os") as v:
        expect(v.read(510, 2) == b"\x55\xaa" and v.read(30 * MIB, 3) == bytes(3),
               "vm2 sees the image, not vm1's write")
    say(f"vm1-os stores {disks.disk('vm1-os')['used_bytes']} bytes of its own; the image is stored once")

    step("an incremental snapshot, more writes, and the exact diff")
    disks.create_snapshot("vm1-s1", "vm1-os")
    with disks.open_virtual("vm1-os", writable=True) as v:
        v.write(40 * MIB, os.urandom(64 * 1024))
    s2 = disks.create_snapshot("vm1-s2", "vm1-os")
    s1 = disks.snapshot("vm1-s1")
    d = st.blobs.diff(s1["blob"], s1["blob_snapshot"], s2["blob_snapshot"])
    say(f"vm1-s2 changed {s2['changed_bytes']} bytes of the disk's page blob since vm1-s1; "
        f"diff: {len(d.written)} written ranges, {len(d.cleared)} cleared")
    total = sum(n for _, n in d.written)
    expect(64 * 1024 <= total <= 64 * 1024 + 3 * 512 and not d.cleared,
           f"the diff is the 64 KiB written plus the VHD metadata it touched ({total - 64 * 1024} bytes: "
           "bitmap, BAT entry, moved footer)")

    step("lose an extent node, read on, re-replicate")
    st.inject("node-lost", "node-01")
    with disks.open_virtual("vm1-os") as v:
        expect(v.read(30 * MIB, 12) == b"vm1 was here", "reads go on from the two good replicas")
    made = st.stream.rereplicate()
    st.inject("node-replaced", "node-01")
    report = st.check(deep=True)
    expect(report.ok, f"re-made {len(made)} replica(s) on healthy nodes; check passes over "
                      f"{report.stats['records']} records")

    step("export vm1-os to a local VHD and let qemu-img compare it")
    out = os.path.join(work, "vm1-os.vhd")
    disks.export("vm1-os", out, "dynamic")
    ref = os.path.join(work, "vm1-os.raw")
    with disks.open_virtual("vm1-os") as v, open(ref, "wb") as fh:
        fh.write(v.read(0, v.size))
    rc = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vpc", ref, out]).returncode
    expect(rc == 0, "qemu-img compare: the exported VHD equals the disk")
    for name, sku, gib in (("hdd", "Standard_LRS", 128), ("p10", "Premium_LRS", 128), ("p30", "Premium_LRS", 1024)):
        disks.create_empty(f"bench-{name}", gib, sku)
    disks.create_empty("data1", 32, "Premium_LRS")
    st.close()
    run_host(work)


def run_host(work: str) -> None:
    from hostcache.host import Host
    from stamp.disks import Disks

    step("a host over the stamp: a VM from the image, booted through the host cache and the throttle")
    host = Host.create(os.path.join(work, "host"), os.path.join(work, "stamp"), cache_bytes=64 * MIB)
    host.create_vm("vm1", "D8s_v3", "base", os_caching="ReadOnly")
    first, second = host.boot("vm1"), host.boot("vm1")
    say(f"boot: {first['reads']} reads of the {first['partition']['kind']} disk ({first['tier']}, "
        f"{first['caching']}) in {first['seconds']:.3f} s; again, from the host cache: {second['seconds']:.3f} s")
    expect(second["seconds"] < first["seconds"], "the second boot is served by the host cache")
    if shutil.which("qemu-system-x86_64"):
        real = host.boot("vm1", real=True, interface="ide")
        say("qemu-system-x86_64 booted vm1 over NBD; its serial console said:")
        for line in real["console"].strip().splitlines():
            say(f"  | {line}")
        expect(real["verified"], f"the guest read {real['disk_reads']} times and printed the CRC-32 recorded "
                                 f"when the image was built ({real['checksum']})")
    else:
        say("qemu-system-x86_64 is not installed: the real boot is skipped (bash tools/run.sh test installs it)")

    step("a data disk attached with ReadWrite caching: writes are acknowledged from the host cache")
    host.attach("vm1", "data1", 0, "ReadWrite")
    disk = host.open_disk("vm1", 0)
    disk.write(0, b"written through the host cache".ljust(4096, b"\0"))
    say(f"unflushed in the host cache: {host.cache.dirty()}")
    host.detach("vm1", 0)
    with Disks(host.stamp).open_virtual("data1") as v:
        expect(v.read(0, 7) == b"written", "detach flushed it to the stamp")

    step("back the data disk up into an encrypted vault, change it, back up again, restore the first point")
    from stamp.vault import Vault

    host.attach("vm1", "data1", 0, "ReadWrite")
    vault = Vault.create(os.path.join(work, "vault"), passphrase="demo passphrase")
    first = host.backup("vm1", 0, vault)
    say(f"full backup: read {first['bytes_read']} bytes, stored {first['new_bytes_stored']} "
        f"(compression {first['compression_ratio']}x)")
    disk = host.open_disk("vm1", 0)
    disk.write(8 * MIB, b"changed after the first backup".ljust(4096, b"\0"))
    second = host.backup("vm1", 0, vault)
    say(f"incremental backup: read {second['bytes_read']} bytes, {second['chunks_written']} new chunk, "
        f"{second['chunks_reused']} reused")
    first_point = vault.points("data1")[0]["id"]
    restored = os.path.join(work, "restored.vhd")
    vault.restore_to_file(first_point, restored, "dynamic")
    with vhd.open(restored) as img:
        expect(img.read(0, 7) == b"written" and img.read(8 * MIB, 7) == bytes(7),
               "the first recovery point restores as it was, before the change")
    expect(vault.verify()["ok"] and vault.check() == [], "vault verify and check pass")
    vault.close()
    host.detach("vm1", 0)

    step("IOPS by tier: 4 KiB random reads at queue depth 16, one second each, real time")
    say(f"{'tier':<6} {'measured':>10} {'published':>10}")
    for lun, (name, label) in enumerate((("hdd", "S10"), ("p10", "P10"), ("p30", "P30"))):
        host.attach("vm1", f"bench-{name}", lun, "None")
        disk = host.open_disk("vm1", lun)
        limits = host.throttle("vm1").disks[str(lun)].limits
        published = limits.burst_iops if limits.burst.value == "credit" else limits.iops
        iops = measure(disk, 1.0, 16)
        say(f"{label:<6} {iops:>10.0f} {published:>10}")
        expect(abs(iops / published - 1) < 0.05, f"{label} within 5% of its published limit")
    host.close()


def measure(disk, seconds: float, qd: int) -> float:
    import random
    import threading
    import time

    begin = time.monotonic() + 0.3
    stop = begin + seconds
    counts = [0] * qd

    def worker(i: int) -> None:
        rng = random.Random(i)
        while (now := time.monotonic()) < stop:
            disk.read(rng.randrange(4096) * 4096, 4096)
            if now >= begin:
                counts[i] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(qd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def _merge(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, n in pieces:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="folder for the images (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the images afterwards")
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="diskstamp-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        run(work)
        run_stamp(work)
    except (DemoFailed, vhd.VhdError, StampError, HostError) as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ndemo complete{f': images kept in {work}' if a.keep else ''}")
    print("also: vhd serve / vhd mount (NBD and FUSE), tools/bench_*.py and tools/fio_tiers.py (measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
