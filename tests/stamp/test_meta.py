"""The metadata environment: stale LMDB readers are cleared, so a process
killed inside a read transaction does not make the metadata grow forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from stamp import Stamp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from stamp import Stamp
    st = Stamp.open(sys.argv[1])
    txn = st.meta.read()  # holds a reader slot, and every page it can see, until it ends
    txn.get(b"x")
    print("reading", flush=True)
    time.sleep(60)
""")


def used_bytes(st: Stamp) -> int:
    return (int(st.meta.env.info()["last_pgno"]) + 1) * int(st.meta.env.stat()["psize"])


def test_a_reader_killed_inside_its_transaction_does_not_grow_the_metadata(tmp_path):
    """While this process keeps the stamp open, another dies (kill -9) inside
    a read transaction; 4,000 overwrites later the metadata has grown by a
    bounded amount (the stale slot is cleared), not by pages per overwrite."""
    path = str(tmp_path / "st")
    with Stamp.create(path) as st:
        st.blobs.create("d", 1 << 20)
        for i in range(200):
            st.blobs.write("d", (i % 16) * 4096, os.urandom(4096))
        before = used_bytes(st)
        child = subprocess.Popen([sys.executable, "-c", READER, path, ROOT], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "reading\n"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        for i in range(4000):
            st.blobs.write("d", (i % 16) * 4096, os.urandom(4096))
        grown = used_bytes(st) - before
        assert grown < 8 << 20, f"metadata grew by {grown >> 20} MiB"
        assert st.check(deep=False).ok
