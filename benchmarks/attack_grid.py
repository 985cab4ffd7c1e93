"""The attack grid: every `poison=` option on the cpu_bench-style model, healed by every method.

    python benchmarks/attack_grid.py train   [--epochs 10] [--attacks badnets,blend,...] [--train-extra seed=1 ...]
    python benchmarks/attack_grid.py unlearn [--cells potion:1,0.1,0.5 ssd:0.1 retrain:0.1 ...]
    python benchmarks/attack_grid.py table   [--section attack_grid]

``train`` trains the clean reference model (same recipe, no poison) and one poisoned model per attack
(ResNet-9 width 1/4 on the CIFAR-10 JPEG pack, the cpu_bench recipe at ``--epochs``); ``unlearn`` runs the
(method, discovery) cells on each and appends every summary to ``benchmarks/out/attack_grid.jsonl``
(a restarted grid skips the cells already there); ``table`` writes the table into docs/results.md
between the section's markers. ``--train-extra`` adds training overrides to every model (the grid on models of
its own: another seed, target class or trigger placement, e.g. ``--train-extra seed=1 --train-extra
poison.target=3 --train-extra poison.trigger.position=top_left --train-extra poison.trigger.pattern_seed=1
--train-extra poison.trigger.warp_seed=1``; an attack without one of those settings trains without it and says
so); give the same ones to ``unlearn`` and ``table``. Each row names the attack's overrides,
so any figure can be re-made with ``python train.py experiment=cpu_bench train.epochs=<E> <overrides>`` and
``python unlearn.py ...``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    command_line,
    compose_config,
    discovery_label,
    discovery_overrides,
    fmt,
    markdown_table,
    train,
    unlearn,
    write_section,
)
from omegaconf import OmegaConf

from potion.pipelines.reference import reference_config
from potion.pipelines.train import run_training

# attack name -> train.py overrides (the rate each attack needs is part of its row)
ATTACKS: dict[str, list[str]] = {
    "badnets": ["poison=badnets"],
    "blend": ["poison=blend"],
    "sig": ["poison=sig", "poison.count=5000"],
    # the defaults (2,500, s=0.5, noise 2) reached asr 0.12 in 10 epochs; 5,000 at noise 0.5: s=1 0.27, s=2 0.60
    "wanet": ["poison=wanet", "poison.count=5000", "poison.trigger.strength=4.0",
              "poison.trigger.noise_ratio=0.5"],
    "ftrojan": ["poison=ftrojan"],
    "label_consistent": ["poison=label_consistent", "poison.count=2500"],
    # all-to-all reached asr 0.12 at 1 % (500), 0.62 at 5 % (2,500) and 0.71 at 10 % in 10 epochs: ten
    # trigger-conditional mappings need the full cpu_bench schedule
    "badnets_all_to_all": ["poison=badnets", "poison.mapping=all_to_all", "poison.count=5000", "train.epochs=30"],
}
DEFAULT_CELLS = ["potion:1,0.1,0.5", "ssd:1,0.1,0.5", "potion_iterative:0.1", "finetune:0.1", "retrain:0.1"]
OUT = ROOT / "benchmarks" / "out" / "attack_grid.jsonl"
_ABSENT = object()
KEYS = ("clean_acc_before", "asr_before", "asr", "healed", "healed_attainable", "acc_drop", "suspect_precision",
        "suspect_recall", "suspect_ap", "unlearn_seconds", "poison_acc_reference")


def base_overrides(epochs: int) -> list[str]:
    return ["experiment=cpu_bench", f"train.epochs={epochs}"]


def attack_overrides(name: str) -> list[str]:
    if name not in ATTACKS:
        raise SystemExit(f"error: unknown attack {name}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name]


def applicable(name: str, train_extra: list[str]) -> tuple[list[str], list[str]]:
    """(kept, left out): the ``--train-extra`` overrides this attack has a setting for, and the others.

    One grid command can move every trigger (``poison.trigger.position`` for the patches,
    ``poison.trigger.pattern_seed`` for blend, ``poison.trigger.warp_seed`` for WaNet): an attack without that
    setting trains without it instead of failing. Appending (``+key=``) and deleting (``~key``) overrides and
    config groups are always kept.
    """
    cfg = compose_config("train", [*base_overrides(1), *attack_overrides(name)])
    kept, left = [], []
    for o in train_extra:
        key = o.split("=", 1)[0]
        has = key.startswith(("+", "~")) or OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
        (kept if has else left).append(o)
    return kept, left


def model_overrides(name: str, epochs: int, train_extra: list[str]) -> list[str]:
    """train.py overrides of an attack's model: the recipe, the attack, then the applicable ``--train-extra``."""
    kept, left = applicable(name, train_extra)
    if left:
        print(f"{name}: left out {' '.join(left)} (not a setting of this attack)", flush=True)
    return [*base_overrides(epochs), *attack_overrides(name), *kept]


