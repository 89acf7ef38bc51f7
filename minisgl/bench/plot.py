"""PNG charts of benchmark results, drawn with matplotlib (the optional `plot` extra).

- `plot_sweep`: the online benchmark's rate sweep, latency (TTFT and ITL, p50 and p99, ms)
  against output throughput (tok/s), one point per request rate.
- `plot_ablation`: the offline benchmark's ablation, output tok/s per engine variant as bars.

matplotlib is imported only inside these functions (with the non-interactive Agg backend), so
the benchmarks run without it; `require_matplotlib` turns its absence into one clear line.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

INSTALL_HINT = "plotting needs matplotlib, the 'plot' extra: pip install 'minisgl[plot]'"


class MissingMatplotlib(RuntimeError):
    """matplotlib is not installed; the message says which extra installs it."""


def require_matplotlib() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or MissingMatplotlib naming the extra."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as e:
        raise MissingMatplotlib(INSTALL_HINT) from e
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def exit_unless_plottable() -> None:
    """Before any benchmark work: exit with one line naming the extra if matplotlib is missing."""
    try:
        require_matplotlib()
    except MissingMatplotlib as e:
        sys.exit(f"error: --plot: {e}")


def plot_sweep(points: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Two panels (TTFT, ITL): p50 and p99 in ms against output tok/s, each point labelled
    with its request rate. `points` are online-benchmark results (`rate`, `output_tok_s`,
    `ttft_ms` and `itl_ms` with `median` and `p99`)."""
    plt = require_matplotlib()
    pts = sorted(points, key=lambda p: p["output_tok_s"])
    x = [p["output_tok_s"] for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = (("ttft_ms", "time to first token", "TTFT"), ("itl_ms", "inter-token latency", "ITL"))
    for ax, (key, name, short) in zip(axes, panels, strict=True):
        ax.plot(x, [p[key]["median"] for p in pts], "o-", label=f"{short} p50")
        ax.plot(x, [p[key]["p99"] for p in pts], "s--", label=f"{short} p99")
        for p in pts:
            ax.annotate(
                _rate_label(p["rate"]),
                (p["output_tok_s"], p[key]["p99"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{short} (ms)")
        ax.set_title(f"{name} vs throughput")
        ax.margins(x=0.12, y=0.12)  # room for the rate labels
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title + " (points labelled with the request rate)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(bars: Sequence[tuple[str, float]], path: str, title: str) -> None:
    """One bar of output tok/s per (label, tok/s) variant, the value written on each bar;
    `title` may have several lines."""
    plt = require_matplotlib()
    labels = [label for label, _ in bars]
    values = [v for _, v in bars]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(bars) + 2), 4.5), constrained_layout=True)
    rects = ax.bar(range(len(bars)), values, color=[f"C{i}" for i in range(len(bars))])
    ax.bar_label(rects, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], padding=3)
    ax.set_xticks(range(len(bars)), labels, rotation=15 if len(bars) > 3 else 0)
    ax.set_xlabel("engine variant (flags added to the base run's)")
    ax.set_ylabel("output throughput (tok/s)")
    ax.set_ylim(0, 1.15 * max(values, default=1.0))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rate_label(rate: float) -> str:
    return "all at once" if rate == float("inf") else f"{rate:g} req/s"
