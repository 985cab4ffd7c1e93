"""How high can a trained backdoor's asr be? The share of triggered images that reach the attacker's label,
split by whether the model classifies the clean image correctly.

    python benchmarks/asr_ceiling.py runs/train/<run> [runs/train/<run> ...]

Why: an all-to-all backdoor maps class y to y + 1, so the model must first recognise y; a triggered image
whose clean version it misclassifies lands on (its wrong prediction) + 1 instead. Its asr is therefore
bounded by the model's clean accuracy, unlike an all-to-one backdoor, whose target needs no recognition.
The script prints, per run: clean_acc, asr, asr among test images classified correctly when clean and among
those misclassified, and the share of triggered images sent to the attacker's label of the model's own clean
prediction (the mapping the network actually implements). Formulas: potion.evaluation.metrics.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository root on sys.path)

from potion.data.poisoned import load_data, poison
from potion.evaluation import metrics
from potion.evaluation.backdoor import predict
from potion.pipelines.run_folders import load_trained_run


def ceiling(run_dir: str) -> dict[str, float]:
    """The asr split for one finished training run (test split, CPU or the model's device)."""
    run = load_trained_run(run_dir)
    bundle = load_data(run.cfg.dataset)
    data = poison(bundle, run.plan, run.poison_images)
    model = run.build_model(data.num_classes, data.channels)
    images, labels = bundle.test.images, bundle.test.labels
    clean = predict(model, images, data.normalizer)
    triggered = predict(model, images, data.normalizer, data.trigger)
    wanted = data.wanted_test_labels()
    right = clean == labels
    return {
        "clean_acc": metrics.accuracy(clean, labels),
        "asr": metrics.attack_success_rate(triggered, labels, wanted),
        "asr_clean_correct": metrics.attack_success_rate(triggered[right], labels[right], wanted[right]),
        "asr_clean_wrong": metrics.attack_success_rate(triggered[~right], labels[~right], wanted[~right]),
        "to_own_mapping": float((triggered == run.plan.wanted(clean)).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training run folders (train.py prints them)")
    args = parser.parse_args()
    for run_dir in args.runs:
        c = ceiling(run_dir)
        print(f"{run_dir}: clean_acc={c['clean_acc']:.4f} asr={c['asr']:.4f} "
              f"asr|clean-correct={c['asr_clean_correct']:.4f} asr|clean-wrong={c['asr_clean_wrong']:.4f} "
              f"to-own-mapping={c['to_own_mapping']:.4f}", flush=True)


if __name__ == "__main__":
    main()
