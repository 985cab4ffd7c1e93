"""The README's main command: train the poisoned quickstart model, heal it, print a before/after table.

``python -m potion.quickstart [train overrides ...]`` runs fully offline on scikit-learn's embedded digits.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from potion.cli import fast_exit, quiet_third_party, run_guarded

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
METHODS = ("potion", "retrain")
SHARE = 0.2


def compose_config(name: str, overrides: Sequence[str]) -> Any:
    """Compose a config from conf/ in-process (the same configs the entry scripts use).

    Works inside a running Hydra app too (an unlearning job composing its training config): the app's
    global Hydra state is set aside for the compose and restored afterwards.
    """
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance()
    saved = outer.hydra if outer.is_initialized() else None
    if saved is not None:
        outer.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    finally:
        if saved is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(saved)


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


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train + heal + print; extra arguments are train overrides (e.g. logger=none)."""
    from potion.train_pipeline import run_training
    from potion.unlearn_pipeline import run_unlearning

    quiet_third_party()
    fast_exit()
    overrides = list(sys.argv[1:] if argv is None else argv)
    train_over = ["experiment=quickstart"] + [o for o in overrides if not o.startswith("unlearn.")]
    unlearn_extra = [o.removeprefix("unlearn.") for o in overrides if o.startswith("unlearn.")]
    logger = [o for o in overrides if o.startswith("logger")]
    print("training the poisoned quickstart model (digits, ResNet-9 width 1/4, BadNets patch) ...", flush=True)
    trained = run_guarded(lambda: run_training(compose_config("train", train_over)))
    print(f"poisoned model: clean_acc={trained['clean_acc']:.4f} asr={trained['asr']:.4f} "
          f"({trained['run_dir']})", flush=True)
    rows = []
    for method in METHODS:
        cfg = compose_config("unlearn", [f"train_run={trained['run_dir']}", f"method={method}",
                                         f"discovery.share={SHARE}", *logger, *unlearn_extra])
        rows.append(run_guarded(lambda cfg=cfg: run_unlearning(cfg)))
    print()
    print(f"healing with {int(SHARE * 100)} % of the poison discovered:")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
