"""The README's main command: train the poisoned quickstart model, heal it, print a before/after table.

``python -m potion.quickstart [train overrides ...]`` runs fully offline on scikit-learn's embedded digits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from potion.cli import fast_exit, quiet_third_party, run_guarded
from potion.config.compose import check_config, compose_config

__all__ = ["format_table", "main"]

METHODS = ("potion", "retrain")  # the two rows of the table: the paper's method and the exact-unlearning baseline
SHARE = 0.2


def format_table(rows: list[dict[str, Any]]) -> str:
    """A small fixed-width before/after table."""
    head = f"{'method':<10} {'n_f':>5} {'clean_acc':>17} {'asr':>17} {'healed':>7} {'acc_drop':>8} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        healed = "n/a" if r.get("healed") is None else f"{r['healed']:.1f}"
        drop = "n/a" if r.get("acc_drop") is None else f"{r['acc_drop']:.2f}"
        lines.append(
            f"{r['method']:<10} {r['n_f']:>5} {r['clean_acc_before']:>7.4f} -> {r['clean_acc']:<6.4f} "
            f"{r['asr_before']:>7.4f} -> {r['asr']:<6.4f} {healed:>7} {drop:>8} {r['unlearn_seconds']:>8.2f}")
    return "\n".join(lines)


def unlearn_overrides(train_run: str, method: str, overrides: Sequence[str]) -> list[str]:
    """The unlearn.py overrides of one healing: the method, the share, the logger and ``unlearn.*`` arguments."""
    logger = [o for o in overrides if o.startswith("logger")]
    extra = [o.removeprefix("unlearn.") for o in overrides if o.startswith("unlearn.")]
    return [f"train_run={train_run}", f"method={method}", f"discovery.share={SHARE}", *logger, *extra]


def checked_configs(overrides: Sequence[str]) -> Any:
    """The training config, every healing config checked too (before anything is trained or imported)."""
    train_cfg = compose_config("train", ["experiment=quickstart"] + [o for o in overrides
                                                                     if not o.startswith("unlearn.")])
    check_config("train", train_cfg)
    for method in METHODS:
        check_config("unlearn", compose_config("unlearn", unlearn_overrides("runs/train/pending", method, overrides)))
    return train_cfg


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train + heal + print; extra arguments are train overrides (e.g. logger=none), ``unlearn.<key>=...`` heal's."""
    quiet_third_party()
    fast_exit()
    overrides = list(sys.argv[1:] if argv is None else argv)
    train_cfg = run_guarded(lambda: checked_configs(overrides))
    # the pipelines import torch, Lightning and MLflow: only once every value is known to be good
    from potion.pipelines.train import run_training
    from potion.pipelines.unlearn import run_unlearning

    print("training the poisoned quickstart model (digits, ResNet-9 width 1/4, BadNets patch) ...", flush=True)
    trained = run_guarded(lambda: run_training(train_cfg))
    print(f"poisoned model: clean_acc={trained['clean_acc']:.4f} asr={trained['asr']:.4f} "
          f"({trained['run_dir']})", flush=True)
    rows = []
    for method in METHODS:
        cfg = compose_config("unlearn", unlearn_overrides(str(trained["run_dir"]), method, overrides))
        rows.append(run_guarded(lambda cfg=cfg: run_unlearning(cfg)))
    print()
    print(f"healing with {int(SHARE * 100)} % of the poison discovered:")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
