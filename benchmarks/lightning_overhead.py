"""Lightning's overhead: one epoch of the cpu_bench model and batch size, bare torch loop vs Lightning.

    python benchmarks/lightning_overhead.py [--experiment cpu_bench] [--steps 40]

Both loops see the same in-memory uint8 tensors, the same batch-wise augmentation, normalisation and
trigger, the same SGD schedule; the bare loop is what Lightning's loop would be without Lightning.
Writes the figures into docs/results.md (section lightning_overhead).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from common import ROOT, command_line, compose_config, write_section

from potion.config.compose import model_kwargs
from potion.core.schedule import warmup_linear_decay
from potion.data.augment import random_crop_flip
from potion.data.batches import TensorBatches
from potion.data.poisoned import load_data, plan_from_config, poison
from potion.models import build_model
from potion.pipelines.lightning_module import PoisonTrainingModule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="cpu_bench")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps timed per loop (after 3 warm-up steps)")
    ap.add_argument("--override", action="append", default=[],
                    help="train.py override, e.g. trainer.precision=32-true (repeatable)")
    ap.add_argument("--section", default="lightning_overhead", help="docs/results.md section")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = compose_config("train", [f"experiment={args.experiment}", "logger=none", *args.override])
    data = poison(load_data(cfg.dataset), plan_from_config(load_data(cfg.dataset), cfg.poison))
    bs, steps, t = int(cfg.train.batch_size), args.steps, cfg.train
    precision, channels_last = str(cfg.trainer.precision), bool(cfg.trainer.channels_last)
    bf16 = precision.startswith("bf16")
    loader = TensorBatches(data.bundle.train.images, data.train_labels, data.train_flags, batch_size=bs,
                           shuffle=True, seed=0)

    def fresh():
        torch.manual_seed(0)
        return build_model(cfg.model.name, data.num_classes, data.channels, **model_kwargs(cfg.model))

    # bare loop
    model = fresh()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=float(t.lr), momentum=float(t.momentum),
                          weight_decay=float(t.weight_decay), nesterov=bool(t.nesterov))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(steps + 3, float(t.warmup)))
    model.train()
    it = iter(loader)
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        x, y, f = next(it)
        x = data.trigger.apply(data.normalizer(random_crop_flip(x, int(t.crop_padding), bool(t.flip))), f)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y, label_smoothing=float(t.label_smoothing))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    bare = (time.perf_counter() - t0) / steps

    # Lightning
    module = PoisonTrainingModule(fresh(), data.normalizer, data.trigger, lr=float(t.lr), momentum=float(t.momentum),
                                  weight_decay=float(t.weight_decay), total_steps=steps + 3, warmup=float(t.warmup),
                                  nesterov=bool(t.nesterov), label_smoothing=float(t.label_smoothing),
                                  crop_padding=int(t.crop_padding), flip=bool(t.flip), channels_last=channels_last)

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.t1 = time.perf_counter()

    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps + 3, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                         deterministic=True)
    trainer.fit(module, train_dataloaders=loader)
    light = (timer.t1 - timer.t0) / steps
    overhead = 100 * (light / bare - 1)
    epoch_steps = len(loader)
    body = "\n\n".join([
        f"### Lightning overhead (CPU, cpu_bench model, batch size and precision {precision}"
        f"{', channels_last' if channels_last else ''})",
        f"Command: `{command_line()}`",
        f"- bare torch loop: {bare:.3f} s/step ({bare * epoch_steps:.1f} s per epoch of {epoch_steps} steps)\n"
        f"- Lightning: {light:.3f} s/step ({light * epoch_steps:.1f} s per epoch)\n"
        f"- overhead: {overhead:+.1f} % (target < 10 %)",
    ])
    write_section(Path(ROOT / "docs" / "results.md"), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
