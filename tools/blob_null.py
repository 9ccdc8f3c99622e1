"""A reference Blob endpoint that stores nothing: the ceiling the clients allow.

    python tools/blob_null.py --port N --file PATH

tools/bench_blob.py starts it beside the real servers and drives it with the
same SDK calls in the same rounds, so its rates are what the client
processes alone reach on this machine: no server can answer faster than one
that does no work. Rules:
- every request is answered at once with the status and headers the SDK
  needs (ETag, Last-Modified, sequence number, request id); bodies are read
  in full and dropped (no auth, no storage, no checks);
- Get Blob answers ranges of --file (the VHD the benchmark uploaded), read
  with os.pread, so the download's bytes are right and the benchmark's
  sha256 check holds: the least work a download can cost is reading the
  bytes once;
- Get Page Ranges (which the SDK's download asks first, to skip empty
  chunks) answers the file's non-zero 64 KiB blocks, merged, found once;
- a blob's size is the file's; HEAD answers the same headers without a body.
Not a Blob service: nothing else is meant to talk to it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

from aiohttp import web

BLOCK = 64 * 1024
RANGE = re.compile(r"bytes=(\d+)-(\d*)")
COMMON = {"ETag": '"0x8DC0000000000"', "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT",
          "x-ms-version": "2026-10-06", "Server": "blob-null"}


class Null:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.ids = itertools.count()
        self._page_list: bytes | None = None

    def page_list(self) -> bytes:
        """The XML of the file's non-zero blocks (merged), computed once."""
        if self._page_list is None:
            ranges: list[list[int]] = []
            zero = bytes(BLOCK)
            for off in range(0, self.size, BLOCK):
                if os.pread(self.fd, BLOCK, off) != zero[:min(BLOCK, self.size - off)]:
                    if ranges and ranges[-1][1] == off:
                        ranges[-1][1] = off + BLOCK
                    else:
                        ranges.append([off, off + BLOCK])
            body = "".join(f"<PageRange><Start>{s}</Start><End>{min(e, self.size) - 1}</End></PageRange>"
                           for s, e in ranges)
            self._page_list = f'<?xml version="1.0" encoding="utf-8"?><PageList>{body}</PageList>'.encode()
        return self._page_list

    def headers(self, request: web.Request) -> dict[str, str]:
        return {**COMMON, "x-ms-request-id": f"null-{next(self.ids)}",
                "x-ms-client-request-id": request.headers.get("x-ms-client-request-id", "")}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = self.headers(request)
        if request.method == "PUT":
            await request.read()
            headers.update({"x-ms-blob-sequence-number": "0", "x-ms-request-server-encrypted": "true"})
            return web.Response(status=201, headers=headers)
        if request.method == "DELETE":
            return web.Response(status=202, headers=headers)
        if request.method == "GET" and request.query.get("comp") == "pagelist":
            headers["x-ms-blob-content-length"] = str(self.size)
            return web.Response(status=200, headers=headers, body=self.page_list(), content_type="application/xml")
        if request.method in ("GET", "HEAD") and "comp" not in request.query and "restype" not in request.query:
            return self.get_blob(request, headers)
        return web.Response(status=200, headers=headers)

    def get_blob(self, request: web.Request, headers: dict[str, str]) -> web.Response:
        headers.update({"x-ms-blob-type": "PageBlob", "Accept-Ranges": "bytes"})
        got = RANGE.fullmatch(request.headers.get("x-ms-range") or request.headers.get("Range") or "")
        start, end = 0, self.size - 1
        status = 200
        if got:
            start, end = int(got[1]), min(int(got[2]) if got[2] else self.size - 1, self.size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{self.size}"
            status = 206
        if request.method == "HEAD":
            headers["Content-Length"] = str(self.size)
            return web.Response(status=200, headers=headers)
        return web.Response(status=status, headers=headers, body=os.pread(self.fd, end + 1 - start, start),
                            content_type="application/octet-stream")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--file", required=True, help="what Get Blob answers (the VHD the benchmark uploads)")
    a = p.parse_args(argv)
    app = web.Application(client_max_size=5 * 1024 * 1024)
    app.router.add_route("*", r"/{tail:[\s\S]*}", Null(a.file).handle)
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
