"""PageBlobs.version, the host cache's test that a blob is unchanged: every
change of the live pages committed after any read of the version moves it
on, in every process; writes nobody observed between cost no metadata write;
stamps from older code (the version in a counter) keep their version."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import stamp.pageblob
from stamp import Stamp
from stamp.meta import STATE_V1, U64

MIB = 1 << 20


def state_raw(s: Stamp, blob: str = "d") -> bytes:
    blob_id = s.blobs.blob_id(blob)
    with s.meta.read() as txn:
        return bytes(txn.get(U64.pack(blob_id), db=s.meta.db["blobstate"]))


def all_counters(s: Stamp) -> dict[bytes, bytes]:
    with s.meta.read() as txn:
        return dict(s.meta.items(txn, "counters"))


def test_writes_nobody_observed_between_leave_the_state_record_alone(st):
    st.blobs.write("d", 0, b"a" * 512)
    v1 = st.blobs.version("d")[1]
    st.blobs.write("d", 0, b"b" * 512)  # observed since it moved: it moves on, once
    moved, counters = state_raw(st), all_counters(st)
    for i in range(20):
        st.blobs.write("d", i * 4096, b"c" * 4096)
        st.blobs.clear("d", 8 * MIB, 512)
        assert state_raw(st) == moved and all_counters(st) == counters  # no metadata write for the version
    v2 = st.blobs.version("d")[1]
    assert v2 != v1
    assert st.blobs.version("d")[1] == v2  # nothing changed: the same
    st.blobs.resize("d", 8 * MIB)  # a shrink clears pages: a change
    assert st.blobs.version("d")[1] not in (v1, v2)
    assert st.check().ok


class VersionMachine(RuleBasedStateMachine):
    """Two stamp handles on one folder (two observers, as two processes
    would be), random changes and non-changes; each observer's model: has the
    content changed since I last read the version?"""

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="stamp-version-")
        self.handles = [Stamp.create(self.folder, extent_size=MIB)]
        self.handles.append(Stamp.open(self.folder))
        self.handles[0].blobs.create("d", 4 * MIB)
        self.size = 4 * MIB
        self.last: list[str | None] = [None, None]
        self.changed = [False, False]

    def change(self) -> None:
        self.changed = [True, True]

    @rule(h=st.integers(0, 1), page=st.integers(0, 63))
    def write(self, h: int, page: int) -> None:
        if page * 512 < self.size:
            self.handles[h].blobs.write("d", page * 512, b"w" * 512)
            self.change()

    @rule(h=st.integers(0, 1), page=st.integers(0, 63))
    def clear(self, h: int, page: int) -> None:
        if page * 512 < self.size:
            self.handles[h].blobs.clear("d", page * 512, 512)
            self.change()

    @rule(h=st.integers(0, 1), page=st.integers(0, 63), clear=st.booleans())
    def change_described(self, h: int, page: int, clear: bool) -> None:
        """A write or clear that reports the blob (a REST Put Page's ETag):
        a change, and an observation by h of the version after it."""
        if page * 512 >= self.size:
            return
        blobs = self.handles[h].blobs
        info = blobs.clear_described("d", page * 512, 512) if clear else \
            blobs.write_described("d", page * 512, b"w" * 512)
        self.change()
        got = f"{info.size}.{info.version}"
        assert got != self.last[h] and got == blobs.version("d")[1]
        assert info == blobs.describe("d")
        self.last[h], self.changed[h] = got, False

    @rule(h=st.integers(0, 1), size=st.sampled_from([MIB // 64, MIB // 32, 4 * MIB]))
    def resize(self, h: int, size: int) -> None:
        self.handles[h].blobs.resize("d", size)
        if size < self.size:
            self.change()
        elif size > self.size:
            self.changed = [True, True]  # a new size: the version says so too
        self.size = size

    @rule(h=st.integers(0, 1))
    def snapshot(self, h: int) -> None:
        self.handles[h].blobs.snapshot("d")  # no change of the live pages

    @precondition(lambda self: self.handles[0].blobs.snapshots("d"))
    @rule(h=st.integers(0, 1))
    def delete_snapshot(self, h: int) -> None:
        snap = self.handles[h].blobs.snapshots("d")[0]
        self.handles[h].blobs.delete_snapshot("d", snap.id)

    @rule(h=st.integers(0, 1))
    def observe(self, h: int) -> None:
        got = self.handles[h].blobs.version("d")[1]
        if self.last[h] is not None:
            if self.changed[h]:
                assert got != self.last[h]
            else:
                assert got == self.last[h]
        self.last[h], self.changed[h] = got, False

    @rule(h=st.integers(0, 1))
    def reopen(self, h: int) -> None:
        self.handles[h].close()
        self.handles[h] = Stamp.open(self.folder)

    @invariant()
    def checks(self) -> None:
        assert self.handles[0].check(deep=False).ok

    def teardown(self) -> None:
        for s in self.handles:
            s.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def test_a_reader_of_the_version_never_misses_a_change():
    run_state_machine_as_test(VersionMachine, settings=settings(max_examples=40, stateful_step_count=40,
                                                                deadline=None))


CHILD = textwrap.dedent("""
    import sys
    from stamp import Stamp
    with Stamp.open(sys.argv[1]) as s:
        if sys.argv[2] == "write":
            s.blobs.write("d", int(sys.argv[3]) * 512, b"p" * 512)
        else:
            print(s.blobs.version("d")[1])
""")


def child(folder: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, folder, *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_a_write_that_reports_the_blob_takes_one_transaction(st, monkeypatch):
    """write_described and clear_described answer what describe() would,
    from the change's own transaction (a Put Page's ETag costs no second
    one), and the next change moves the version they reported on."""
    st.blobs.write("d", 0, b"a" * 512)
    writes: list[bool] = []
    env = st.meta.env

    class Counting:  # the environment, counting the transactions begun
        def __getattr__(self, name: str) -> object:
            return getattr(env, name)

        def begin(self, **kw: object) -> object:
            writes.append(bool(kw.get("write")))
            return env.begin(**kw)

    monkeypatch.setattr(st.meta, "env", Counting())
    info = st.blobs.write_described("d", 4096, b"b" * 4096)
    cleared = st.blobs.clear_described("d", 0, 512)
    assert writes.count(True) == 2
    monkeypatch.undo()
    assert cleared.version != info.version and cleared == st.blobs.describe("d")
    assert st.blobs.write_described("d", 0, b"c" * 512).version != cleared.version
    assert st.check().ok


def test_a_change_made_in_another_process_moves_the_version_seen_in_this_one(st):
    folder = st.path
    seen = st.blobs.version("d")[1]
    for i in range(3):  # this process reads; another writes; the version read here moves on
        child(folder, "write", str(i))
        now = st.blobs.version("d")[1]
        assert now != seen
        seen = now
    theirs = child(folder, "version")  # another process reads; this one writes twice
    assert theirs == seen
    st.blobs.write("d", 0, b"q" * 512)
    st.blobs.write("d", 512, b"q" * 512)
    assert child(folder, "version") != theirs
    assert child(folder, "version") == st.blobs.version("d")[1]  # no change since: all agree


def test_a_stamp_with_version_counters_opens_and_keeps_its_versions(st):
    """Older stamps: 40-byte state records, the version in counter version/ID."""
    st.blobs.write("d", 0, b"a" * 512)
    blob_id = st.blobs.blob_id("d")
    size = st.blobs.size("d")
    with st.meta.write() as txn:
        key = U64.pack(blob_id)
        raw = bytes(txn.get(key, db=st.meta.db["blobstate"]))
        txn.put(key, raw[:STATE_V1.size], db=st.meta.db["blobstate"])
        txn.put(stamp.pageblob._version_key(blob_id), U64.pack(7), db=st.meta.db["counters"])
        txn.put(stamp.pageblob._version_key(blob_id + 99), U64.pack(3), db=st.meta.db["counters"])  # a deleted blob's
        txn.delete(stamp.pageblob.STATE_WORD_BUILT, db=st.meta.db["counters"])
    path = st.path
    st.close()
    with Stamp.open(path) as again:
        assert again.blobs.version("d") == (blob_id, f"{size}.7")  # what a cache recorded still matches
        again.blobs.write("d", 0, b"b" * 512)
        assert again.blobs.version("d")[1] == f"{size}.8"
        assert again.blobs.read("d", 0, 512) == b"b" * 512
        with again.meta.read() as txn:
            for gone in (blob_id, blob_id + 99):  # the deleted blob's counter too: it leaked
                assert txn.get(stamp.pageblob._version_key(gone), db=again.meta.db["counters"]) is None
        assert again.check().ok
