"""Blob REST endpoints measured through the real SDK (azure-storage-blob): the
stamp's (`stamp serve`) against Azurite, in one run.

    .venv/bin/python tools/bench_blob.py                 # Azurite and stamp serve, started in temp folders
    .venv/bin/python tools/bench_blob.py --size 256M --seconds 5 --json
    .venv/bin/python tools/bench_blob.py --endpoint mine=http://127.0.0.1:10000/devstoreaccount1

Each endpoint gets, with the development account's key:
- upload: a fixed VHD of --size (default 1 GiB) whose 4 MiB chunks are half
  random data, half zeros, with upload_blob(blob_type="PageBlob") from a file
  (the SDK skips the zero chunks, as AzCopy does), MiB/s of the VHD's size;
- put-page: 4 KiB Put Page at random offsets from 16 processes (--clients),
  one client each, for --seconds; operations per second;
- put-page, minimal client: the same from --clients connections of one
  process that writes each request by hand (Shared Key signed, about 0.1 ms
  of CPU a request where the SDK spends 2 to 3 ms): what the server itself
  sustains when the clients cost little;
- download: the uploaded blob with download_blob().readinto() into a file,
  MiB/s, and the bytes compared with the file uploaded (sha256);
- diff: random 4 KiB-to-64 KiB writes and clears on a 64 MiB blob between
  three snapshots, then get_page_range_diff (prevsnapshot) and plain
  get_page_ranges compared page by page with a model (each page keeps the
  epoch of its last write or clear; a page changed since the base snapshot is
  a PageRange if it holds data now, a ClearRange if not). Every disagreement
  is counted and the first few are printed: "where Azurite is wrong".

Beside them runs a reference endpoint that stores nothing (tools/blob_null.py:
every request answered at once, Get Blob from the uploaded file), driven the
same way in the same rounds: its rates are what the SDK clients alone reach
on this machine, the ceiling for any server here (the clients and the servers
share the same cores). For the servers the tool starts, it also reports each
server process's CPU time per operation (from /proc: per 4 KiB Put Page, and
per MiB uploaded or downloaded) and the client processes' CPU per Put Page,
which do not depend on the machine's load the way the rates do.

Azurite is the npm package installed by tools/run.sh (.venv/azurite), run with
--skipApiVersionCheck (the SDK's x-ms-version is newer than its allow-list)
and --inMemoryPersistence off, in a temporary folder. The stamp's server is
started with `python -m stamp --stamp DIR serve --port N` when that command
exists. The machine is shared: the endpoints take turns, round after round, and
figures are medians of --repeat rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtable import show  # noqa: E402

from vhd.ops import parse_size  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MIB = 1 << 20
PAGE = 512
CHUNK = 4 * MIB
DIFF_SIZE = 64 * MIB
GOALS = {"upload": 10.0, "put-page": 10.0, "download": None, "put-page-raw": None}
NULL = "ceiling"  # the reference endpoint that stores nothing


@dataclass
class Endpoint:
    name: str
    url: str  # path style: http://127.0.0.1:PORT/devstoreaccount1
    pid: int | None = None  # the server process, when this tool started it (for its CPU time)


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) a process has used so far; NaN if unknown."""
    if pid is None:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service(url: str):
    from azure.storage.blob import BlobServiceClient

    conn = f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={url};"
    return BlobServiceClient.from_connection_string(conn)


# --- servers -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    """Until the endpoint answers HTTP at all (any status: a 403 is an answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_blob: {what} exited with {proc.returncode} before it listened")
        try:
            urllib.request.urlopen(url + "?comp=list", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"bench_blob: {what} did not listen within {timeout:.0f} s")


@contextmanager
def process(cmd: list[str], url: str, what: str, log: Path) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_listening(url, proc, what)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def azurite(folder: Path) -> Iterator[Endpoint]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/{ACCOUNT}"
    cmd = [str(AZURITE), "--location", str(folder), "--blobHost", "127.0.0.1", "--blobPort", str(port),
           "--skipApiVersionCheck", "--silent"]
    with process(cmd, url, "azurite-blob", folder.parent / "azurite.log") as pid:
        yield Endpoint("azurite", url, pid)


