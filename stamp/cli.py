"""The `stamp` command (also `python -m stamp`).

Every command works on one stamp folder: --stamp DIR, or $DISKSTAMP_STAMP,
or ./stamp. Output is JSON (scripts read it); errors are one line on stderr.
Exit codes: 0 ok, 1 a problem (a failed check, a refused request), 2 usage.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from vhd.cli import standard_streams
from vhd.errors import VhdError
from vhd.ops import parse_size

from . import access as ac
from .disks import SKUS, Disks
from .errors import StampError
from .gc import collect, finish_dying
from .stamp import DURABILITY, Stamp

EPILOG = """examples:
  stamp init ./st                                   6 extent nodes in 3 fault domains
  export DISKSTAMP_STAMP=./st
  stamp image create ubuntu --file base.vhd         a fixed VHD that passes the upload rules
  stamp disk create os1 --from-image ubuntu         a differencing disk over the image
  stamp disk create data1 --size-gib 128 --sku Premium_LRS
  stamp disk create u1 --size-gib 64 --sku UltraSSD_LRS --disk-iops-read-write 20000 --disk-mbps-read-write 800
  stamp disk update data1 --tier P30                 a 128 GiB Premium disk performing as P30
  stamp disk create copy1 --import local.vhd --convert
  stamp snapshot create s1 --disk os1               incremental (--full for a full copy)
  stamp snapshot diff s1                            ranges changed since s1 (JSON)
  stamp disk export os1 os1.vhd --format dynamic
  stamp disk create up1 --upload-size-bytes 1073742336   a direct upload: then grant-access --access Write
  stamp disk grant-access up1 --access Write --duration 3600
  stamp fault node-down node-02 && stamp check && stamp fault node-up node-02
  stamp repair                                      re-replicate and scrub"""


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stamp", description="A storage stamp in a folder: replicated "
                                  "extents, page blobs, managed disks, images, snapshots and backups.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--stamp", default=os.environ.get("DISKSTAMP_STAMP", "stamp"),
                     help="the stamp folder (default: $DISKSTAMP_STAMP or ./stamp)")
    sub = top.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a stamp folder")
    p.add_argument("path", nargs="?", help="folder (default: --stamp)")
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--fault-domains", type=int, default=3)
    p.add_argument("--durability", choices=DURABILITY, default="os",
                   help="os: survives process crashes (default); fsync: also power loss, slower")
    p.add_argument("--extent-size", type=parse_size, default=256 << 20, help="seal extents at this size")

    disk = sub.add_parser("disk", help="managed disks").add_subparsers(dest="action", required=True)
    p = disk.add_parser("create", help="create a disk (empty, from an image, imported or copied)",
                        description="Create a managed disk. Its performance: " + PERFORMANCE_HELP,
                        epilog=CREATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--sku", default="Premium_LRS", choices=sorted(SKUS))
    p.add_argument("--size-gib", type=int, help="size of an empty disk, or to grow an image's size")
    _performance_options(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-image", metavar="IMAGE")
    src.add_argument("--import", dest="import_file", metavar="FILE", help="a local VHD (fixed, 1 MiB multiple)")
    src.add_argument("--copy-of", metavar="DISK")
    src.add_argument("--from-snapshot", metavar="SNAPSHOT")
    src.add_argument("--upload-size-bytes", type=int, metavar="N",
                     help="a disk waiting for a direct upload of a fixed VHD file of N bytes (its virtual size, "
                     "a multiple of 1 MiB, plus the 512-byte footer): then grant-access --access Write")
    p.add_argument("--convert", action="store_true", help="with --import: accept any VHD or raw image")
    p = disk.add_parser("update", help="change a disk's provisioned IOPS and MB/s, its performance tier, or "
                        "grow it", description="Change a disk's performance, attached or not: a host serving it "
                        "throttles by the new figures within 50 ms, without a re-attach. " + PERFORMANCE_HELP +
                        " --size-gib grows a disk that holds a fixed VHD while it is not attached to a running VM "
                        "(a larger size can raise its tier and IOPS range; for Ultra and Premium SSD v2 it counts "
                        "as a change).",
                        epilog=UPDATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    _performance_options(p)
    p.add_argument("--size-gib", type=int, help="grow the disk to this many GiB (never shrinks)")
    p = disk.add_parser("list", help="list disks (JSON, with each disk's performance figures and tier)")
    p.add_argument("--json", action="store_true", help="the output is JSON already; accepted for scripts")
    p = disk.add_parser("show", help="show a disk (JSON, with its performance figures and tier)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the output is JSON already; accepted for scripts")
    disk.add_parser("delete", help="delete a disk").add_argument("name")
    p = disk.add_parser("check", help="check the disk's VHD; --repair what is safe to repair")
    p.add_argument("name")
    p.add_argument("--repair", action="store_true", help="rewrite damaged footer and header copies "
                   "from the good ones (the disk must not be attached)")
    p = disk.add_parser("grant-access", help="a SAS URL for a direct upload (Write) or download (Read)",
                        description=GRANT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _grant_options(p, ("Read", "Write"))
    p = disk.add_parser("revoke-access", help="end a grant: its SAS stops working; an upload is checked "
                        "(a fixed VHD of the declared size) and the disk becomes Unattached")
    p.add_argument("name")
    p = disk.add_parser("export", help="write a disk (or a snapshot) to a local VHD")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--format", choices=["fixed", "dynamic"], default="fixed")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    image = sub.add_parser("image", help="images").add_subparsers(dest="action", required=True)
    p = image.add_parser("create", help="an image from a VHD file or a disk")
    p.add_argument("name")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--file")
    g.add_argument("--disk")
    p.add_argument("--convert", action="store_true")
    image.add_parser("list")
    for name in ("show", "delete"):
        image.add_parser(name).add_argument("name")

    snap = sub.add_parser("snapshot", help="disk snapshots").add_subparsers(dest="action", required=True)
    p = snap.add_parser("create", help="snapshot a disk (incremental unless --full)")
    p.add_argument("name")
    p.add_argument("--disk", required=True)
    p.add_argument("--full", action="store_true")
    snap.add_parser("list")
    for name in ("show", "delete"):
        snap.add_parser(name).add_argument("name")
    p = snap.add_parser("diff", help="disk byte ranges written and cleared between incremental snapshots")
    p.add_argument("base")
    p.add_argument("target", nargs="?", help="a later snapshot of the same disk (default: the disk now)")
    p.add_argument("--blob", action="store_true",
                   help="the page blob's ranges instead (for a disk from an image: offsets in its VHD file)")
    p = snap.add_parser("grant-access", help="a SAS URL to download the snapshot (Read)",
                        description=GRANT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _grant_options(p, ("Read",))
    snap.add_parser("revoke-access", help="end a grant: its SAS stops working").add_argument("name")
    p = snap.add_parser("export", help="write a snapshot to a local VHD")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--format", choices=["fixed", "dynamic"], default="fixed")

    vault = sub.add_parser("backup", help="the backup vault: incremental, deduplicated recovery points",
                           description="Recovery points of managed disks in a vault folder (--vault, or "
                           "$DISKSTAMP_VAULT). An encrypted vault's passphrase is read from "
                           "$DISKSTAMP_VAULT_PASSPHRASE, never from the command line. Only create, restore to a "
                           "disk and repair need the stamp.")
    vault.add_argument("--vault", default=os.environ.get("DISKSTAMP_VAULT", "vault"))
    vsub = vault.add_subparsers(dest="action", required=True)
    p = vsub.add_parser("init", help="create a vault, encrypted with $DISKSTAMP_VAULT_PASSPHRASE")
    p.add_argument("--no-encryption", action="store_true", help="make an unencrypted vault (no passphrase)")
    p = vsub.add_parser("create", help="back a disk up (incremental after the first)")
    p.add_argument("disk")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p = vsub.add_parser("list", help="recovery points")
    p.add_argument("--disk")
    p = vsub.add_parser("restore", help="restore a recovery point to a new disk, over a disk, or to a file")
    p.add_argument("point")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-disk", metavar="NAME")
    g.add_argument("--over-disk", metavar="NAME", help="an existing unattached disk, replaced once the restore "
                   "has succeeded")
    g.add_argument("--to-file", metavar="PATH")
    p.add_argument("--format", choices=["fixed", "dynamic", "raw"], help="with --to-file (default fixed)")
    vsub.add_parser("verify", help="re-read every chunk; name the points a bad chunk affects, and record it")
    vsub.add_parser("repair", help="verify, then rewrite bad chunks from the disks that still hold their data")
    p = vsub.add_parser("prune", help="drop recovery points the policy does not keep (a rule is required)")
    for rule in ("last", "daily", "weekly", "monthly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    p.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for running backups to finish")
    p = vsub.add_parser("gc", help="delete chunks no recovery point names (waits for no backup: it locks)")
    p.add_argument("--retry-lock", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for running backups to finish")
    vsub.add_parser("check", help="manifests, index and chunks agree; leftovers of interrupted runs")
    vsub.add_parser("rebuild-index", help="make the index again from the manifests")
    vsub.add_parser("unlock", help="remove stale locks (their process is gone, or they are 30 minutes old)")

    sub.add_parser("nodes", help="extent nodes and their health")
    p = sub.add_parser("fault", help="inject a fault", description="node-down / node-up NODE; node-lost "
                       "NODE (its files are deleted); node-replaced NODE; slow NODE --ms N; full NODE "
                       "[--off]; bitflip --extent ID [NODE] [--offset N]")
    p.add_argument("fault", choices=["node-down", "node-up", "node-lost", "node-replaced", "slow", "full",
                                     "bitflip"])
    p.add_argument("node", nargs="?")
    p.add_argument("--ms", type=_delay, default=50)
    p.add_argument("--off", action="store_true")
    p.add_argument("--extent", type=_number)
    p.add_argument("--offset", type=_number)
    p.set_defaults(intermixed=p)  # `bitflip --extent 1 node-00`, the order the help shows, parses too
    sub.add_parser("scrub", help="verify every record on every replica; heal bad copies")
    p = sub.add_parser("gc", help="reclaim space: delete dead extents, compact partly dead ones",
                       description="One round of space reclamation; with --watch, rounds run until "
                       "interrupted (SIGINT or SIGTERM), each when the stamp's extents hold more than "
                       "--trigger x the bytes its index references, compacting the emptiest extents "
                       "down to --target x. Readers, in this process or any other, go on meanwhile; "
                       "so do writers, unless they outrun it past --ceiling (then they wait for its "
                       "rounds, in small steps). `hostcache serve` runs the same reclaimer as a "
                       "companion process (stamp.reclaim.Companion).",
                       epilog="examples:\n  stamp gc                             one round\n"
                       "  stamp gc --watch &                   a companion of a long benchmark\n"
                       "  stamp gc --watch --target 1.3 --min-free-mib 2048",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compact-below", type=_share, default=0.5,
                   help="compact sealed extents whose live share is below this (default 0.5)")
    p.add_argument("--watch", action="store_true",
                   help="keep reclaiming; print one JSON line per round that freed or moved bytes")
    p.add_argument("--target", type=_ratio, default=1.5,
                   help="with --watch: compact down to this x the live bytes (default 1.5)")
    p.add_argument("--trigger", type=_ratio, default=None,
                   help="with --watch: a round is due above this x the live bytes (default: target + 0.1)")
    p.add_argument("--interval", type=_seconds, default=0.25,
                   help="with --watch: seconds between rounds, at least (default 0.25)")
    p.add_argument("--max-move-mib", type=_positive, default=256,
                   help="with --watch: MiB copied per round, at most (default 256)")
    p.add_argument("--min-free-mib", type=_positive, default=0,
                   help="with --watch: below this free on the file system, compact every partly dead "
                   "extent under --compact-below (default 0: off)")
    p.add_argument("--until-eof", action="store_true",
                   help="with --watch: also stop when standard input closes (a companion process: its "
                   "parent's end closes the pipe, however that parent ends)")
    p.add_argument("--ceiling", type=_ratio, default=None,
                   help="with --watch: writers (any process) wait while the extents hold more than this x "
                   "the live bytes plus two extents, as long as the rounds make progress (default: 2, or "
                   "the trigger, or 1 / --compact-below, whichever is largest)")
    sub.add_parser("repair", help="re-replicate extents that lost a replica, then scrub")
    p = sub.add_parser("check", help="walk everything: placement, index vs extents, checksums")
    p.add_argument("--quick", action="store_true", help="skip reading every record")
    p = sub.add_parser("serve", help="serve the stamp over the Azure Blob REST protocol (page blobs)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SERVE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=10000, help="TCP port (default 10000, Azurite's; 0: any free one)")
    p.add_argument("--account", action="append", default=[], metavar="NAME:BASE64KEY",
                   help="another account and its key (repeatable); a key given here is visible to every user in "
                        "ps and /proc/PID/cmdline: prefer STAMP/accounts.json (keep it 0600), which is also read")
    p.add_argument("--cert", help="TLS certificate (PEM); with --key, serve https")
    p.add_argument("--key", help="TLS private key (PEM)")
    p.add_argument("--max-inflight-mib", type=int, default=64,
                   help="request and response data held at once, all clients together (default 64)")
    p.add_argument("--max-requests", type=int, default=256,
                   help="requests served at once; more are answered 503 ServerBusy (default 256)")
    p.add_argument("--threads", type=int, default=8, help="stamp calls run at once (default 8)")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="drop a client that stalls this many seconds mid-body (default 30)")
    return top


def _float(text: str, low: float, high: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def _share(text: str) -> float:
    return _float(text, 0.01, 1.0, "a share from 0.01 to 1")


def _ratio(text: str) -> float:
    return _float(text, 1.01, 100.0, "a ratio from 1.01 to 100")


def _seconds(text: str) -> float:
    return _float(text, 0.0, 3600.0, "a number of seconds from 0 to 3600")


def _positive(text: str) -> int:
    value = int(_float(text, 0, 2 ** 40, "a number from 0 to 2**40"))
    return value


PERFORMANCE_HELP = """UltraSSD_LRS and PremiumV2_LRS disks take provisioned IOPS and MB/s
(10^6 bytes/s), whole numbers: Ultra 100 to min(400,000, 1,000 per GiB) IOPS (4 to 65,536 GiB) and
1 to min(10,000, 0.25 per IOPS) MB/s, by default the size's maximum; Premium SSD v2 3,000 to
min(80,000, max(3,000, 500 per GiB)) IOPS and 125 to min(2,000, 0.25 per IOPS) MB/s, by default
3,000 and 125. Each can be changed 4 times in 24 hours (a Premium SSD v2 disk's creation counts as
one). A Premium_LRS disk takes a performance tier at or above the tier of its size (100 GiB: P10
and up); P60 to P80 only above 4,096 GiB, so smaller disks go up to P50; a downgrade at most once
every 12 hours. A value out of range is refused with the platform's code (BadRequest,
InvalidParameter, OperationNotAllowed) and the range that is allowed."""

CREATE_EXAMPLES = """examples:
  stamp disk create u1 --size-gib 64 --sku UltraSSD_LRS --disk-iops-read-write 20000 --disk-mbps-read-write 800
  stamp disk create v1 --size-gib 10 --sku PremiumV2_LRS --disk-iops-read-write 5000   (up to 1,250 MB/s)
  stamp disk create p1 --size-gib 128 --tier P40       a P10-sized disk performing as P40"""

UPDATE_EXAMPLES = """examples:
  stamp disk update u1 --disk-iops-read-write 64000 --disk-mbps-read-write 10000
  stamp disk update p1 --tier P10                      back to the baseline tier
  stamp disk update p1 --size-gib 200                  grow it: its baseline tier is then P15"""


def _performance_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-iops-read-write", dest="iops", type=int, metavar="N",
                   help="provisioned IOPS (UltraSSD_LRS, PremiumV2_LRS)")
    p.add_argument("--disk-mbps-read-write", dest="mbps", type=int, metavar="M",
                   help="provisioned MB/s, 10^6 bytes per second (UltraSSD_LRS, PremiumV2_LRS)")
    p.add_argument("--tier", metavar="TIER", help="performance tier (Premium_LRS: P1 to P80, at or above the "
                   "size's own)")


GRANT_HELP = """A SAS URL to the resource's page blob on the stamp's Blob endpoint (`stamp serve`), as
`az disk grant-access` gives: a container md-... of its own and the blob abcd, with a SAS that names a
stored access policy the stamp keeps, so revoke-access ends it at once. Write is for a disk made with
--upload-size-bytes (ReadyToUpload -> ActiveUpload); Read for an unattached disk (-> ActiveSAS) or a
snapshot. The SAS is signed with the key of the endpoint's account (the one in its path):
$DISKSTAMP_ACCOUNT_KEY (base64) if set, else that account's first key in STAMP/accounts.json (as `stamp
serve` reads it), else for devstoreaccount1 its published key; only that account's URL serves the grant.

example (a direct upload):
  vhd create disk.vhd --size 1G --type fixed
  stamp disk create up1 --upload-size-bytes $(stat -c %s disk.vhd)
  URL=$(stamp disk grant-access up1 --access Write --duration 3600)
  # write it with any Blob client, e.g. the Python SDK, 4 MiB at a time (all-zero chunks may be skipped):
  #   BlobClient.from_blob_url(URL).upload_page(chunk, offset=off, length=len(chunk))
  stamp disk revoke-access up1                 # checks the footer; the disk becomes Unattached"""


def _grant_options(p: argparse.ArgumentParser, access: tuple[str, ...]) -> None:
    p.add_argument("name")
    p.add_argument("--access", choices=access, default=None if len(access) > 1 else access[0],
                   required=len(access) > 1)
    p.add_argument("--duration", type=_duration, required=True, metavar="SECONDS",
                   help="how long the SAS works (durationInSeconds)")
    p.add_argument("--endpoint", default=ac.DEFAULT_ENDPOINT,
                   help=f"the Blob endpoint the URL names, path style (default {ac.DEFAULT_ENDPOINT})")
    p.add_argument("--json", action="store_true", help='print {"accessSAS": URL, "grant": {...}} instead of the URL')


def _duration(text: str) -> int:
    value = int(text)
    if not 0 < value <= ac.MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{text} is not a duration in seconds from 1 to {ac.MAX_DURATION}")
    return value


def _account_key(stamp_path: str, endpoint: str) -> bytes | None:
    """The key that signs a grant on `endpoint`'s account: $DISKSTAMP_ACCOUNT_KEY,
    else the account's first key in STAMP/accounts.json, else None (the
    development account's published key, for that account only)."""
    text = os.environ.get("DISKSTAMP_ACCOUNT_KEY")
    if not text:
        from .rest.server import load_accounts  # the file `stamp serve` reads, read the same way

        account = ac.account_of(endpoint)
        keys = load_accounts(stamp_path, []).keys.get(account)
        if account != ac.DEFAULT_ACCOUNT and not keys:
            raise UsageError(f"no key for account {account!r}: add it to {stamp_path}/accounts.json "
                             "({\"NAME\": \"BASE64KEY\"}) or set $DISKSTAMP_ACCOUNT_KEY")
        return keys[0] if keys else None
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise UsageError("$DISKSTAMP_ACCOUNT_KEY is not base64 (an account key as Azure gives it)") from None


def _grant(disks: Disks, kind: str, a: argparse.Namespace) -> None:
    key = _account_key(disks.stamp.path, a.endpoint)
    got = disks.grant_access(kind, a.name, a.access, a.duration, endpoint=a.endpoint, key=key)
    if a.json:
        _print(got)
    else:
        print(got["accessSAS"])


SERVE_HELP = """Serve the stamp's page blobs over the Blob REST protocol, path style:
http://HOST:PORT/ACCOUNT/CONTAINER/BLOB. The account devstoreaccount1 has its
published key, so the connection string UseDevelopmentStorage=true works as it is:

  stamp serve &
  python -c 'from azure.storage.blob import BlobServiceClient as S; \
    S.from_connection_string("UseDevelopmentStorage=true").create_container("vhds")'

Prints one JSON line when listening; SIGTERM or Ctrl-C stops it. Several
servers may share one stamp folder (each on its own port)."""


def _number(text: str) -> int:
    """An extent id or byte offset: 0 to 2**63 - 1."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text} is not a number from 0 to 2**63 - 1")
    return value


def _delay(text: str) -> float:
    """Milliseconds: finite and not negative."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a delay in milliseconds (0 or more)")
    return value


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(a: argparse.Namespace) -> int:
    if a.cmd == "init":
        with Stamp.create(a.path or a.stamp, nodes=a.nodes, fault_domains=a.fault_domains,
                          durability=a.durability, extent_size=a.extent_size) as st:
            _print({"stamp": st.path, **st.config})
        return 0
    if a.cmd == "backup":
        return backup_command(a)
    if a.cmd == "serve":
        from .rest import Limits, serve

        if a.max_inflight_mib < 8 or a.max_requests < 1 or a.threads < 1 or not 0 <= a.port <= 65535 \
                or not 0 < a.stall_timeout <= 3600:
            raise UsageError("--max-inflight-mib is at least 8; --max-requests and --threads at least 1; "
                             "--port 0 to 65535; --stall-timeout above 0, at most 3600")
        limits = Limits(a.max_inflight_mib << 20, a.max_requests, a.threads, a.stall_timeout)
        return serve(a.stamp, a.host, a.port, a.account, a.cert, a.key, limits)
    with Stamp.open(a.stamp) as st:
        return dispatch(st, Disks(st), a)


def dispatch(st: Stamp, disks: Disks, a: argparse.Namespace) -> int:
    cmd, action = a.cmd, getattr(a, "action", None)
    if cmd == "disk":
        if action == "create":
            perf = {"iops": a.iops, "mbps": a.mbps, "tier": a.tier}
            if a.from_image:
                _print(disks.create_from_image(a.name, a.from_image, a.size_gib, a.sku, **perf))
            elif a.import_file:
                _print(disks.import_vhd(a.name, a.import_file, a.sku, convert=a.convert, **perf))
            elif a.copy_of or a.from_snapshot:
                _print(disks.create_copy(a.name, a.copy_of, a.from_snapshot, a.sku, **perf))
            elif a.upload_size_bytes is not None:
                if a.size_gib:
                    raise UsageError("--upload-size-bytes gives the size: leave out --size-gib")
                _print(disks.create_for_upload(a.name, a.upload_size_bytes, a.sku, **perf))
            elif a.size_gib:
                _print(disks.create_empty(a.name, a.size_gib, a.sku, **perf))
            else:
                raise UsageError("say what the disk is made from: --size-gib, --from-image, --import, "
                                 "--copy-of, --from-snapshot or --upload-size-bytes")
        elif action == "update":
            _print(disks.update_disk(a.name, iops=a.iops, mbps=a.mbps, tier=a.tier, size_gib=a.size_gib))
        elif action == "grant-access":
            _grant(disks, "disk", a)
        elif action == "revoke-access":
            _print(disks.revoke_access("disk", a.name))
        elif action == "list":
            _print(disks.disks())
        elif action == "show":
            _print(disks.disk(a.name))
        elif action == "delete":
            disks.delete_disk(a.name)
            _print({"deleted": a.name})
        elif action == "export":
            _print(disks.export(a.name, a.path, a.format, show_progress=a.progress))
        elif action == "check":
            checked = disks.check_disk(a.name, repair=a.repair)
            _print(checked.to_json())
            return 0 if checked.ok else 1
    elif cmd == "image":
        if action == "create":
            _print(disks.create_image(a.name, path=a.file, disk=a.disk, convert=a.convert))
        elif action == "list":
            _print(disks.images())
        elif action == "show":
            _print(disks.image(a.name))
        elif action == "delete":
            disks.delete_image(a.name)
            _print({"deleted": a.name})
    elif cmd == "snapshot":
        if action == "create":
            _print(disks.create_snapshot(a.name, a.disk, incremental=not a.full))
        elif action == "list":
            _print(disks.snapshots())
        elif action == "show":
            _print(disks.snapshot(a.name))
        elif action == "delete":
            disks.delete_snapshot(a.name)
            _print({"deleted": a.name})
        elif action == "diff":
            _print(disks.blob_diff(a.base, a.target) if a.blob else disks.diff(a.base, a.target))
        elif action == "grant-access":
            _grant(disks, "snapshot", a)
        elif action == "revoke-access":
            _print(disks.revoke_access("snapshot", a.name))
        elif action == "export":
            snap = disks.snapshot(a.name)
            _print(disks.export(snap["disk"], a.path, a.format, snapshot=a.name))
    elif cmd == "nodes":
        _print([{"id": n.id, **n.to_json()} for n in st.nodes()])
    elif cmd == "fault":
        kw: dict[str, Any] = {"ms": a.ms, "on": not a.off}
        if a.fault == "bitflip":
            if a.extent is None:
                raise UsageError("bitflip needs --extent ID")
            kw.update(extent=a.extent, offset=a.offset)
        _print(st.inject(a.fault, a.node, **kw))
    elif cmd == "scrub":
        report = st.stream.scrub()
        _print(report.to_json())
        return 0 if not report.problems else 1
    elif cmd == "gc":
        if a.watch:
            return _watch(st, a)
        _print(collect(st, a.compact_below).to_json())
    elif cmd == "repair":
        finish_dying(st)  # a gc round killed after its doom: its extents are re-replicated only once back
        made = st.stream.rereplicate()
        report = st.stream.scrub()
        _print({"rereplicated": [{"extent": e, "from_node": a_, "to_node": b} for e, a_, b in made],
                "scrub": report.to_json()})
        return 0 if not report.problems else 1
    elif cmd == "check":
        result = st.check(deep=not a.quick)
        _print(result.to_json())
        return 0 if result.ok else 1
    return 0


def backup_command(a: argparse.Namespace) -> int:
    from .vault import Vault

    passphrase = os.environ.get("DISKSTAMP_VAULT_PASSPHRASE")
    if a.action == "init":
        if a.no_encryption == (passphrase is not None):
            raise UsageError("backup init: set $DISKSTAMP_VAULT_PASSPHRASE for an encrypted vault, or pass "
                             "--no-encryption (and leave it unset) for an unencrypted one")
        Vault.create(a.vault, passphrase).close()
        _print({"vault": a.vault, "encrypted": passphrase is not None})
        return 0
    if a.action == "restore" and a.format and not a.to_file:
        raise UsageError("backup restore: --format is for --to-file; a disk is always a fixed VHD")
    needs_stamp = a.action in ("create", "repair") or (a.action == "restore" and not a.to_file)
    with Vault(a.vault, passphrase) as v:
        if not needs_stamp and a.action != "check":
            return vault_action(v, None, a)
        if not needs_stamp and not os.path.isdir(a.stamp):
            return vault_action(v, None, a)  # check without a stamp: no snapshots to look at
        with Stamp.open(a.stamp) as st:
            return vault_action(v, Disks(st), a)


def vault_action(v: Any, disks: Disks | None, a: argparse.Namespace) -> int:
    if a.action == "create":
        _print(v.backup(disks, a.disk, show_progress=a.progress).to_json())
    elif a.action == "list":
        _print(v.points(a.disk))
    elif a.action == "restore":
        if a.to_file:
            _print(v.restore_to_file(a.point, a.to_file, a.format or "fixed"))
        else:
            _print(v.restore_to_disk(a.point, disks, a.to_disk or a.over_disk, overwrite=bool(a.over_disk)))
    elif a.action in ("verify", "repair"):
        report = v.verify() if a.action == "verify" else v.repair(disks)
        _print(report)
        return 0 if report.get("ok", not report.get("still_bad")) else 1
    elif a.action == "prune":
        _print({"dropped": v.prune(a.keep_last, a.keep_daily, a.keep_weekly, a.keep_monthly, wait=a.retry_lock)})
    elif a.action == "gc":
        _print(v.gc(wait=a.retry_lock))
    elif a.action == "check":
        problems = v.check()
        _print({"ok": not problems, "problems": problems, "leftovers": v.leftovers(disks)})
        return 0 if not problems else 1
    elif a.action == "rebuild-index":
        _print(v.rebuild_index())
    elif a.action == "unlock":
        _print({"removed": v.unlock()})
    return 0


class UsageError(StampError):
    pass


def _watch(st: Stamp, a: argparse.Namespace) -> int:
    """`stamp gc --watch`: rounds until SIGINT or SIGTERM, a JSON line per round that did something."""
    import signal

    from .reclaim import Policy, Reclaimer

    trigger = a.trigger if a.trigger is not None else a.target + 0.1
    if trigger < a.target:
        raise UsageError(f"--trigger ({trigger}) must not be below --target ({a.target})")
    ceiling = a.ceiling
    if ceiling is not None and (ceiling < trigger or ceiling * a.compact_below < 1):
        raise UsageError(f"--ceiling ({ceiling}) must be at least --trigger ({trigger}) and 1 / --compact-below "
                         f"({1 / a.compact_below:g}): below that, writers could wait for rounds with nothing to do")
    policy = Policy(target=a.target, trigger=trigger, compact_below=a.compact_below,
                    max_move=max(a.max_move_mib, 1) << 20, interval=a.interval, min_free=a.min_free_mib << 20,
                    ceiling=ceiling)
    r = Reclaimer(st, policy)
    signal.signal(signal.SIGTERM, lambda *_: r.stop_soon())
    if a.until_eof:
        def eof() -> None:
            sys.stdin.buffer.read()
            r.stop_soon()
        threading.Thread(target=eof, name="stamp-gc-eof", daemon=True).start()
    try:
        for report in r.rounds():
            if report.bytes_freed or report.bytes_moved or report.skipped:
                print(json.dumps({**report.to_json(), "live_bytes": r.stats.live_bytes}), flush=True)
    except KeyboardInterrupt:
        pass
    _print(r.stats.to_json())
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line. A command whose parser sets `intermixed` takes
    its optional positional after options too (argparse alone matches an
    optional positional at the first positional, then refuses it later)."""
    top = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = top.parse_known_args(argv)
    sub = getattr(args, "intermixed", None)
    if extra and sub is not None:
        return sub.parse_intermixed_args(argv[argv.index(args.cmd) + 1:], namespace=args)
    if extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    standard_streams()
    args = parse(argv)
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except UsageError as e:
        print(f"stamp: {e}", file=sys.stderr)
        return 2
    except (StampError, VhdError) as e:
        print(f"stamp {args.cmd}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # | head: quietly, as cat does
        from vhd.cli import closed_pipe

        return closed_pipe()
    except OSError as e:
        print(f"stamp {args.cmd}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
