"""A VHD made by `vhd create` goes up through the SDK's asyncio client
(azure.storage.blob.aio, over aiohttp), is snapshotted, changed, diffed and
downloaded; qemu-img (an outside oracle) compares the download with the
local file that had the same changes."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys

from azure.storage.blob.aio import BlobServiceClient

from tests.conftest import run

MIB = 1 << 20


def test_vhd_upload_snapshot_diff_download_with_aio_sdk(server, tmp_path):
    local = tmp_path / "disk.vhd"
    vhd_cli = [sys.executable, "-m", "vhd"]
    subprocess.run([*vhd_cli, "create", str(local), "--size", "24M", "--type", "fixed"], check=True)
    for off, pattern, n in (("1M", "0xab", "3M"), ("13M", "0x5c", "64K")):
        subprocess.run([*vhd_cli, "write", str(local), "--offset", off, "--pattern", pattern, "--length", n],
                       check=True, capture_output=True)
    size = os.path.getsize(local)
    data_size = size - 512  # the footer stays as vhd wrote it
    rnd = random.Random(7)
    changes: list[tuple[int, int, bytes | None]] = []
    for _ in range(40):
        off = rnd.randrange(0, (data_size - 32 * 1024) // 512) * 512
        n = rnd.randrange(1, 64) * 512
        changes.append((off, n, None if rnd.random() < 0.3 else rnd.randbytes(n)))

    async def flow() -> tuple[list[tuple[int, int]], list[tuple[int, int]], bytes, str]:
        async with BlobServiceClient.from_connection_string(server.connection_string) as svc:
            cc = await svc.create_container("vhd-aio")
            blob = cc.get_blob_client("disk.vhd")
            with open(local, "rb") as f:
                await blob.upload_blob(f, length=size, blob_type="PageBlob", max_concurrency=4)
            snap = (await blob.create_snapshot())["snapshot"]
            for off, n, data in changes:
                if data is None:
                    await blob.clear_page(offset=off, length=n)
                else:
                    await blob.upload_page(data, offset=off, length=n)
            written: list[tuple[int, int]] = []
            cleared: list[tuple[int, int]] = []
            async for r in blob.list_page_ranges(previous_snapshot=snap, results_per_page=7):
                (cleared if r.cleared else written).append((r.start, r.end + 1))
            downloaded = await (await blob.download_blob()).readall()
            at_snap = cc.get_blob_client("disk.vhd", snapshot=snap)
            snap_data = await (await at_snap.download_blob()).readall()
            assert snap_data == local.read_bytes()  # the snapshot is the upload, byte for byte
            return written, cleared, downloaded, snap

    written, cleared, downloaded, _ = asyncio.run(flow())
    with open(local, "r+b") as f:  # the same changes, locally
        for off, n, data in changes:
            f.seek(off)
            f.write(bytes(n) if data is None else data)
    out = tmp_path / "down.vhd"
    out.write_bytes(downloaded)
    run("qemu-img", "compare", "-f", "vpc", "-F", "vpc", str(local), str(out))
    # the diff is the change log, exactly: every changed page, split by what it holds now
    touched = sorted((off, off + n) for off, n, _ in changes)
    merged: list[tuple[int, int]] = []
    for s, e in touched:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    got = sorted(written + cleared)
    coalesced: list[tuple[int, int]] = []
    for s, e in got:
        if coalesced and s <= coalesced[-1][1]:
            coalesced[-1] = (coalesced[-1][0], max(coalesced[-1][1], e))
        else:
            coalesced.append((s, e))
    assert coalesced == merged
    now = out.read_bytes()
    for s, e in cleared:
        assert now[s:e] == bytes(e - s)
    last = {}
    for off, n, data in changes:
        for p in range(off, off + n, 512):
            last[p] = data is not None
    for s, e in written:
        assert all(last[p] for p in range(s, e, 512))
    for s, e in cleared:
        assert not any(last[p] for p in range(s, e, 512))


def test_readme_example_runs(server, tmp_path, monkeypatch):
    """The README's "Speak Blob REST" Python example, as written, against the server."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "README.md")).read()
    section = readme[readme.index("## Speak Blob REST"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "vhd", "create", "disk.vhd", "--size", "64M", "--type", "fixed"],
                   check=True, capture_output=True)
    env: dict = {}
    exec(code.replace('"UseDevelopmentStorage=true"', repr(server.connection_string)), env)
    assert env["blob"].get_page_ranges(previous_snapshot_diff=env["snap"]) == ([{"start": 0, "end": 511}], [])
    local = (tmp_path / "disk.vhd").read_bytes()
    assert env["data"] == b"x" * 512 + local[512:]


def test_aio_client_drives_the_other_operations(server):
    from azure.core.exceptions import HttpResponseError, ResourceModifiedError

    async def flow() -> None:
        async with BlobServiceClient.from_connection_string(server.connection_string) as svc:
            cc = await svc.create_container("aio-ops", metadata={"a": "1"})
            assert (await cc.get_container_properties()).metadata == {"a": "1"}
            b = cc.get_blob_client("b")
            await b.create_page_blob(MIB, sequence_number=3)
            etag = (await b.get_blob_properties()).etag
            await b.upload_page(b"1" * 512, offset=0, length=512)
            try:
                await b.upload_page(b"2" * 512, offset=0, length=512, if_match=etag)
                raise AssertionError("a stale If-Match passed")
            except ResourceModifiedError:
                pass
            lease = await b.acquire_lease()
            await b.set_blob_metadata({"k": "v"}, lease=lease)
            await b.resize_blob(2 * MIB, lease=lease)
            await b.set_sequence_number("increment", lease=lease)
            props = await b.get_blob_properties()
            assert (props.size, props.metadata, props.page_blob_sequence_number) == (2 * MIB, {"k": "v"}, 4)
            await lease.release()
            snap = (await b.create_snapshot())["snapshot"]
            await b.clear_page(offset=0, length=512)
            ranges, cleared = await b.get_page_ranges(previous_snapshot_diff=snap)
            assert (ranges, cleared) == ([], [{"start": 0, "end": 511}])
            c = cc.get_blob_client("c")
            await c.start_copy_from_url(f"{b.url}?snapshot={snap}")
            assert (await (await c.download_blob(offset=0, length=512)).readall()) == b"1" * 512
            names = [(x.name, x.snapshot is not None) async for x in cc.list_blobs(include=["snapshots"])]
            assert names == [("b", True), ("b", False), ("c", False)]
            try:
                await b.delete_blob()
                raise AssertionError("deleted a blob with snapshots")
            except HttpResponseError as e:
                assert e.error_code == "SnapshotsPresent"
            await b.delete_blob(delete_snapshots="include")
            await cc.delete_container()

    asyncio.run(flow())
