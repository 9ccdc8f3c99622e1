"""A stamp on a full filesystem (a real one: a small tmpfs): writes fail
cleanly with nothing acknowledged lost, and the stamp still opens, lists,
checks, deletes and collects garbage, after which writes work again."""

from __future__ import annotations

import os

import pytest

from stamp import Stamp, StampError
from stamp.gc import collect

from ..conftest import tmpfs as mount_tmpfs

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    with mount_tmpfs(tmp_path / "fs", 40, "this test") as mnt:
        yield mnt


def fill_until_full(st: Stamp, blob: str) -> dict[int, bytes]:
    """Write 64 KiB pieces until the stamp refuses; returns what was acknowledged."""
    acked: dict[int, bytes] = {}
    with pytest.raises(StampError) as refused:
        for i in range(4096):
            data = os.urandom(64 * 1024)
            st.blobs.write(blob, i * len(data), data)
            acked[i * len(data)] = data
    assert "space" in str(refused.value) or "full" in str(refused.value), refused.value
    return acked


def test_a_full_disk_leaves_the_stamp_usable(small_fs):
    path = os.path.join(small_fs, "st")
    with Stamp.create(path, extent_size=MIB) as st:
        st.blobs.create("keep", 8 * MIB)
        st.blobs.create("junk", 256 * MIB)
        keep = os.urandom(MIB)
        st.blobs.write("keep", 0, keep)
        st.stream.seal_current()  # junk gets extents of its own, which gc can free whole
        acked = fill_until_full(st, "junk")
        assert len(acked) > 10
        with pytest.raises(StampError):  # and again: still a clean refusal, never a crash
            st.blobs.write("keep", MIB, b"x" * 4096)
    with Stamp.open(path) as st:  # opens (recovery included) on the full disk
        assert sorted(st.blobs.names()) == ["junk", "keep"]
        report = st.check(deep=True)
        assert report.ok, report.problems
        assert st.blobs.read("keep", 0, MIB) == keep
        for off, data in acked.items():
            assert st.blobs.read("junk", off, len(data)) == data
        st.blobs.delete("junk")
        freed = collect(st)
        assert freed.extents_deleted > 0 and freed.bytes_freed > 0
        st.blobs.write("keep", MIB, b"y" * 4096)  # space is back
        assert st.blobs.read("keep", 0, MIB + 4096) == keep + b"y" * 4096
        assert st.check(deep=True).ok
