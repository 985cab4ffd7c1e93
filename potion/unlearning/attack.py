"""What a method may know about the attack: what the user declares, and what the discovered samples tell.

A defender does not know the attacker's target, mapping or whether the poison kept its labels; the benchmark
does, and a method that read it would be graded on the answer key. So a method gets :class:`AttackFacts`,
built from the user's ``attack:`` block (each field optional) and, for what is not declared, from the labels
of the discovered samples: one label for all of them means an all-to-one attack with that label as target;
two or more mean not all-to-one (each discovered sample went to a label of its own). Whether a discovered
sample is clean-label (a target-class image by nature) is decided per sample by the methods that need it,
from the pixels (the de-triggered test of :mod:`potion.unlearning.ssd_family`), unless declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from potion.core.errors import ConfigError

DECLARED, INFERRED, PER_SAMPLE = "declared", "inferred", "per_sample"


@dataclass(frozen=True)
class AttackFacts:
    """The attack as a defender sees it: ``target`` None = no single target (all-to-all or unknown);
    ``clean_label`` None = decided per sample; ``source`` says of each field whether it was declared or inferred."""

    target: int | None
    all_to_all: bool
    clean_label: bool | None
    source: Mapping[str, str]

    def summary(self) -> dict[str, Any]:
        """What a run logs about it (settings: params)."""
        return {"attack_target": -1 if self.target is None else self.target,
                "attack_mapping": "all_to_all" if self.all_to_all else "all_to_one",
                "attack_clean_label": "per_sample" if self.clean_label is None else str(self.clean_label).lower(),
                "attack_source": ",".join(f"{k}={v}" for k, v in sorted(self.source.items()))}


def infer_attack(discovered_labels: torch.Tensor, declared: Mapping[str, Any] | None, num_classes: int
                 ) -> AttackFacts:
    """The facts for a forget set with these (given) labels; ``declared`` (the ``attack:`` block) wins per field.

    A declared target must be a class, and a declared all-to-one attack whose discovered samples carry other
    labels is refused: the declaration contradicts the data.
    """
    d = dict(declared or {})
    labels = sorted({int(y) for y in discovered_labels.tolist()})
    source: dict[str, str] = {}
    mapping = d.get("mapping")
    if mapping is None and d.get("target") is not None:  # a declared target is a declared all-to-one attack
        all_to_all = False
        source["mapping"] = DECLARED
    elif mapping is None:
        all_to_all = len(labels) > 1
        source["mapping"] = INFERRED
    else:
        all_to_all = mapping == "all_to_all"
        source["mapping"] = DECLARED
    target = d.get("target")
    if target is not None:
        if not 0 <= int(target) < num_classes:
            raise ConfigError(f"attack.target={target}: must be a class index in [0, {num_classes - 1}]")
        if not all_to_all and labels and labels != [int(target)]:
            raise ConfigError(f"attack.target={target}: the discovered samples are labelled {labels}; an all-to-one "
                              "attack's poison carries the target label (declare attack.mapping=all_to_all, or "
                              "leave attack.target unset to infer it)")
        source["target"] = DECLARED
        target = int(target)
    elif all_to_all:
        source["target"] = INFERRED
    elif len(labels) > 1:
        raise ConfigError(f"attack.mapping=all_to_one: the discovered samples carry {len(labels)} labels {labels}; "
                          "an all-to-one attack's poison carries one (declare attack.mapping=all_to_all)")
    else:
        target = labels[0] if labels else None
        source["target"] = INFERRED
    if all_to_all:
        target = None
    clean = d.get("clean_label")
    source["clean_label"] = PER_SAMPLE if clean is None else DECLARED
    return AttackFacts(target, all_to_all, None if clean is None else bool(clean), source)
