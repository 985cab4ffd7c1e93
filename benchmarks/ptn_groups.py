"""Why did PTN not stop? Each criterion group, the guard's loss and the test metrics at chosen PTN steps.

    python benchmarks/ptn_groups.py runs/train/<run> --steps 0,40,80,120 [--override discovery=single ...]

PTN (potion.unlearning.ssd_family.run_ptn) stops at the first step where every group of its forget set (the
discovered samples; the synthetic ones when trigger synthesis ran) has fallen to rho of its start. The unlearning
run logs only the worst group; this script dampens the model at each given step exactly as potion does (same
synthesis, importances, criterion and schedule) and prints, per step: the dampened share, each group's hits (how
many of its samples still get their poisoned label), the PTN guard's loss (% of clean retain images the model
got right that it now gets wrong), and test clean_acc / asr. A group that falls only as fast as clean accuracy
says the backdoor is not separable by dampening on this model. ``--override``: any unlearn.py override
(``method=potion`` is the default method; ``method.loss=logit_norm`` ...).
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

from potion.config.compose import compose_config
from potion.data.defender import defender_view
from potion.data.poisoned import load_data, poison
from potion.evaluation.backdoor import evaluate_backdoor
from potion.pipelines.unlearn import make_task, trained_inputs
from potion.unlearning.dampening import RatioPool, snapshot
from potion.unlearning.importance import importance_parameters
from potion.unlearning.ptn import PTNSchedule, evaluate_candidate
from potion.unlearning.ptn_guard import AccuracyLoss
from potion.unlearning.ssd_family import forget_accuracy_fn, importance_pair, potion_loss, ptn_criterion, with_synthesis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished training run folder")
    ap.add_argument("--steps", default="0,20,40,60,80,100,120", help="PTN steps k, comma-separated")
    ap.add_argument("--override", action="append", default=[], help="an unlearn.py override (repeatable)")
    args = ap.parse_args()
    cfg = compose_config("unlearn", [f"train_run={args.run}", "method=potion", "logger=none", *args.override])
    torch.manual_seed(int(cfg.seed))
    run, discovery = trained_inputs(cfg)
    data = poison(load_data(run.cfg.dataset), run.plan, run.poison_images)
    model = run.build_model(data.num_classes, data.channels).eval()
    task = make_task(model, defender_view(data), discovery, torch.device("cpu"), int(cfg.seed), run.cfg.model,
                     run.cfg.train, cfg.get("attack"))
    m = cfg.method
    task, synth, found = with_synthesis(task, m.get("synthesis"))
    loss = potion_loss(task, str(m.get("loss", "auto")))
    imp_r, imp_f, _ = importance_pair(task, loss=loss, power=1, **m.importance)
    crit, info = forget_accuracy_fn(task, ptn_criterion(task, str(m.ptn.criterion)), found)
    schedule = PTNSchedule.from_config(m.ptn, task.discovery.n_f, task.num_train)
    originals = snapshot(model, [n for n, _ in importance_parameters(model)])
    pool = RatioPool.build(imp_r, imp_f)
    guard = AccuracyLoss.of(task, int(m.ptn.guard_samples), task.seed + 31)
    synthetic = ["synthetic"] if task.extra_forget is not None else []
    names = ["discovered"] * (len(crit.groups) - len(synthetic)) + synthetic  # the order forget_accuracy_fn uses
    print(f"importance loss {loss}; synthesis {synth or 'none'}; criterion {info}")
    print(f"group sizes {dict(zip(names, [int(y.numel()) for _, y in crit.groups], strict=True))}, "
          f"start hits {crit.start}, stop when every group <= {schedule.rho} x its start")
    for k in (int(s) for s in args.steps.split(",")):
        cand = evaluate_candidate(k, schedule, pool, model, originals, imp_r, imp_f, crit)
        hits = [crit.group_hits(model, g) for g in range(len(crit.groups))]
        ev = evaluate_backdoor(model, data.bundle.test.images, data.bundle.test.labels, data.normalizer, data.trigger,
                               data.wanted_test_labels(), int(cfg.eval_batch_size))
        print(f"k={k:4d}  dampened {cand.dampened_share:.4f}  hits {dict(zip(names, hits, strict=True))}  "
              f"guard loss {guard(model):5.1f} %  clean_acc {ev['clean_acc']:.3f}  asr {ev['asr']:.3f}", flush=True)


if __name__ == "__main__":
    main()