def stage_train(attacks: list[str], epochs: int, train_extra: list[str]) -> None:
    # the clean reference is the poisoned config with its poison block replaced (potion/pipelines/reference.py);
    # attacks on the same recipe share one (a cache hit), an attack with a schedule of its own gets its own
    for name in attacks:
        overrides = model_overrides(name, epochs, train_extra)
        ref = run_training(reference_config(compose_config("train", overrides)))
        print(f"reference for {name}: {ref['run_dir']} clean_acc={ref['clean_acc']:.4f}", flush=True)
        t0 = time.perf_counter()
        s = train(overrides)
        print(f"{name}: {s['run_dir']} clean_acc={s['clean_acc']:.4f} asr={s['asr']:.4f} n_p={s['n_p']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def done_cells() -> set[tuple[str, str, str, str, str]]:
    if not OUT.is_file():
        return set()
    return {(r["attack"], r["method"], r["discovery"], r.get("extra", ""), r.get("train_extra", ""))
            for r in map(json.loads, OUT.read_text().splitlines())}


def stage_unlearn(attacks: list[str], epochs: int, cells: list[str], extra: list[str], train_extra: list[str]
                  ) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    done = done_cells()
    tag, model_tag = " ".join(extra), " ".join(train_extra)
    for name in attacks:
        run = train(model_overrides(name, epochs, train_extra))["run_dir"]
        for cell in cells:
            method, shares = cell.split(":", 1)
            for share in shares.split(","):
                if (name, method, share, tag, model_tag) in done:
                    continue
                t0 = time.perf_counter()
                s = unlearn(run, [f"method={method}", *discovery_overrides(share), "save_weights=false",
                                  "reference=train", *extra])
                row: dict[str, Any] = {"attack": name, "method": method, "discovery": share, "extra": tag,
                                       "train_extra": model_tag, "train_run": run, "command": command_line(),
                                       **{k: s.get(k) for k in KEYS}, "wall_seconds": time.perf_counter() - t0}
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} {method} {share}: healed={fmt(s.get('healed'))} "
                      f"attainable={fmt(s.get('healed_attainable'))} asr={fmt(s.get('asr'), 3)} "
                      f"drop={fmt(s.get('acc_drop'), 2)}", flush=True)


def stage_table(section: str, doc: Path, train_extra: list[str]) -> None:
    model_tag = " ".join(train_extra)
    rows = [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.is_file() else []
    rows = [r for r in rows if r.get("train_extra", "") == model_tag]
    header = ["attack (overrides)", "clean / asr before", "method", "discovered", "asr after", "healed",
              "healed_attainable", "acc_drop", "suspects P / R / AP", "s"]
    body = []
    notes: list[str] = []  # a row's note: how a figure now given by the defaults was measured
    trained_with = {a: applied(a, train_extra) for a in {r["attack"] for r in rows}}  # one compose per attack
    for r in rows:
        if r.get("note") and r["note"] not in notes:
            notes.append(r["note"])
        mark = f" [{notes.index(r['note']) + 1}]" if r.get("note") else ""
        body.append([
            f"{r['attack']} (`{' '.join([*ATTACKS.get(r['attack'], []), *trained_with[r['attack']]])}`)",
            f"{fmt(r['clean_acc_before'], 3)} / {fmt(r['asr_before'], 3)}", r["method"] + (
                f" {r['extra']}" if r.get("extra") else "") + mark, discovery_label(r["discovery"]), fmt(r["asr"], 3),
            fmt(r["healed"]), fmt(r["healed_attainable"]), fmt(r["acc_drop"], 2),
            f"{fmt(r['suspect_precision'], 2)} / {fmt(r['suspect_recall'], 2)} / {fmt(r['suspect_ap'], 2)}",
            fmt(r["wall_seconds"], 0)])
    footer = "".join(f"\n\n[{i}] {n}" for i, n in enumerate(notes, 1))
    write_section(doc, section, overview(rows) + "\n\n" + markdown_table(header, body) + footer)
    print(f"{len(body)} rows -> {doc} ({section})")


def applied(name: str, train_extra: list[str]) -> list[str]:
    """The ``--train-extra`` overrides an attack's model was trained with (all of them for an attack no longer in
    the catalogue)."""
    return applicable(name, train_extra)[0] if name in ATTACKS else train_extra


def overview(rows: list[dict[str, Any]]) -> str:
    """Attack x cell at a glance: healed_attainable / acc_drop (asr after), the last row of each cell run with the
    project defaults (rows with ``--extra`` overrides are in the full table only)."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    attacks: list[str] = []
    for r in rows:
        if r.get("extra"):
            continue
        cells[(r["attack"], f"{r['method']} {discovery_label(r['discovery'])}")] = r
        if r["attack"] not in attacks:
            attacks.append(r["attack"])
    order = [f"{m} {discovery_label(d)}" for m in ("potion", "potion_iterative", "ssd", "finetune", "retrain", "rem")
             for d in ("1", "0.1", "0.5")]
    present = [c for c in order if any((a, c) in cells for a in attacks)]
    present += sorted({c for _, c in cells} - set(present))

    def cell(a: str, c: str) -> str:
        r = cells.get((a, c))
        return "" if r is None else f"{fmt(r['healed_attainable'])} / {fmt(r['acc_drop'], 2)} ({fmt(r['asr'], 3)})"

    body = [[a, f"{fmt(rows_of(rows, a)['clean_acc_before'], 3)} / {fmt(rows_of(rows, a)['asr_before'], 3)}",
             *[cell(a, c) for c in present]] for a in attacks]
    return ("healed_attainable / acc_drop (asr after) per attack and cell, project defaults:\n\n"
            + markdown_table(["attack", "clean / asr before", *present], body))


def rows_of(rows: list[dict[str, Any]], attack: str) -> dict[str, Any]:
    return next(r for r in rows if r["attack"] == attack)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("train", "unlearn", "table"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--cells", nargs="*", default=DEFAULT_CELLS, help="METHOD:SHARES (1 = one sample)")
    ap.add_argument("--extra", action="append", default=[], help="extra unlearn override for every cell")
    ap.add_argument("--train-extra", action="append", default=[],
                    help="extra training override for every model (another seed, target, trigger placement)")
    ap.add_argument("--section", default="attack_grid")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    if args.stage == "train":
        stage_train(attacks, args.epochs, args.train_extra)
    elif args.stage == "unlearn":
        stage_unlearn(attacks, args.epochs, args.cells, args.extra, args.train_extra)
    else:
        stage_table(args.section, Path(args.doc), args.train_extra)


if __name__ == "__main__":
    main()
