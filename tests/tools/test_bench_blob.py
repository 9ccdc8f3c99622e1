"""tools/bench_blob.py's own parts: the reference endpoint that stores
nothing (tools/blob_null.py) answers the SDK's upload and download with the
right bytes, and the minimal hand-signed Put Page client is accepted by
`stamp serve` (its Shared Key signature verifies) and its writes land."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stamp import Stamp
from tests.stamp.rest.conftest import start_server, stop_server

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import bench_blob  # noqa: E402


def test_the_reference_endpoint_takes_an_upload_and_gives_the_file_back(tmp_path: Path):
    vhd_path = tmp_path / "disk.vhd"
    want = bench_blob.make_vhd(vhd_path, 24 << 20, seed=3)
    with bench_blob.null_server(tmp_path, vhd_path) as ep:
        svc = bench_blob.service(ep.url)
        svc.create_container("bench")
        rate, name = bench_blob.bench_upload(svc, "bench", vhd_path)
        assert rate > 0
        ranges, cleared = svc.get_blob_client("bench", name).get_page_ranges()
        assert not cleared and ranges[0]["start"] == 0  # chunk 0 holds data, chunk 1 zeros: not one range
        assert len(ranges) > 1
        # the download skips the zero chunks the page list leaves out, and its sha256 is checked
        assert bench_blob.bench_download(svc, "bench", name, vhd_path.stat().st_size, want, tmp_path) > 0
        assert bench_blob.cpu_seconds(ep.pid) > 0


def test_the_minimal_client_is_signed_as_the_stamp_checks_and_its_writes_land(tmp_path: Path):
    path = str(tmp_path / "st")
    Stamp.create(path).close()
    srv = start_server(path)
    try:
        ep = bench_blob.Endpoint("stamp", srv.endpoint, srv.proc.pid)
        svc = bench_blob.service(ep.url)
        svc.create_container("bench")
        rate, cpu = bench_blob.bench_put_page_raw(svc, ep, "bench", clients=2, seconds=0.5)
        assert rate > 0 and cpu == cpu  # a rate, and the server's CPU per Put Page (not NaN)
        ranges, _ = svc.get_blob_client("bench", "pages").get_page_ranges()
        assert ranges and all((r["end"] + 1 - r["start"]) % 4096 == 0 for r in ranges)
    finally:
        err = stop_server(srv)
    assert "Traceback" not in err, err
