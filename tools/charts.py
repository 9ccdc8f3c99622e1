"""PNG bar charts for the benchmarks (matplotlib, from the dev extras)."""

from __future__ import annotations


def bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: str,
         log: bool = True) -> str:
    """Grouped bars, one group per label; returns what was done, for printing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install 'diskstamp[dev]')"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))], values, width=width,
               label=name)
    ax.set_xticks(list(range(len(labels))), labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"chart written to {path}"
