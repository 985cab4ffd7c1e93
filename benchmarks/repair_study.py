"""Repair settings for potion_iterative, measured on its last round: potion with every poisoned sample known.

    python benchmarks/repair_study.py runs/train/<run> [--variants 300:0.01:train,300:0.001:frozen,...]

Heals the model once with potion (forget set = all poisoned samples, as potion_iterative's last round
when the suspects are exact), then fine-tunes copies on the rest of the training set with each variant
ITERATIONS:LR:BN[:masked] (BN = train | frozen; masked = dampened weights get no gradient, as
``potion.unlearning.iterative.repair_model`` does) and prints healed / acc_drop / asr of each.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_run")
    ap.add_argument("--variants", default="300:0.01:train,300:0.01:frozen,300:0.003:frozen,300:0.001:frozen,"
                                          "100:0.003:frozen,300:0.003:frozen:masked")
    args = ap.parse_args()

    import torch

    from potion.config.compose import compose_config, method_arguments
    from potion.core.schedule import cpu_threads
    from potion.data.defender import defender_view
    from potion.data.discovery import discover
    from potion.data.poisoned import load_data, poison
    from potion.evaluation import metrics
    from potion.evaluation.backdoor import evaluate_backdoor
    from potion.pipelines.run_folders import load_trained_run
    from potion.pipelines.unlearn import make_task
    from potion.unlearning import training_based as tb
    from potion.unlearning.iterative import with_forget
    from potion.unlearning.methods import get_method

    torch.set_num_threads(cpu_threads())
    run = load_trained_run(args.train_run)
    data = poison(load_data(run.cfg.dataset), run.plan)
    model = run.build_model(data.num_classes, data.channels).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    disc = discover(run.plan, share=1.0, seed=0)
    task = make_task(model, defender_view(data), disc, torch.device("cpu"), 0, run.cfg.model, run.cfg.train)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_backdoor(m.eval(), data.bundle.test.images, data.bundle.test.labels, data.normalizer,
                                 data.trigger, run.plan.target)

    before = evaluate(model)

    def show(m: torch.nn.Module, name: str) -> None:
        r = evaluate(m)
        print(f"{name:<44} healed {metrics.healed(r['poison_acc'], before['poison_acc'], before['clean_acc']):6.2f} "
              f"drop {metrics.acc_drop(before['clean_acc'], r['clean_acc']):5.2f} asr {r['asr']:.4f}", flush=True)

    potion_args = method_arguments(compose_config("unlearn", [f"train_run={args.train_run}", "method=potion",
                                                              "method.synthesis.enabled=false"]).method)
    healed = get_method("potion")(task, **potion_args).model
    show(healed, "potion, all poison known (no repair)")
    for spec in args.variants.split(","):
        iters, lr, bn, *rest = spec.split(":")
        m = copy.deepcopy(healed)
        sub = with_forget(task, disc.forget_idx, m)
        hooks = []
        if "masked" in rest:
            for name, p in m.named_parameters():
                keep = (p.detach() == original[name]).to(p.dtype)
                hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
        t0 = time.perf_counter()
        with tb.seeded(sub):
            trainable = [mod for _, mod in tb.parameterised_layers(m)
                         if not (bn == "frozen" and isinstance(mod, torch.nn.modules.batchnorm._BatchNorm))]
            params = tb.freeze_all_but(m, trainable)
            tb.train_mode_partial(m, trainable)
            batches = tb.stream(sub, sub.retain_idx, tb.batch_size_for(sub, None), int(iters), augment=True,
                                seed=tb.stream_seed(sub, 0), what="retain")
            tb.train_steps(m, params, tb.cross_entropy_losses(m, batches, 0.0), int(iters),
                           tb.sgd_settings(sub, lr=float(lr), schedule="linear"), sub.device)
        for h in hooks:
            h.remove()
        show(m, f"repair {spec} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
