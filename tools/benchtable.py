"""The table every benchmark under tools/ prints: ours, the peer, the ratio, the goal.

A row is a dict: test, ours, peer, peer_name, unit ("IOPS", "MiB/s" or a
time unit such as "s" or "ms"), ratio (higher is better for us) and goal
(a minimum ratio, or None).
"""

from __future__ import annotations

import json

RATES = ("IOPS", "MiB/s", "MiB")


def show(rows: list[dict], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["test"]) for r in rows) + 2
    print(f"{'test':<{width}} {'ours':>12} {'peer':>12}  {'peer is':<22} {'ratio':>6}  goal")
    for r in rows:
        fmt = "{:>12.0f}" if r["unit"] in RATES else "{:>10.2f}" + r["unit"].rjust(2)
        goal = "" if r["goal"] is None else f">= {r['goal']}x {'ok' if r['ratio'] >= r['goal'] else 'MISSED'}"
        print(f"{r['test']:<{width}} {fmt.format(r['ours'])} {fmt.format(r['peer'])}  {r['peer_name']:<22} "
              f"{r['ratio']:>5.2f}x  {goal}")
    print("ratio: ours/peer for rates, peer/ours for times (higher is better for us)")