def stamp_serve_exists() -> bool:
    got = subprocess.run([sys.executable, "-m", "stamp", "serve", "--help"], capture_output=True, cwd=ROOT)
    return got.returncode == 0


@contextmanager
def stamp_serve(folder: Path, durability: str = "os") -> Iterator[Endpoint]:
    subprocess.run([sys.executable, "-m", "stamp", "init", str(folder), "--durability", durability], check=True,
                   capture_output=True, cwd=ROOT)
    port = free_port()
    url = f"http://127.0.0.1:{port}/{ACCOUNT}"
    cmd = [sys.executable, "-m", "stamp", "--stamp", str(folder), "serve", "--port", str(port)]
    with process(cmd, url, "stamp serve", folder.parent / "stamp-serve.log") as pid:
        yield Endpoint("stamp", url, pid)


@contextmanager
def null_server(folder: Path, vhd_path: Path) -> Iterator[Endpoint]:
    """The reference endpoint that stores nothing (tools/blob_null.py)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/{ACCOUNT}"
    cmd = [sys.executable, str(ROOT / "tools" / "blob_null.py"), "--port", str(port), "--file", str(vhd_path)]
    with process(cmd, url, "blob_null.py", folder / "null.log") as pid:
        yield Endpoint(NULL, url, pid)


# --- the measurements ------------------------------------------------------------------------------------------

def make_vhd(path: Path, size: int, seed: int) -> str:
    """A fixed VHD of `size` bytes of disk whose 4 MiB chunks alternate data
    and zeros (half zeros); returns its sha256."""
    import vhd

    rnd = random.Random(seed)
    with vhd.create(str(path), size, type="fixed") as img:
        for i, off in enumerate(range(0, size, CHUNK)):
            if i % 2 == 0:
                img.write(off, rnd.randbytes(min(CHUNK, size - off)))
        img.flush()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def bench_upload(svc, container: str, path: Path) -> tuple[float, str]:
    blob = svc.get_blob_client(container, "disk.vhd")
    size = path.stat().st_size
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        blob.upload_blob(f, length=size, blob_type="PageBlob", overwrite=True, max_concurrency=4)
    return size / MIB / (time.perf_counter() - t0), "disk.vhd"


def bench_download(svc, container: str, name: str, size: int, want: str, folder: Path) -> float:
    out = folder / "download.vhd"
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        svc.get_blob_client(container, name).download_blob(max_concurrency=4).readinto(f)
    rate = size / MIB / (time.perf_counter() - t0)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    out.unlink()
    if h.hexdigest() != want:
        raise SystemExit("bench_blob: the downloaded blob differs from the file uploaded")
    return rate


def _put_pages(url: str, container: str, seed: int, start: float, seconds: float, size: int
               ) -> tuple[int, float]:
    """One client process: 4 KiB Put Pages at random offsets from `start` for
    `seconds`; (how many, the CPU seconds this process spent on them)."""
    client = service(url).get_blob_client(container, "pages")
    rnd, data, done = random.Random(seed), os.urandom(4096), 0
    time.sleep(max(0.0, start - time.time()))
    stop = start + seconds
    cpu = time.process_time()
    while time.time() < stop:
        client.upload_page(data, offset=rnd.randrange(size // 4096) * 4096, length=4096)
        done += 1
    return done, time.process_time() - cpu


def bench_put_page(svc, ep: Endpoint, container: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """Put Pages per second from `clients` processes (threads would share one
    interpreter lock and measure the client, not the server), with the
    server's and the clients' CPU milliseconds per Put Page."""
    size = 256 * MIB
    svc.get_blob_client(container, "pages").create_page_blob(size)
    start = time.time() + 3.0  # every process is up and connected by then
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_put_pages, ep.url, container, i, start, seconds, size) for i in range(clients)]
        time.sleep(max(0.0, start - time.time()))
        cpu = cpu_seconds(ep.pid)
        got = [f.result() for f in futures]
        cpu = cpu_seconds(ep.pid) - cpu
    done = sum(n for n, _ in got)
    return done / seconds, 1000 * cpu / max(done, 1), 1000 * sum(c for _, c in got) / max(done, 1)


def _signed_put_page(url: str, container: str, blob: str, offset: int, data: bytes) -> bytes:
    """One Put Page request, Shared Key signed, as bytes on the wire."""
    path = f"/{ACCOUNT}/{container}/{blob}"
    xms = [("x-ms-date", email.utils.formatdate(usegmt=True)), ("x-ms-page-write", "update"),
           ("x-ms-range", f"bytes={offset}-{offset + len(data) - 1}"), ("x-ms-version", "2025-01-05")]
    text = f"PUT\n\n\n{len(data)}\n" + "\n" * 8 + "".join(f"{k}:{v}\n" for k, v in xms) + \
        f"/{ACCOUNT}{path}\ncomp:page"
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), text.encode(), hashlib.sha256).digest()).decode()
    head = f"PUT {path}?comp=page HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nContent-Length: {len(data)}\r\n" \
        f"Authorization: SharedKey {ACCOUNT}:{sig}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in xms) + "\r\n"
    return head.encode() + data


async def _raw_client(url: str, container: str, seed: int, stop: float, size: int) -> int:
    """One keep-alive connection sending Put Pages one after the other until `stop`."""
    host, port = url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    rnd, data, done = random.Random(seed), os.urandom(4096), 0
    try:
        while time.time() < stop:
            writer.write(_signed_put_page(url, container, "pages", rnd.randrange(size // 4096) * 4096, data))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 201"):
                raise SystemExit(f"bench_blob: a hand-written Put Page was answered {head[:200]!r}")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            done += 1
    finally:
        writer.close()
    return done


def bench_put_page_raw(svc, ep: Endpoint, container: str, clients: int, seconds: float) -> tuple[float, float]:
    """Put Pages per second from `clients` connections of the minimal client, and the server's CPU ms per Put Page."""
    size = 256 * MIB
    svc.get_blob_client(container, "pages").create_page_blob(size)

    async def run() -> int:
        stop = time.time() + seconds
        return sum(await asyncio.gather(*(_raw_client(ep.url, container, i, stop, size) for i in range(clients))))

    cpu = cpu_seconds(ep.pid)
    t0 = time.perf_counter()
    done = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    return done / elapsed, 1000 * (cpu_seconds(ep.pid) - cpu) / max(done, 1)


