"""Heal a poisoned model: ``python unlearn.py train_run=<run folder> method=potion discovery.share=0.1``."""

import hydra
from omegaconf import DictConfig

from potion.cli import quiet_third_party, run_guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="unlearn")
def main(cfg: DictConfig) -> None:
    from potion.unlearn_pipeline import run_unlearning

    quiet_third_party()
    s = run_guarded(lambda: run_unlearning(cfg))
    print(f"run folder: {s['run_dir']}" + ("  (already finished; reused)" if s.get("reused") else ""))
    print(f"{s['method']}: n_f={s['n_f']}/{s['n_p']}  clean_acc {s['clean_acc_before']:.4f} -> {s['clean_acc']:.4f}  "
          f"asr {s['asr_before']:.4f} -> {s['asr']:.4f}  healed={_f(s['healed'])}  acc_drop={_f(s['acc_drop'])}  "
          f"seconds={s['unlearn_seconds']:.2f}")
    if s.get("ptn_note"):
        print(f"note: {s['ptn_note']}")


def _f(x: object) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
