"""Shared test set-up: Hypothesis profiles and the outside-tool oracles.

Oracle tools are installed by the test command (tools/run.sh); a missing
one fails the test that needs it. It is never skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=600, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("slow" if os.environ.get("DISKSTAMP_SLOW") else "default")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"oracle tool {tool!r} is missing: run the tests with `bash tools/run.sh test`, "
                    "which installs it")
    return path


def run(*cmd: str, check: bool = True, cwd: str | os.PathLike[str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    require(cmd[0])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@contextmanager
def tmpfs(folder: os.PathLike[str] | str, size_mib: int, why: str) -> Iterator[str]:
    """A tmpfs of `size_mib` MiB mounted on `folder` (made here) for a test
    that needs a small file system it can fill; unmounted afterwards."""
    os.makedirs(folder)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"{why} mounts a {size_mib} MiB tmpfs and needs root: {proc.stderr.strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], timeout=30)