class PageModel:
    """Each 512-byte page: does it hold data, and the epoch of its last write
    or clear (epochs move on at each snapshot)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size // PAGE)
        self.epoch = [0] * (size // PAGE)
        self.now = 1

    def apply(self, offset: int, length: int, write: bool) -> None:
        for p in range(offset // PAGE, (offset + length) // PAGE):
            self.data[p], self.epoch[p] = int(write), self.now

    def diff(self, since: int) -> tuple[set[int], set[int]]:
        changed = [p for p, e in enumerate(self.epoch) if e > since]
        return {p for p in changed if self.data[p]}, {p for p in changed if not self.data[p]}

    def ranges(self) -> set[int]:
        return {p for p, d in enumerate(self.data) if d}


def pages(ranges: list[dict[str, int]]) -> set[int]:
    return {p for r in ranges for p in range(r["start"] // PAGE, (r["end"] + 1) // PAGE)}


def bench_diff(svc, container: str, seed: int, ops: int = 300) -> dict:
    blob = svc.get_blob_client(container, "diff")
    blob.create_page_blob(DIFF_SIZE)
    model, rnd, snaps = PageModel(DIFF_SIZE), random.Random(seed), []
    for _ in range(3):
        for _ in range(ops):
            length = rnd.choice((4096, 8192, 65536))
            offset = rnd.randrange((DIFF_SIZE - length) // 4096) * 4096
            if rnd.random() < 0.7:
                blob.upload_page(rnd.randbytes(length), offset=offset, length=length)
                model.apply(offset, length, True)
            else:
                blob.clear_page(offset=offset, length=length)
                model.apply(offset, length, False)
        snaps.append((blob.create_snapshot()["snapshot"], model.now))
        model.now += 1
    wrong: list[str] = []
    checks = 0
    for snap, epoch in snaps[:2]:
        got_written, got_cleared = blob.get_page_ranges(previous_snapshot_diff=snap)
        want_written, want_cleared = model.diff(epoch)
        for what, got, want in (("PageRange", pages(got_written), want_written),
                                ("ClearRange", pages(got_cleared), want_cleared)):
            checks += 1
            if got != want:
                wrong.append(f"diff since snapshot {snaps.index((snap, epoch)) + 1}: {what}s "
                             f"{len(got)} pages, the model {len(want)}; {len(got - want)} extra, "
                             f"{len(want - got)} missing")
    got_plain, got_clear = blob.get_page_ranges()
    checks += 1
    if pages(got_plain) != model.ranges() or got_clear:
        wrong.append(f"page list: {len(pages(got_plain))} pages, the model {len(model.ranges())}")
    return {"checks": checks, "wrong": len(wrong), "problems": wrong}


def measure_once(ep: Endpoint, vhd_path: Path, want: str, a: argparse.Namespace, folder: Path,
                 runs: dict[str, list[float]]) -> None:
    """One round of the three rates on one endpoint, in a container of its own."""
    svc = service(ep.url)
    container = f"bench{random.randrange(10 ** 8)}"
    svc.create_container(container)
    size_mib = vhd_path.stat().st_size / MIB
    cpu = cpu_seconds(ep.pid)
    up, name = bench_upload(svc, container, vhd_path)
    runs.setdefault("upload", []).append(up)
    cpu, was = cpu_seconds(ep.pid), cpu
    runs.setdefault("server-cpu-upload", []).append(1000 * (cpu - was) / size_mib)
    runs.setdefault("download", []).append(bench_download(svc, container, name, vhd_path.stat().st_size, want,
                                                          folder))
    runs.setdefault("server-cpu-download", []).append(1000 * (cpu_seconds(ep.pid) - cpu) / size_mib)
    rate, server, client = bench_put_page(svc, ep, container, a.clients, a.seconds)
    runs.setdefault("put-page", []).append(rate)
    runs.setdefault("server-cpu-put-page", []).append(server)
    runs.setdefault("client-cpu-put-page", []).append(client)
    rate, server = bench_put_page_raw(svc, ep, container, a.clients, a.seconds)
    runs.setdefault("put-page-raw", []).append(rate)
    runs.setdefault("server-cpu-put-page-raw", []).append(server)
    svc.delete_container(container)


def measure(endpoints: list[Endpoint], vhd_path: Path, want: str, a: argparse.Namespace,
            folder: Path) -> dict[str, dict[str, Any]]:
    """The endpoints take turns, round after round (the machine's load drifts:
    each round puts both under the same load); medians of the rounds."""
    runs: dict[str, dict[str, list[float]]] = {ep.name: {} for ep in endpoints}
    for i in range(a.repeat):
        for ep in endpoints:
            print(f"bench_blob: round {i + 1} of {a.repeat}: {ep.name} at {ep.url}", file=sys.stderr)
            measure_once(ep, vhd_path, want, a, folder, runs[ep.name])
    results: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        results[ep.name] = {**{k: statistics.median(v) for k, v in runs[ep.name].items()}, "runs": runs[ep.name]}
        if ep.name == NULL:
            continue  # it stores nothing: no diff to check
        svc = service(ep.url)
        container = f"diff{random.randrange(10 ** 8)}"
        svc.create_container(container)
        results[ep.name]["diff"] = bench_diff(svc, container, a.seed)
        svc.delete_container(container)
    return results


def table(results: dict[str, dict], a: argparse.Namespace) -> list[dict]:
    """Ours against Azurite, then each against the ceiling (the server that stores nothing)."""
    rows = []
    for test, unit in (("upload", "MiB/s"), ("put-page", "IOPS"), ("download", "MiB/s"), ("put-page-raw", "IOPS")):
        label = {"upload": f"upload {a.size >> 20} MiB VHD (half zeros)",
                 "put-page": f"4 KiB Put Page, {a.clients} clients", "download": f"download {a.size >> 20} MiB",
                 "put-page-raw": f"4 KiB Put Page, {a.clients} minimal clients"}[test]
        for ours, peer, what in (("stamp", "azurite", ""), (NULL, "azurite", ": ceiling"), ("stamp", NULL, "")):
            if what == "" and peer == NULL and ours in results and NULL in results:
                what = ": of the ceiling"
            o, p = results.get(ours, {}).get(test), results.get(peer, {}).get(test)
            if (ours, peer) != ("stamp", "azurite") and (o is None or p is None):
                continue
            o, p = float("nan") if o is None else o, float("nan") if p is None else p
            goal = GOALS[test] if (ours, peer) == ("stamp", "azurite") and o == o and p == p else None
            rows.append({"test": label + what, "ours": o, "peer": p, "unit": unit, "ratio": o / p,
                         "peer_name": "azurite 3.37" if peer == "azurite" else "ceiling (stores nothing)",
                         "goal": goal})
    return rows


def cpu_lines(results: dict[str, dict]) -> list[str]:
    """Per endpoint the tool started: its server's CPU per operation and the clients' per Put Page."""
    out = []
    for name, r in results.items():
        if r.get("server-cpu-put-page", float("nan")) != r.get("server-cpu-put-page"):
            continue
        out.append(f"CPU, {name}: server {r['server-cpu-put-page']:.2f} ms per Put Page, "
                   f"{r['server-cpu-upload']:.1f} ms per MiB uploaded, {r['server-cpu-download']:.1f} ms per MiB "
                   f"downloaded; clients {r['client-cpu-put-page']:.2f} ms per Put Page; server "
                   f"{r['server-cpu-put-page-raw']:.2f} ms per Put Page of the minimal clients")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=1 << 30, help="the VHD's disk size (default 1G)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="of Put Page per run")
    p.add_argument("--repeat", type=int, default=1, help="runs per endpoint; medians are reported")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                   help="an endpoint already running (NAME stamp or azurite replaces the one this would start)")
    p.add_argument("--no-azurite", action="store_true")
    p.add_argument("--no-stamp", action="store_true")
    p.add_argument("--no-ceiling", action="store_true", help="skip the reference endpoint that stores nothing")
    p.add_argument("--durability", choices=("os", "fsync"), default="os",
                   help="of the stamp this starts (stamp init --durability: fsync syncs every write before its answer)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.size % MIB or a.size < 20 * MIB:
        p.error("--size is a multiple of 1 MiB, at least 20M")
    given = dict(e.split("=", 1) for e in a.endpoint)
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-blob-")))
        endpoints = [Endpoint(n, u) for n, u in given.items()]
        if "azurite" not in given and not a.no_azurite:
            if not AZURITE.exists():
                print("bench_blob: Azurite is not installed (bash tools/run.sh installs it): skipped",
                      file=sys.stderr)
            else:
                (folder / "azurite").mkdir()
                endpoints.append(stack.enter_context(azurite(folder / "azurite")))
        if "stamp" not in given and not a.no_stamp:
            if stamp_serve_exists():
                endpoints.append(stack.enter_context(stamp_serve(folder / "stamp", a.durability)))
            else:
                print("bench_blob: this checkout has no `stamp serve`: the stamp is not measured", file=sys.stderr)
        vhd_path = folder / "disk.vhd"
        want = make_vhd(vhd_path, a.size, a.seed)
        if not a.no_ceiling:
            endpoints.append(stack.enter_context(null_server(folder, vhd_path)))
        results = measure(endpoints, vhd_path, want, a, folder)
        shutil.rmtree(folder / "azurite", ignore_errors=True)
    rows = table(results, a)
    if a.json:
        print(json.dumps({"rows": rows, "endpoints": results}, indent=2, default=str))
        return 0
    show(rows)
    for line in cpu_lines(results):
        print(line)
    for name, r in results.items():
        if "diff" not in r:
            continue
        d = r["diff"]
        print(f"diff correctness, {name}: {d['checks'] - d['wrong']} of {d['checks']} checks agree with the model")
        for problem in d["problems"][:6]:
            print(f"  {name} is wrong: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
