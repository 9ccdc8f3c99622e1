"""The stamp's model test: stamp.testing's machine, as users get it."""

from __future__ import annotations

import os

from hypothesis import settings

from stamp.testing import PageBlobMachine

SLOW = bool(os.environ.get("DISKSTAMP_SLOW"))

TestPageBlob = PageBlobMachine.TestCase
TestPageBlob.settings = settings(max_examples=200 if SLOW else 20, stateful_step_count=40 if SLOW else 30,
                                 deadline=None)
