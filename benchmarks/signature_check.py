"""How exactly the patch signature recovered from ONE discovered sample flags the other poisoned samples.

    python benchmarks/signature_check.py runs/train/<run> [--seeds 0,1,2]

For each discovery seed: the single discovered sample the unlearning runs would use (``discovery=single``),
the recovered window and trigger mask, and precision / recall of the signature's matches against the true
undiscovered poison. Prints one line per seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_run")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()

    from potion.data.discovery import discover
    from potion.data.poisoned import load_data, poison
    from potion.pipelines.run_folders import load_trained_run
    from potion.unlearning.suspects import find_signature, signature_matches

    run = load_trained_run(args.train_run)
    data = poison(load_data(run.cfg.dataset), run.plan)
    model = run.build_model(data.num_classes, data.channels).eval()
    truth = set(run.plan.indices)
    for seed in (int(s) for s in args.seeds.split(",")):
        d = discover(run.plan, count=1, seed=seed)
        t0 = time.perf_counter()
        sig = find_signature(model, data, d.forget_idx, d.retain_idx, run.plan.target, seed=seed)
        if sig is None:
            print(f"seed {seed}: no patch signature found")
            continue
        hits = set(d.retain_idx[signature_matches(data, d.retain_idx, sig)].tolist())
        missed = truth - set(d.forget_idx.tolist())
        tp = len(hits & missed)
        mask = "whole window" if sig.mask is None else f"{int(sig.mask.sum())} pixels"
        print(f"seed {seed}: window ({sig.row},{sig.col}) size {sig.patch.shape[-1]}, trigger mask {mask}; "
              f"flagged {len(hits)}, precision {tp / max(1, len(hits)):.3f}, recall {tp / max(1, len(missed)):.3f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
