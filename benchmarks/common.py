"""Shared helpers of the benchmark scripts: compose configs, run cells, write result sections into docs."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from potion.config.compose import compose_config  # noqa: E402


def command_line() -> str:
    """The command that produced a figure, for the results document."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def train(overrides: Sequence[str]) -> dict[str, Any]:
    """Train (or reuse the finished run of) the poisoned model for these overrides."""
    from potion.pipelines.train import run_training

    return run_training(compose_config("train", list(overrides)))


def unlearn(train_run: str, overrides: Sequence[str]) -> dict[str, Any]:
    """One unlearning cell, in process (same code path as unlearn.py)."""
    from potion.pipelines.unlearn import run_unlearning

    return run_unlearning(compose_config("unlearn", [f"train_run={train_run}", *overrides]))


def discovery_overrides(spec: str) -> list[str]:
    """'1' = a single sample; otherwise a share such as 0.1."""
    if spec in ("1", "single"):
        return ["discovery=single"]
    return [f"discovery.share={float(spec)}"]


def discovery_label(spec: str) -> str:
    return "1 sample" if spec in ("1", "single") else f"{float(spec) * 100:g} %"


def fmt(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace (or append) the block between <!-- BEGIN name --> and <!-- END name --> in ``doc``."""
    from potion.core.io import atomic_write_text

    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.is_file() else "# Results\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(doc, text)
