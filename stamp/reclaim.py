"""Continuous space reclamation: when to run a gc round, what it compacts, how fast.

Extents are never rewritten in place, so a disk overwritten at a steady rate
fills the stamp's nodes at three times that rate. A Reclaimer keeps the
stamp's extent bytes under `target` x the bytes the index references (plus
the open extents and one round's work), by running gc rounds (gc.collect)
by itself: in a thread of any Python program (`Reclaimer(stamp).start()`),
or as `stamp gc --watch`, which `hostcache serve` starts as a companion
process (Companion: a thread would share the serving event loop's GIL).

Rules (pure: `plan` and `due` take plain values):
- a round is due when the extent bytes exceed `trigger` x the live bytes the
  last census found, when the file system has less than `min_free` bytes
  free, or `recount` seconds after the last census (a deleted blob or
  snapshot lowers the live bytes without adding extent bytes); the cheap
  check reads only the extents table, the census scans the index (in a read
  transaction: no writer waits); a round that freed and moved nothing (every
  extent above `compact_below`, say) is not run again over the trigger until
  the extent bytes grow (or the recount, or short of space): an idle stamp is
  not scanned at every interval for nothing;
- dead sealed extents are always deleted (that costs no copy);
- partly dead sealed extents are compacted emptiest first (the least to copy
  for the most freed), only those whose live share is below
  `compact_below`, until the extent bytes would be at or under `target` x
  the live bytes (with less than `min_free` free: all of them);
- pacing: one round copies at most `max_move` bytes, and rounds are at least
  `interval` seconds apart, so a writer sharing the process and the disk
  keeps most of both; every write transaction of a round is short (gc);
- a StampError in a round (a full disk, too few nodes) is reported in the
  statistics and the next round tries again;
- backpressure (pressure.py): a running reclaimer (a thread, `rounds()`, or
  one made with publish=True) publishes its census and progress in the
  stamp's folder, and writers (any process) wait in small steps while the
  extents hold more than `ceiling` x the live bytes plus `slack_extents`
  extents, as long as its rounds make progress (PATIENCE at most without).
  `ceiling` is at least the trigger and 1 / compact_below, so over it a
  round always has something to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import StampError
from .gc import ExtentUse, GcReport, collect
from .pressure import Publisher
from .stamp import Stamp


@dataclass(frozen=True)
class Policy:
    target: float = 1.5  # extent bytes kept at or under this x live bytes
    trigger: float = 1.6  # a round is due above this x live bytes
    compact_below: float = 0.5  # never compact an extent more alive than this
    max_move: int = 256 << 20  # bytes copied per round
    interval: float = 0.25  # seconds between rounds, at least
    recount: float = 10.0  # seconds between censuses when nothing else calls one
    min_free: int = 0  # bytes: below this free on the file system, compact every candidate
    # writers wait while the extents hold more than this x live bytes (None: 2, or the trigger, or
    # 1 / compact_below, whichever is largest) ...
    ceiling: float | None = None
    slack_extents: int = 2  # ... plus this many extents (an open one, one in flight)

    def __post_init__(self) -> None:
        if not 1.0 < self.target <= self.trigger:
            raise ValueError(f"need 1 < target <= trigger (target {self.target}, trigger {self.trigger})")
        if not 0.0 < self.compact_below <= 1.0:
            raise ValueError(f"compact_below must be in (0, 1], not {self.compact_below}")
        if self.ceiling is None:
            object.__setattr__(self, "ceiling", max(2.0, self.trigger, 1 / self.compact_below))
        assert self.ceiling is not None
        if self.ceiling < self.trigger or self.ceiling * self.compact_below < 1.0 or self.slack_extents < 1:
            raise ValueError(f"need ceiling >= trigger and >= 1 / compact_below, slack_extents >= 1 (ceiling "
                             f"{self.ceiling}, trigger {self.trigger}, compact_below {self.compact_below}, "
                             f"slack_extents {self.slack_extents})")
        if self.max_move <= 0 or self.interval < 0 or self.recount <= 0 or self.min_free < 0:
            raise ValueError("max_move and recount must be positive, interval and min_free not negative")


def plan(uses: list[ExtentUse], policy: Policy, free: int | None = None) -> list[int]:
    """The sealed extents to compact this round, emptiest first."""
    live = sum(u.live for u in uses)
    total = sum(u.size for u in uses if u.live or not u.sealed)  # dead ones go anyway
    pressed = free is not None and free < policy.min_free
    chosen: list[int] = []
    moved = 0
    for u in sorted((u for u in uses if u.sealed and 0 < u.live and u.ratio < policy.compact_below),
                    key=lambda u: (u.ratio, u.id)):
        if not pressed and total <= policy.target * live:
            break
        if chosen and moved + u.live > policy.max_move:
            break
        chosen.append(u.id)
        moved += u.live
        total -= u.size - u.live
    return chosen


def due(total: int, live: int | None, free: int | None, since_census: float, policy: Policy,
        futile: int | None = None) -> bool:
    """Is a round due? `total`: extent bytes now; `live`: what the last census found (None: none yet);
    `futile`: the extent bytes when the last round freed and moved nothing (None: it did something)."""
    if live is None or since_census >= policy.recount:
        return True
    if free is not None and free < policy.min_free:
        return True
    if futile is not None and total <= futile:
        return False  # the same round would find the same nothing to do
    return total > policy.trigger * max(live, 1)


@dataclass
class Statistics:
    rounds: int = 0
    censuses: int = 0
    progress: int = 0  # rounds that freed or moved something
    live_bytes: int = 0  # at the last census
    extent_bytes: int = 0  # at the last check (one replica's worth)
    total: GcReport = field(default_factory=GcReport)
    errors: int = 0
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "progress": self.progress, "censuses": self.censuses, "live_bytes": self.live_bytes,
                "extent_bytes": self.extent_bytes, "errors": self.errors, "last_error": self.last_error,
                **{k: v for k, v in self.total.to_json().items() if k != "skipped"}}


class Reclaimer:
    """Runs gc rounds on `stamp` as `policy` says: `step()` once, or `start()`
    a thread that steps until `stop()`."""

    def __init__(self, stamp: Stamp, policy: Policy | None = None, publish: bool = False) -> None:
        """`publish`: hold writers back from the first step (a thread or
        `rounds()` always does); a reclaimer stepped by hand now and then
        without it holds nobody."""
        self.stamp, self.policy = stamp, policy or Policy()
        self.stats = Statistics()
        self._live: int | None = None
        self._census_at = 0.0
        self._futile: int | None = None  # extent bytes when the last round did nothing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.publish = publish
        self._publisher = Publisher(stamp.path)
        self.pace: Callable[[], None] | None = None  # a test hook: called before each round

    def _free(self) -> int | None:
        if not self.policy.min_free:
            return None
        st = os.statvfs(self.stamp.path)
        return st.f_bavail * st.f_frsize

    def extent_bytes(self) -> int:
        """Record bytes in every extent (one replica's worth): the extents table only."""
        return self.stamp.stream.extent_bytes()

    def step(self) -> GcReport | None:
        """One round if one is due (None if not)."""
        total = self.stats.extent_bytes = self.extent_bytes()
        free = self._free()
        if not due(total, self._live, free, time.monotonic() - self._census_at, self.policy, self._futile):
            return None
        if self.pace is not None:
            self.pace()
        try:
            report = collect(self.stamp, choose=self._choose)
        except StampError:  # a full filesystem, too few nodes: this round freed nothing, and
            self._futile = total  # writers must not wait for it (they go on, refused if the disk is full)
            self._tell_writers()
            raise
        useful = bool(report.bytes_freed or report.bytes_moved)
        self._futile = None if useful else total
        self.stats.rounds += 1
        self.stats.progress += useful
        self.stats.total.add(report)
        self._tell_writers()
        return report

    def _choose(self, uses: list[ExtentUse]) -> list[int]:
        self._live = self.stats.live_bytes = sum(u.live for u in uses)
        self._census_at = time.monotonic()
        self._tell_writers()  # live data may have grown: writers held for it go on at once
        self.stats.censuses += 1  # after publishing: a census counted is one writers can see
        return plan(uses, self.policy, self._free())

    def _tell_writers(self) -> None:
        """Publish the census and progress for writers (pressure.py)."""
        if self.publish and self._live is not None:
            p = self.policy
            self._publisher.publish(self._live, p.ceiling or 2.0, p.slack_extents * self.stamp.stream.extent_size,
                                    self.stats.progress, self._futile or 0)

    def rounds(self) -> Iterator[GcReport]:
        """Step until stop() or stop_soon(), yielding each round's report;
        errors are counted (and said on stderr), not raised. Writers wait
        for these rounds while the extents are over the ceiling (pressure.py)."""
        self.publish = True
        try:
            while not self._stop.is_set():
                report = None
                try:
                    report = self.step()
                except StampError as e:  # a full disk, too few nodes: try again next round
                    self._error(e)
                except Exception as e:  # noqa: BLE001 -- the reclaimer outlives a bad round; it says why
                    self._error(e)
                    print(f"stamp reclaimer: a round failed: {type(e).__name__}: {e}", file=sys.stderr)
                if report is not None:
                    yield report
                self._stop.wait(self.policy.interval)
        finally:
            self.withdraw()

    def withdraw(self) -> None:
        """Writers stop waiting for this reclaimer (stop() and the end of rounds() do it)."""
        self._publisher.withdraw()

    def run(self) -> None:
        for _ in self.rounds():
            pass

    def stop_soon(self) -> None:
        """Ask the rounds to end after the one under way (safe from a signal handler)."""
        self._stop.set()

    def _error(self, e: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(e).__name__}: {e}"

    def start(self) -> Reclaimer:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="stamp-reclaimer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the round under way (its transactions are short; its copy is at most max_move)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.withdraw()

    def __enter__(self) -> Reclaimer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Companion:
    """A reclaimer in a process of its own (`stamp gc --watch --until-eof`),
    for as long as the context lasts: what `hostcache serve` runs. A
    Reclaimer thread would share the serving process's GIL: its census, a
    Python scan of the whole index (tens of ms of CPU on a 4 GiB disk written
    in 64 KiB blocks), then holds the GIL for a switch interval (5 ms) each
    time the event loop gives it up at a system call, and every reader and
    writer of the process waits for it. In a process of its own only the
    machine's scheduler stands between them. The companion ends with its
    parent however that ends (its standard input closes); writers of a dead
    one are not held (pressure.py). One killed by a signal while the context
    lasts (kill -9, the OOM killer) is waited for and started again after
    RESTART_AFTER: the serve would otherwise go on with no reclaimer, and the
    stamp fill; one that ended with an error is not (it would fail again)."""

    RESTART_AFTER = 1.0  # seconds

    def __init__(self, stamp_path: str) -> None:
        self.stamp_path = stamp_path
        self.proc: subprocess.Popen[str] | None = None
        self.stats: dict[str, Any] = {}  # its Statistics, once stopped
        self.restarts = 0  # companions started again after a signal ended them
        self._last = ""
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # self.proc: replaced by the reader thread, taken by stop()
        self._stopping = threading.Event()

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "stamp", "--stamp", self.stamp_path, "gc", "--watch",
                                 "--until-eof"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self) -> Companion:
        self._stopping.clear()
        self.proc = self._spawn()
        self._reader = threading.Thread(target=self._run, args=(self.proc,), name="stamp-gc-companion", daemon=True)
        self._reader.start()  # its lines are read as they come: a full pipe would stop its rounds
        return self

    def _run(self, proc: subprocess.Popen[str]) -> None:
        """Read each companion's lines; when one ends by a signal before
        stop(), wait for it (a zombie otherwise) and start another."""
        while True:
            self._read(proc)
            proc.wait()
            if proc.returncode >= 0 or self._stopping.wait(self.RESTART_AFTER):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                proc = self.proc = self._spawn()
                self.restarts += 1

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # a line per round, then the statistics, indented (stamp's JSON)
            if line.strip() == "{":
                self._last = line
            elif self._last:
                self._last += line

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """End it after the round under way; its statistics (as Statistics.to_json)."""
        with self._lock:
            self._stopping.set()
            proc, self.proc = self.proc, None
        if proc is None:
            return self.stats
        assert proc.stdin is not None
        try:
            proc.stdin.close()  # --until-eof: it stops
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        if self._reader is not None:
            self._reader.join()
        try:
            last = json.loads(self._last)
        except ValueError:
            last = {}
        self.stats = last if isinstance(last, dict) and "rounds" in last else {}
        return self.stats

    def __enter__(self) -> Companion:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
