"""PNG plots (matplotlib, headless): the PTN trajectory."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potion.io import atomic_write_bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render a figure to PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


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
