"""Figures (matplotlib, headless): the PTN trajectory, and how every figure is saved."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from potion.core.io import atomic_write_bytes

SCREEN_DPI = 110
PRINT_DPI = 300
# Sizes in points that stay readable at the figure's own size (a 12-inch multi-panel figure included).
PRINT_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10.5, "xtick.labelsize": 9.5,
               "ytick.labelsize": 9.5, "legend.fontsize": 9.5, "legend.title_fontsize": 9.5, "figure.titlesize": 12,
               "pdf.fonttype": 42, "svg.fonttype": "none"}  # text stays text (selectable, editable) in PDF/SVG


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def print_style() -> Iterator[Any]:
    """pyplot with ``PRINT_STYLE`` for the figures made inside the block (the global style is left alone)."""
    plt = _pyplot()
    with plt.rc_context(PRINT_STYLE):
        yield plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render a figure to PNG (screen resolution) atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=SCREEN_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_figure_formats(fig: Any, stem: str | Path, formats: Sequence[str] = ("png", "pdf"),
                        dpi: int = PRINT_DPI, tight: bool = True) -> list[Path]:
    """Render a figure once per format (``<stem>.png``, ``<stem>.pdf``...) atomically at ``dpi``, then close it.

    ``tight``: crop to the drawn content (costs a second drawing per format; a figure with a constrained
    layout needs none). PDF and SVG carry no creation date, so the same figure gives the same bytes.
    """
    stem = Path(stem)
    paths = []
    try:
        if fig.get_layout_engine() is not None:  # lay out once, not again in every savefig
            fig.draw_without_rendering()
            fig.set_layout_engine("none")
        for fmt in formats:
            buf = io.BytesIO()
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Date": None} if fmt == "svg" else None
            fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight" if tight else None, metadata=metadata)
            paths.append(atomic_write_bytes(stem.with_name(f"{stem.name}.{fmt}"), buf.getvalue()))
    finally:
        _pyplot().close(fig)
    return paths


def plot_ptn_trajectory(rows: Sequence[dict[str, Any]], threshold: float, path: str | Path,
                        title: str = "PTN search") -> Path:
    """forget_acc and share of dampened parameters per step, with the stopping threshold."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [r["forget_acc"] for r in rows], marker=".", label="forget_acc")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("step k  (s_k = s_start * s_step^k)")
    ax.set_ylabel("forget accuracy (poisoned label)")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * r["dampened_share"] for r in rows], color="gray", alpha=0.6, label="% dampened")
    ax2.set_ylabel("% of parameters dampened")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)
