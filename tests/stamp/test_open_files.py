"""Replica files deleted by one process are let go by every other process
sharing the stamp (stream.release_gone): a process that read or wrote a blob
holds descriptors of its extents' files, and when gc in another process
deletes them, their space must come back once that process reads or writes
again, not when it exits. Checked in /proc (no descriptor of a deleted file
under the stamp) and by the file system's free space (statvfs of a tmpfs the
test owns, so no other program moves it)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

from stamp import Stamp
from stamp.gc import collect
from stamp.stream import RELEASE_EVERY
from tests.stamp.holder import MIB, pattern

from ..conftest import tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOB_MIB = 8


def deleted_held(pid: int, root: str) -> dict[str, int]:
    """{link target: bytes on disk} of the deleted files under `root` process pid holds open."""
    fd_dir = f"/proc/{pid}/fd"
    out = {}
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
            if target.startswith(root + "/") and target.endswith(" (deleted)"):
                out[f"{name} {target}"] = os.stat(os.path.join(fd_dir, name)).st_blocks * 512
        except FileNotFoundError:
            continue  # closed meanwhile
    return out


def free_bytes(path: str) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def used_bytes(path: str) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def du(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(folder, f)).st_blocks * 512
    return total


class Holder:
    """tests/stamp/holder.py in a process of its own."""

    def __init__(self, path: str, blob: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.stamp.holder", path, blob], cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": ROOT}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self._answer() == "ready"

    def _answer(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def do(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self._answer() == "ok", command

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def overwrite(st: Stamp, seed: int) -> None:
    for k in range(BLOB_MIB):
        st.blobs.write("b", k * MIB, pattern(seed, k))
    st.stream.seal_current()  # so gc may take every extent the last data went to


def test_a_process_lets_go_of_replica_files_gc_deleted_in_another(tmp_path):
    """The holder reads (and later writes) the blob, so it holds its extents'
    files; this process overwrites the blob and a gc round deletes them. The
    holder's deleted files are measured, then its next read lets go of every
    one and the tmpfs gets their bytes back; the same for its next write."""
    with tmpfs(tmp_path / "fs", 160, "this test") as mnt:
        path = os.path.join(mnt, "st")
        with Stamp.create(path, extent_size=MIB) as st:
            st.blobs.create("b", BLOB_MIB * MIB)
            overwrite(st, 1)
            holder = Holder(path, "b")
            try:
                holder.do("read 1")
                assert deleted_held(holder.proc.pid, path) == {}
                for seed, then in ((2, "read 2"), (3, "write 3 0")):
                    overwrite(st, seed)
                    report = collect(st)
                    assert report.extents_deleted >= BLOB_MIB, report
                    held = deleted_held(holder.proc.pid, path)
                    # the holder has not run since: it still holds the files gc deleted (the setup works;
                    # a read opens one replica of each extent)
                    assert sum(held.values()) >= BLOB_MIB * MIB * 0.9, held
                    before = free_bytes(mnt)
                    holder.do(then)  # one read (or write) in the holder lets them go
                    assert deleted_held(holder.proc.pid, path) == {}
                    appended = 0 if then.startswith("read") else 3 * MIB  # the write's own 3 replicas
                    assert free_bytes(mnt) - before >= sum(held.values()) - appended - MIB
                    holder.do(f"read {seed}")  # and it still reads the blob right
                    if then.startswith("read"):
                        holder.do(f"read {seed}")
            finally:
                holder.close()
            assert st.check(deep=True).ok


def test_an_idle_process_lets_go_within_a_bounded_time(tmp_path):
    """The holder reads the blob, then does nothing more; gc here deletes its
    extents. Within a few RELEASE_EVERY it holds none of their files and the
    tmpfs has their bytes back, though it never read or wrote again."""
    with tmpfs(tmp_path / "fs", 160, "this test") as mnt:
        path = os.path.join(mnt, "st")
        with Stamp.create(path, extent_size=MIB) as st:
            st.blobs.create("b", BLOB_MIB * MIB)
            overwrite(st, 1)
            holder = Holder(path, "b")
            try:
                holder.do("read 1")
                overwrite(st, 2)
                collect(st)
                held = deleted_held(holder.proc.pid, path)
                before = free_bytes(mnt)
                deadline = time.monotonic() + 5 * RELEASE_EVERY + 5
                while deleted_held(holder.proc.pid, path) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert deleted_held(holder.proc.pid, path) == {}, held
                assert free_bytes(mnt) - before >= sum(held.values()) - MIB
                holder.do("read 2")
            finally:
                holder.close()


def test_a_long_lived_process_beside_a_reclaimer_killed_and_restarted_keeps_no_deleted_file(tmp_path):
    """`stamp gc --watch` killed -9 and started again, four times, while this
    process overwrites the blob and a long-lived holder reads and writes it
    after every overwrite; each reclaimer is killed at a random moment after
    it reported a round that freed something. At the end the holder holds no
    deleted file after its next read, and the file system's used bytes are
    what the stamp's folder holds (on the old code they grew by every extent
    it had read)."""
    rng = random.Random(5)
    with tmpfs(tmp_path / "fs", 320, "this test") as mnt:
        path = os.path.join(mnt, "st")
        with Stamp.create(path, extent_size=MIB) as st:
            st.blobs.create("b", BLOB_MIB * MIB)
            overwrite(st, 0)
        env = {**os.environ, "PYTHONPATH": ROOT}
        holder = Holder(path, "b")
        gc = None
        seed = 0
        try:
            with Stamp.open(path) as st:
                for k in range(4):
                    out = str(tmp_path / f"gc.{k}.out")
                    with open(out, "wb") as f:
                        gc = subprocess.Popen([sys.executable, "-m", "stamp", "--stamp", path, "gc", "--watch",
                                               "--target", "1.02", "--trigger", "1.02", "--compact-below", "0.9",
                                               "--interval", "0"], cwd=ROOT, env=env, stdout=f)
                    for _ in range(3):
                        seed += 1
                        overwrite(st, seed)
                        holder.do(f"read {seed}")
                        holder.do(f"write {seed} {seed % BLOB_MIB}")
                    for _ in range(1200):  # until it reported a round (its start-up is slow on a busy machine)
                        if os.path.getsize(out) or gc.poll() is not None:
                            break
                        time.sleep(0.05)
                    time.sleep(rng.uniform(0, 0.3))  # then somewhere in the rounds that follow
                    assert gc.poll() is None and os.path.getsize(out)
                    gc.send_signal(signal.SIGKILL)
                    gc.wait()
                collect(st)  # what the last kill left (a doomed round, dead extents)
                deleted = deleted_held(holder.proc.pid, path)
                holder.do(f"read {seed}")
                assert deleted_held(holder.proc.pid, path) == {}, deleted
                held_here = deleted_held(os.getpid(), path)
                assert held_here == {}, held_here  # this process too (it reads nothing: gc lets go)
                used, stamp_bytes = used_bytes(mnt), du(mnt)
                # all the file system holds is the stamp's folder (a tmpfs's own use is nil)
                assert used - stamp_bytes < 2 * MIB, (used, stamp_bytes, deleted)
                assert st.check(deep=True).ok
        finally:
            if gc is not None and gc.poll() is None:
                gc.kill()
                gc.wait()
            holder.close()


def test_readers_beside_deletions_elsewhere_never_fail_nor_read_a_wrong_file(tmp_path):
    """Two Stamp objects in one process keep separate descriptors, as two
    processes do: one overwrites and collects (deleting extents), while three
    threads read through the other, which lets go of those files under them
    (a descriptor let go while a thread preads it). No read fails or returns
    bytes that were never that MiB's, and no descriptor of a deleted file
    stays once the readers stop."""
    path = str(tmp_path / "st")
    writer = Stamp.create(path, extent_size=MIB)
    writer.blobs.create("b", BLOB_MIB * MIB)
    overwrite(writer, 0)
    reader = Stamp.open(path)
    written = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def read_loop(i: int) -> None:
        k = i
        try:
            while not stop.is_set():
                k = (k + 1) % BLOB_MIB
                last = written[0]
                data = reader.blobs.read("b", k * MIB, MIB)
                assert data in [pattern(s, k) for s in range(last, written[0] + 2)], (k, data[:1])
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=read_loop, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for seed in range(1, 13):
            overwrite(writer, seed)
            written[0] = seed
            collect(writer)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert reader.blobs.read("b", 0, MIB) == pattern(12, 0)
    assert deleted_held(os.getpid(), path) == {}
    reader.close()
    assert writer.check(deep=True).ok
    writer.close()


def test_a_reader_descheduled_between_its_descriptor_and_its_pread_never_reads_another_file(tmp_path, monkeypatch):
    """A descriptor let go or retired is closed MAX_OPEN retirements later, on the guess that
    a thread handed it has long finished its pread by then. A thread the scheduler (or the
    GIL) takes away between taking the number and the pread's system call may still be
    there: the number, closed and given to the next file opened, read that file's record at
    the same offset, which verifies (records are checksummed by offset, not extent), and
    the reader returned another blob's bytes. MAX_OPEN is made 1 here, to need fewer files."""
    import stamp.node as node_mod

    monkeypatch.setattr(node_mod, "MAX_OPEN", 1)
    st = Stamp.create(str(tmp_path / "st"), nodes=3, extent_size=MIB)
    for i, name in enumerate("abcdefgh"):
        st.blobs.create(name, 64 * 1024)
        st.blobs.write(name, 0, bytes([0xA0 + i]) * (64 * 1024))  # each in an extent of its own, same offset
        st.stream.seal_current()
    node = st.stream.nodes[0]
    node.forget()
    real_pread = os.pread
    held, go, reader = threading.Event(), threading.Event(), []

    def pread(fd: int, n: int, offset: int) -> bytes:
        if threading.current_thread() is reader[0] and n >= 64 * 1024 and not held.is_set():
            held.set()  # the reader has its number; it now loses the CPU until `go`
            go.wait(30)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    out: list[bytes] = []
    reader.append(threading.Thread(target=lambda: out.append(st.blobs.read("a", 0, 64 * 1024))))
    reader[0].start()
    assert held.wait(30)
    fd = node._fds[next(iter(node._fds))]
    for name in "bcdefgh":  # others read meanwhile: files opened, the reader's retired, then closed
        st.blobs.read(name, 0, 64 * 1024)
        if fd in node._fds.values():
            break  # its number now names another extent's file
    go.set()
    reader[0].join(30)
    st.close()
    assert out == [b"\xa0" * (64 * 1024)]


