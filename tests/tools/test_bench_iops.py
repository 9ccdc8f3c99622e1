"""tools/bench_iops.py: every selection of tiers runs to the end (a short real
run through a host and a stamp; not a timing test: no figure is checked)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import bench_iops  # noqa: E402

TIER_NAMES = {"S10": "S10", "E10": "E10", "P10": "P10", "P30": "P30", "v2": "PremiumV2", "ultra": "Ultra"}


def test_the_cached_rows_use_p10_else_a_tier_that_may_be_cached_else_none():
    for n in range(1, len(bench_iops.TIERS) + 1):
        for chosen in itertools.permutations(bench_iops.TIERS, n):
            name = bench_iops.cached_tier(list(chosen), vm_caches=True)
            cacheable = [t for t in chosen if t not in ("ultra", "v2")]
            assert name == ("P10" if "P10" in chosen else (cacheable[0] if cacheable else None)), chosen
            assert bench_iops.cached_tier(list(chosen), vm_caches=False) is None


@pytest.mark.parametrize("tiers", [["ultra", "v2"], ["ultra"], ["v2"], ["S10"], ["E10"], ["P10"], ["P30"],
                                   ["v2", "S10", "v2"]], ids=" ".join)
def test_every_tier_selection_runs_to_the_end(tmp_path, tiers):
    """--tiers ultra v2 crashed: the cached rows attached Ultra with ReadOnly
    caching, which the platform refuses."""
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "bench_iops.py"), "--tiers", *tiers, "--seconds", "0.01",
                        "--warmup", "0", "--qd", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    got = json.loads(out.read_text())
    chosen = list(dict.fromkeys(tiers))
    assert [j["jobname"].split("-")[0] for j in got["jobs"]] == [TIER_NAMES[t] for t in chosen for _ in range(4)]
    assert list(got["qd_sweep"]["iops"]) == [TIER_NAMES[t] for t in chosen]
    cached = bench_iops.cached_tier(chosen, vm_caches=True)
    assert [row["caching"] for row in got["cached"]] == ([] if cached is None else ["None", "ReadOnly"])
