"""`hostcache serve --workers N`: one VM's disks served by N worker processes.

A Python server uses one core; N workers use N. The supervisor (the process
the user started) claims the socket, checks the VM and its disks, takes each
disk's writer lease, and starts the workers; then it only accepts clients
and hands each to the next worker in turn (SCM_RIGHTS over the worker's
control socket), so clients spread evenly and a client's connections
(NBD multi-conn: `nbdcopy --connections=4`, fio's one per job) land in
different workers. Each worker opens the host and the disks itself, under
the supervisor's leases (AttachedDisk's shared mode), and serves whole
connections: handshake and transmission.

Why every worker may serve every disk, and NBD_FLAG_CAN_MULTI_CONN holds
(the specification: all connections see the same data, and a flush on one
covers every write any connection was answered):
- a fixed VHD keeps no state in the process: its bytes are the blob's pages;
  a differencing or dynamic VHD does (its block table), so such a disk (an
  OS disk made from an image) is refused here: serve it with --workers 1;
- the stamp is shared by processes: a write is answered after its index
  transaction commits, and any process's later read sees it;
- the host cache is one index in LMDB, each operation under its lock, a
  process loading it again when another changed it (cache.py): a line
  filled, updated or made dirty in one worker is what the others see, in
  every caching mode; a flush writes back every dirty line of the blob,
  whoever wrote it, then syncs the stamp's filesystems (Stamp.flush_shared);
- the throttle's buckets are files under HOST/throttle/, read and written
  back under flock around every admission (buckets.py): the disk's and the
  VM's limits hold across workers as with one.
A worker killed (kill -9) loses only its connections: acknowledged writes are
in the stamp or the cache's index, both crash-safe; a lock it held is freed
with it (flock); a bucket record is one pwrite, so it is the old or the new
one. The supervisor starts another in its place. When the supervisor goes,
its workers see their control socket close and stop. On SIGTERM or SIGINT
the supervisor stops the workers (each flushes), writes back what a killed
one left dirty, records the cache's version of each blob and releases the
leases.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import HostError

READY = b"R"  # a worker's first byte on its control socket: its exports are open
START_TIMEOUT = 60.0  # seconds a worker has to open the host and its disks
STOP_TIMEOUT = 60.0  # seconds workers have to flush and exit on SIGTERM


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    control: socket.socket  # the supervisor's end

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_worker(index: int, command: list[str]) -> Worker:
    """A worker: `command` plus its control socket's descriptor; returns once it
    said it is ready, or raises HostError if it exits first (its stderr,
    inherited, said why)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen([*command, "--worker-control", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    finally:
        theirs.close()
    ours.settimeout(START_TIMEOUT)
    try:
        said = ours.recv(1)
    except TimeoutError:
        said = b""
    if said != READY:
        proc.kill()
        proc.wait()
        ours.close()
        raise HostError(f"worker {index} did not start (exit status {proc.returncode}; its error is above)")
    ours.setblocking(True)
    ours.settimeout(None)
    return Worker(index, proc, ours)


class Supervisor:
    """Accepts on `listener` and deals clients to `count` workers in turn."""

    def __init__(self, listener: socket.socket, count: int, command: list[str],
                 say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.listener, self.count, self.command, self.say = listener, count, command, say
        self.workers: list[Worker] = []
        self.next = 0
        self.restarts = 0
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe()

    def start(self) -> None:
        try:
            for i in range(self.count):
                self.workers.append(start_worker(i, self.command))
        except BaseException:
            self.stop()
            raise

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop the workers."""
        os.set_blocking(self.wake_w, False)
        old = {sig: signal.signal(sig, lambda *_: self._wake()) for sig in (signal.SIGTERM, signal.SIGINT)}
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.listener, selectors.EVENT_READ, "accept")
            sel.register(self.wake_r, selectors.EVENT_READ, "stop")
            for w in self.workers:
                sel.register(w.control, selectors.EVENT_READ, w)
            while not self.stopping:
                for key, _ in sel.select():
                    if key.data == "stop":
                        self.stopping = True
                    elif key.data == "accept":
                        self._accept(sel)
                    elif isinstance(key.data, Worker):
                        self._check(sel, key.data)
        finally:
            sel.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.stop()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            for _ in range(self.count + 1):  # a worker that died meanwhile is replaced, the client goes on
                w = self.workers[self.next % self.count]
                self.next += 1
                try:
                    socket.send_fds(w.control, [b"c"], [conn.fileno()])
                    return
                except OSError:
                    self._replace(sel, w)
            self.say("hostcache serve: no worker could take a client: it was closed")

    def _check(self, sel: selectors.BaseSelector, w: Worker) -> None:
        """A worker's control socket turned readable: it closed (the worker died)."""
        try:
            data = w.control.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._replace(sel, w)

    def _replace(self, sel: selectors.BaseSelector, w: Worker) -> None:
        if self.stopping or self.workers[w.index] is not w:
            return
        try:
            sel.unregister(w.control)
        except (KeyError, ValueError):
            pass
        w.control.close()
        status = w.proc.wait()
        how = f"signal {-status}" if status < 0 else f"status {status}"
        self.say(f"hostcache serve: worker {w.index} (pid {w.pid}) ended ({how}): its clients were disconnected; "
                 "starting another")
        self.restarts += 1
        fresh = start_worker(w.index, self.command)
        self.workers[w.index] = fresh
        sel.register(fresh.control, selectors.EVENT_READ, fresh)

    def stop(self) -> None:
        """SIGTERM to every worker (each flushes its disks and exits); one that
        takes over STOP_TIMEOUT is killed (what it acknowledged is kept)."""
        self.stopping = True
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.control.close()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_r = self.wake_w = -1


def worker_fds(control: socket.socket) -> list[int] | None:
    """The client descriptors the supervisor sent (None: it is gone)."""
    try:
        data, fds, _, _ = socket.recv_fds(control, 64, 64)
    except BlockingIOError:
        return []
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return fds
