"""Direct upload and download of managed disks through `stamp serve`, with
the real SDK: a VHD made by `vhd create` uploaded by Put Page to the SAS URL
`stamp disk grant-access` prints, revoked (checked), read back, downloaded
with a Read grant and compared by qemu-img; snapshot grants diffed with
get_page_range_diff_for_managed_disk in guest offsets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from email.utils import formatdate
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobClient

import vhd
from stamp import Stamp
from stamp.disks import Disks

from ...conftest import run

MIB = 1 << 20
CHUNK = 4 * MIB


def stamp_cli(server, *args: str) -> str:
    got = subprocess.run([sys.executable, "-m", "stamp", "--stamp", server.stamp, *args], capture_output=True,
                         text=True)
    assert got.returncode == 0, got.stderr
    return got.stdout


def grant(server, kind: str, name: str, access: str = "Read") -> str:
    extra = ["--access", access] if kind == "disk" else []
    return stamp_cli(server, kind, "grant-access", name, *extra, "--duration", "600", "--endpoint",
                     server.endpoint).strip()


def test_upload_by_sas_then_download_equals_the_vhd(server, tmp_path):
    src = tmp_path / "src.vhd"
    with vhd.create(src, 48 * MIB, type="fixed") as img:
        img.write(0, b"MBR!" * 128)
        img.write(9 * MIB + 512, b"\x5a" * (3 * MIB))  # crosses a 4 MiB chunk; chunk 3 stays zero
        img.write(47 * MIB, b"end" * 1000)
    raw = src.read_bytes()
    made = json.loads(stamp_cli(server, "disk", "create", "up", "--upload-size-bytes", str(len(raw))))
    assert made["state"] == "ReadyToUpload"
    url = grant(server, "disk", "up", "Write")
    blob = BlobClient.from_blob_url(url)
    assert blob.get_blob_properties().size == len(raw)
    for off in range(0, len(raw), CHUNK):
        piece = raw[off:off + CHUNK]
        if piece.strip(b"\0"):
            blob.upload_page(piece, offset=off, length=len(piece))
    ranges = list(blob.list_page_ranges())
    assert ranges and ranges[-1].end == len(raw) - 1  # the footer page is there
    for refused in (blob.create_snapshot, lambda: blob.delete_blob(), lambda: blob.resize_blob(len(raw) + 512)):
        with pytest.raises(HttpResponseError) as e:
            refused()
        assert e.value.status_code == 403 and e.value.error_code == "AuthorizationPermissionMismatch"
    with pytest.raises(HttpResponseError) as e:
        blob.upload_page(b"x" * 512, offset=len(raw), length=512)
    assert e.value.status_code == 416
    tampered = url.replace("sig=", "sig=AA")
    with pytest.raises(ClientAuthenticationError):
        BlobClient.from_blob_url(tampered).get_blob_properties()
    done = json.loads(stamp_cli(server, "disk", "revoke-access", "up"))
    assert done["state"] == "Unattached"
    with pytest.raises(ResourceNotFoundError):  # the grant, and its SAS, are gone
        blob.get_blob_properties()
    with Stamp.open(server.stamp) as st, Disks(st).open_virtual("up") as disk:  # what a VM attaching it reads
        assert disk.read(9 * MIB + 512, 3 * MIB) == b"\x5a" * (3 * MIB)
        assert disk.read(47 * MIB, 3000) == b"end" * 1000
    down = BlobClient.from_blob_url(grant(server, "disk", "up"))
    with pytest.raises(HttpResponseError) as e:
        down.upload_page(b"x" * 512, offset=0, length=512)
    assert e.value.error_code == "AuthorizationPermissionMismatch"
    with open(tmp_path / "down.vhd", "wb") as f:
        down.download_blob().readinto(f)
    run("qemu-img", "compare", "-q", "-f", "vpc", "-F", "vpc", str(src), str(tmp_path / "down.vhd"))
    assert (tmp_path / "down.vhd").read_bytes()[:-512] == raw[:-512]
    stamp_cli(server, "disk", "revoke-access", "up")


def test_a_bad_upload_is_refused_and_the_sas_still_works(server, tmp_path):
    size = 20 * MIB + 512
    stamp_cli(server, "disk", "create", "bad", "--upload-size-bytes", str(size))
    blob = BlobClient.from_blob_url(grant(server, "disk", "bad", "Write"))
    blob.upload_page(b"\1" * CHUNK, offset=0, length=CHUNK)
    got = subprocess.run([sys.executable, "-m", "stamp", "--stamp", server.stamp, "disk", "revoke-access", "bad"],
                         capture_output=True, text=True)
    assert got.returncode == 1 and "InvalidVhd: The specified cookie value in VHD footer" in got.stderr
    src = tmp_path / "fix.vhd"
    with vhd.create(src, 20 * MIB, type="fixed"):
        pass
    blob.upload_page(src.read_bytes()[-512:], offset=size - 512, length=512)  # the SAS still works
    assert json.loads(stamp_cli(server, "disk", "revoke-access", "bad"))["state"] == "Unattached"


@pytest.mark.parametrize("from_image", [False, True])
def test_managed_disk_diff_between_snapshot_grants_is_in_guest_offsets(server, tmp_path, from_image):
    name = f"dd{int(from_image)}"
    with Stamp.open(server.stamp) as st:
        disks = Disks(st)
        if from_image:
            base = tmp_path / "base.vhd"
            with vhd.create(base, 32 * MIB, type="fixed") as img:
                img.write(0, b"base" * 1024)
            disks.create_image(f"img{name}", path=str(base))
            disks.create_from_image(name, f"img{name}")
        else:
            disks.create_empty(name, 1)
        with disks.open_virtual(name, writable=True) as v:
            v.write(4 * MIB, b"a" * 8192)
        disks.create_snapshot(f"{name}-s1", name)
        with disks.open_virtual(name, writable=True) as v:
            v.write(4 * MIB + 4096, b"b" * 512)
            v.write(30 * MIB, b"c" * 65536)
        disks.create_snapshot(f"{name}-s2", name)
        want = disks.diff(f"{name}-s1", f"{name}-s2")
    assert want["written"] == [{"offset": 4 * MIB + 4096, "length": 512}, {"offset": 30 * MIB, "length": 65536}]
    s1, s2 = grant(server, "snapshot", f"{name}-s1"), grant(server, "snapshot", f"{name}-s2")
    page, clear = BlobClient.from_blob_url(s2).get_page_range_diff_for_managed_disk(s1)
    assert [(r["start"], r["end"] - r["start"] + 1) for r in page] == [(r["offset"], r["length"])
                                                                        for r in want["written"]]
    assert clear == []
    data = BlobClient.from_blob_url(s2).download_blob(offset=30 * MIB, length=65536).readall()
    assert data == b"c" * 65536
    with pytest.raises(HttpResponseError) as e:  # a URL that is no grant
        BlobClient.from_blob_url(s2).get_page_range_diff_for_managed_disk(s1.replace("/md-", "/md-x"))
    assert e.value.error_code == "PreviousSnapshotNotFound"
    for snap in (f"{name}-s1", f"{name}-s2"):
        stamp_cli(server, "snapshot", "revoke-access", snap)


def test_a_grant_s_container_answers_its_sas_only(server):
    stamp_cli(server, "disk", "create", "only", "--size-gib", "1")
    url = grant(server, "disk", "only")
    container = url.split("/")[4]
    svc = server.service()  # Shared Key
    with pytest.raises(HttpResponseError) as e:
        svc.get_blob_client(container, "abcd").get_blob_properties()
    assert e.value.status_code == 403
    with pytest.raises(HttpResponseError) as e:
        BlobClient.from_blob_url(url.replace("/abcd?", "/other?")).get_blob_properties()
    assert e.value.status_code == 404
    with pytest.raises(HttpResponseError) as e:  # a container operation
        list(svc.get_container_client(container).list_blobs())
    assert e.value.status_code == 403
    with pytest.raises(ResourceNotFoundError):
        BlobClient.from_blob_url(url.replace("/md-", "/md-z")).get_blob_properties()
    assert BlobClient.from_blob_url(url).get_blob_properties().size == (1 << 30) + 512
    stamp_cli(server, "disk", "revoke-access", "only")


def test_a_put_page_let_in_before_the_revoke_cannot_land_after_its_check(server, tmp_path):
    # The endpoint checked the grant once, when the request's headers came: a client that sent the headers of
    # a Put Page at the footer, waited for revoke-access to check the footer and make the disk Unattached, then
    # sent the body, changed the footer of a disk now in use (201 Created), behind the check.
    src = tmp_path / "late.vhd"
    with vhd.create(src, 20 * MIB, type="fixed"):
        pass
    raw = src.read_bytes()
    stamp_cli(server, "disk", "create", "late", "--upload-size-bytes", str(len(raw)))
    url = grant(server, "disk", "late", "Write")
    BlobClient.from_blob_url(url).upload_page(raw[-512:], offset=len(raw) - 512, length=512)
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
        s.sendall(f"PUT {parts.path}?{parts.query}&comp=page HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                  f"x-ms-version: 2021-08-06\r\nx-ms-date: {formatdate(usegmt=True)}\r\n"
                  f"x-ms-page-write: update\r\nx-ms-range: bytes={len(raw) - 512}-{len(raw) - 1}\r\n"
                  "Content-Length: 512\r\n\r\n".encode())
        s.sendall(b"\xee" * 100)  # the server has read the headers and let the request in: its body is coming
        assert json.loads(stamp_cli(server, "disk", "revoke-access", "late"))["state"] == "Unattached"
        s.sendall(b"\xee" * 412)
        assert s.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 404 Not Found"
    with Stamp.open(server.stamp) as st:
        disks = Disks(st)
        blob = disks.record("late")["blob"]
        assert st.blobs.read(blob, len(raw) - 512, 512) == raw[-512:]  # what the revoke checked


def test_a_grant_past_its_duration_ends_and_the_disk_is_unattached_again(server):
    """As the platform: a grant ends by itself when its duration is over. The
    endpoint meeting its URL then ends it (no timer), and the disk is
    Unattached again, ready for an attach or a new grant."""
    import time

    stamp_cli(server, "disk", "create", "brief", "--size-gib", "1")
    url = stamp_cli(server, "disk", "grant-access", "brief", "--access", "Read", "--duration", "2", "--endpoint",
                    server.endpoint).strip()
    blob = BlobClient.from_blob_url(url)
    assert blob.get_blob_properties().size == (1 << 30) + 512
    time.sleep(3)
    with pytest.raises(ResourceNotFoundError):
        blob.get_blob_properties()
    with Stamp.open(server.stamp) as st, st.meta.read() as txn:  # ended by that request, not by this read
        record = st.meta.get_json(txn, "resources", b"disk/brief")
    assert record["state"] == "Unattached" and "access" not in record
    assert json.loads(stamp_cli(server, "disk", "grant-access", "brief", "--access", "Read", "--duration", "60",
                                "--json"))["grant"]["access"] == "Read"
