"""Cells -> one figure per metric and study: the metric against the discovered share, a panel per poison size.

Discovery settings sit at equal distances in table order (1 image, then the shares), so their labels never
need rotating; only when a panel holds too many for its width is every other (third...) one labelled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from potion.reporting.aggregate import columns
from potion.reporting.plots import print_style, save_figure_formats

# metric -> (y-axis label, a reference value drawn as a dotted line or None)
METRIC_AXES = {
    "healed": ("backdoor healed (%)", 100.0),
    "healed_attainable": ("healed, against a clean model (%)", 100.0),
    "acc_drop": ("clean accuracy lost (percentage points)", 0.0),
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANELS_PER_ROW = 3
LABEL_INCHES = 0.45  # room one discovery label needs on the x axis (9.5 pt text plus a gap)
LEGEND_TITLE = "method\n(mean over seeds,\nbars: ± 1 std)"


def plot_metric(cells: Sequence[Mapping[str, Any]], metric: str, stem: str | Path,
                methods: Sequence[str] | None = None, title: str = "",
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """``metric`` against the discovery setting, one panel per poison size and one line per method column.

    Written as ``<stem>.<format>`` for each format (PNG at 300 dpi); returns the paths.
    """
    sizes = sorted({c["n_p"] for c in cells})
    cols = columns(cells, methods)
    n_settings = max(len({c["share"] for c in cells if c["n_p"] == n_p}) for n_p in sizes)
    panel_w = min(7.0, max(3.6, LABEL_INCHES * n_settings + 1.0))
    ncols = min(PANELS_PER_ROW, len(sizes))
    nrows = math.ceil(len(sizes) / ncols)
    with print_style() as plt:  # constrained layout leaves room for every label: no second, "tight" draw
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.8, 3.4 * nrows + 0.6), sharey=True,
                                 squeeze=False, layout="constrained")
        flat = axes.ravel()
        for ax, n_p in zip(flat, sizes, strict=False):
            _panel(ax, [c for c in cells if c["n_p"] == n_p], metric, cols, panel_w)
            ax.set_title(f"{n_p} poisoned training images")
        for ax in flat[len(sizes):]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel(METRIC_AXES.get(metric, (metric, None))[0])
        handles = {label: h for ax in flat for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
        if handles:
            fig.legend([handles[c] for c in cols if c in handles], [c for c in cols if c in handles],
                       title=LEGEND_TITLE, loc="outside right center", frameon=False)
        if title:
            fig.suptitle(title)
        return save_figure_formats(fig, stem, formats, tight=False)


def _panel(ax: Any, cells: Sequence[Mapping[str, Any]], metric: str, cols: Sequence[str], panel_w: float) -> None:
    """One poison size: a line per method column over the discovery settings, at equal distances."""
    settings = sorted({(c["share"], c["discovery"]) for c in cells})
    where = {share: i for i, (share, _) in enumerate(settings)}
    for i, column in enumerate(cols):
        points = sorted((where[c["share"]], c[f"{metric}_mean"], c.get(f"{metric}_std") or 0.0)
                        for c in cells if c["method"] == column and c.get(f"{metric}_mean") is not None)
        if points:
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker=MARKERS[i % len(MARKERS)], markersize=5, capsize=3, linewidth=1.4,
                        label=column, color=f"C{i % 10}")
    reference = METRIC_AXES.get(metric, (None, None))[1]
    if reference is not None:
        ax.axhline(reference, color="0.5", linestyle=":", linewidth=1)
    stride = max(1, math.ceil(LABEL_INCHES * len(settings) / max(panel_w - 1.0, 1.0)))
    ax.set_xticks(range(len(settings)), [label if i % stride == 0 else "" for i, (_, label) in enumerate(settings)])
    ax.set_xlim(-0.5, len(settings) - 0.5)
    ax.set_xlabel("poisoned images discovered")
    ax.grid(True, alpha=0.3)
