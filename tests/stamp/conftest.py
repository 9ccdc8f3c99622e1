"""Fixtures shared by the stamp's tests."""

from __future__ import annotations

import pytest

from stamp import Stamp

MIB = 1 << 20


@pytest.fixture
def st(tmp_path):
    """A stamp with 1 MiB extents (so a few writes seal several) and a 16 MiB
    blob "d". A module may define its own `st`, which then takes precedence."""
    s = Stamp.create(str(tmp_path / "st"), extent_size=MIB)
    s.blobs.create("d", 16 * MIB)
    yield s
    s.close()