def test_a_writer_placing_a_new_extent_beside_threads_forgetting_extents_does_not_fail(tmp_path):
    """place() walked the layer's known extents while other threads of the process (the
    release thread letting go of files deleted elsewhere, a reclaimer thread forgetting the
    extents it deleted) removed entries: a write opening a new extent failed with
    'dictionary changed size during iteration' (seen beside a reclaimer thread)."""
    from stamp.stream import Extent

    st = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    for i in range(1, 20001):
        st.stream._extents[10**6 + i] = Extent(10**6 + i, [0, 1, 2], "sealed", 4096, 0)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            key = 10**6 + (i % 20000) + 1
            e = st.stream._extents.pop(key, None)  # as forget_extent and release_gone do
            if e is not None:
                st.stream._extents[key] = e

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(200):
            st.stream.place()
    finally:
        stop.set()
        t.join()
        st.close()


def test_stamp_check_beside_a_running_reclaimer_reports_no_problem(tmp_path):
    """`stamp check` beside a serve (which reclaims by itself) walked extents, pieces and
    files at different moments: every check made while rounds deleted extents reported
    pieces pointing at missing extents, missing replicas and records with no good copy
    ('data lost') on a healthy stamp."""
    from stamp.reclaim import Policy, Reclaimer

    path = str(tmp_path / "st")
    st = Stamp.create(path, extent_size=MIB)
    st.blobs.create("d", 4 * MIB)
    r = Reclaimer(st, Policy(interval=0.01)).start()
    checks: list[subprocess.Popen[str]] = []
    outs = []
    i = 0
    try:
        while len(outs) < 4:
            st.blobs.write("d", (i % 64) * 65536, bytes([i % 250 + 1]) * 65536)
            i += 1
            if i % 100 == 0 and len(checks) < 2:
                checks.append(subprocess.Popen([sys.executable, "-m", "stamp", "--stamp", path, "check"],
                                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}))
            for c in [c for c in checks if c.poll() is not None]:
                checks.remove(c)
                assert c.stdout is not None
                outs.append((c.returncode, c.stdout.read()))
    finally:
        r.stop()
        st.close()
    assert [code for code, _ in outs] == [0] * 4, outs
