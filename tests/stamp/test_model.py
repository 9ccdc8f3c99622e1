"""The stamp's model test: stamp.testing's machine, as users get it."""

from __future__ import annotations

import os

from hypothesis import settings

from stamp.testing import PageBlobMachine

SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))

TestPageBlob = PageBlobMachine.TestCase
TestPageBlob.settings = settings(max_examples=200 if SLOW else 20, stateful_step_count=40 if SLOW else 30,
                                 deadline=None)


def test_the_model_holds_with_lazy_listings_in_small_windows(monkeypatch):
    """iter_page_ranges and iter_diff resolve snapshots WINDOW pages at a
    time: with a window of 3 pages, runs cross windows everywhere."""
    from hypothesis.stateful import run_state_machine_as_test

    import stamp.pageblob

    monkeypatch.setattr(stamp.pageblob, "WINDOW", 3)
    run_state_machine_as_test(PageBlobMachine, settings=settings(max_examples=10, stateful_step_count=30,
                                                                 deadline=None))
