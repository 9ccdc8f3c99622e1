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


def hbars(labels: list[str], series: dict[str, list[float]], xlabel: str, title: str, path: str,
          log: bool = True, line: float | None = None, top: float | None = None) -> str:
    """Grouped horizontal bars, one group per label, top to bottom (for many labels), a vertical line at
    `line`, values clipped at `top`; returns what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install 'diskstamp[dev]')"
    fig, ax = plt.subplots(figsize=(9, max(3, 0.32 * len(labels) * max(1, len(series)) / 2 + 1.5)))
    height = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.barh([y + (i - (len(series) - 1) / 2) * height for y in range(len(labels))],
                [float("nan") if v <= 0 else v if top is None else min(v, top) for v in values], height=height,
                label=name)
    if line is not None:
        ax.axvline(line, color="black", linewidth=0.8)
    ax.set_yticks(list(range(len(labels))), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # top to bottom, no empty margin
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return f"chart written to {path}"
