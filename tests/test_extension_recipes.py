"""The README's recipes, followed: "Add a method" and "Add an attack" each add a toy one in three files.

The toy's module goes where the recipe puts it (a folder added to the package's ``__path__``, as a file in
``potion/unlearning/`` or ``potion/data/triggers/`` would be) and its YAML into a config folder on Hydra's search
path; nothing else is edited, and the config check, the registry and the pipeline all find it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import potion.data.triggers
import potion.unlearning
from potion.config.compose import check_command_line, compose_config, method_arguments
from potion.core.errors import ConfigError

TOY_METHOD = '''"""shrink: multiplies the classifier's weights by ``scale`` (a toy: it lowers every confidence)."""

from __future__ import annotations

import copy

from potion.unlearning.registry import MethodOutput, register
from potion.unlearning.task import UnlearnTask


@register("shrink", heal_ok=True)
def shrink(task: UnlearnTask, *, scale: float, layers: int) -> MethodOutput:
    model = copy.deepcopy(task.model)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")][-layers:]
    for p in weights:
        p.data.mul_(scale)
    return MethodOutput(model, {"shrunk_layers": len(weights)})
'''

TOY_METHOD_YAML = """# shrink: the classifier's weights times `scale` (a toy method)
name: shrink
scale: 0.5
layers: 1
"""


@pytest.fixture()
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The toy method's module and YAML in place; yields the override that puts its YAML on the search path."""
    from potion.unlearning.registry import METHODS

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "shrink.py").write_text(TOY_METHOD)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "shrink.yaml").write_text(TOY_METHOD_YAML)
    monkeypatch.setattr(potion.unlearning, "__path__", [*potion.unlearning.__path__, str(tmp_path / "methods")])
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    METHODS.pop("shrink", None)
    sys.modules.pop("potion.unlearning.shrink", None)


def test_a_new_method_is_checked_before_torch_like_the_others(toy_method: str) -> None:
    run = ["train_run=runs/train/x", toy_method]
    check_command_line("unlearn", [*run, "method=shrink"])
    check_command_line("heal", ["checkpoint=m.pt", "discovered=d.txt", "dataset.path=data", toy_method,
                                "method=shrink"])
    for override, message in [("method.scale=abc", "method.scale='abc': must be a finite number"),
                              ("method.layers=1.5", "method.layers=1.5: must be an integer"),
                              ("+method.bogus=1", "method.bogus: unknown key; valid keys: name, scale, layers"),
                              ("method.name=shrinc", "method.name=shrinc: unknown method; choose one of")]:
        with pytest.raises(ConfigError) as info:
            check_command_line("unlearn", [*run, "method=shrink", override])
        assert str(info.value).startswith(message), str(info.value)


def test_a_new_method_registers_and_runs_with_its_yaml_arguments(toy_method: str) -> None:
    from potion.models import build_model
    from potion.unlearning.methods import get_method, method_info
    from potion.unlearning.registry import declared_names

    import_module("potion.unlearning.shrink")  # what importing potion.unlearning.methods does for a file in the package
    assert method_info("shrink").heal_ok and "shrink" in declared_names(heal_ok=True)
    args = method_arguments(compose_config("unlearn", ["train_run=x", toy_method, "method=shrink"]).method)
    assert args == {"scale": 0.5, "layers": 1}
    model = build_model("small_cnn", num_classes=4, in_channels=3, width=4)
    out = get_method("shrink")(SimpleNamespace(model=model), **args)
    last = [n for n, _ in model.named_parameters() if n.endswith("weight")][-1]
    assert torch.equal(dict(out.model.named_parameters())[last], 0.5 * dict(model.named_parameters())[last])
    assert out.diagnostics == {"shrunk_layers": 1}


@pytest.mark.slow  # an unlearning run on the session's trained model
def test_unlearn_runs_a_new_method_end_to_end(toy_method: str, tiny: object, tmp_path: Path) -> None:
    from potion.pipelines.unlearn import run_unlearning

    import_module("potion.unlearning.shrink")
    summary = run_unlearning(compose_config("unlearn", [f"train_run={tiny.run}", "logger=none",  # type: ignore[attr-defined]
                                                       f"out_dir={tmp_path / 'u'}", toy_method, "method=shrink",
                                                       "discovery.share=0.5"]))
    assert summary["method"] == "shrink" and summary["shrunk_layers"] == 1


# ---------------------------------------------------------------------------------------------------- an attack

TOY_TRIGGER = '''"""stripe: one bright pixel row across the image (a toy attack)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from potion.config.schema import num
from potion.core.errors import ConfigError
from potion.data.triggers.base import TriggerFields, WeightedPattern, normalised, trigger_kind


@trigger_kind("stripe", title="a bright stripe")
@dataclass(frozen=True)
class Stripe(TriggerFields):
    row: int = num(0, ge=0)  # the stripe's row
    brightness: float = num(1.0, ge=0, le=1)  # its pixel value

    def check(self, channels: int, height: int, width: int) -> None:
        if self.row >= height:
            raise ConfigError(f"poison.trigger.row={self.row}: must be below the image height {height}")

    def build(self, channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float]
              ) -> WeightedPattern:
        mean_t, std_t = normalised(mean, std)
        weight = torch.zeros(1, channels, height, width)
        weight[:, :, self.row] = 1.0
        return WeightedPattern(weight, ((self.brightness - mean_t) / std_t).expand(1, channels, height, width))
'''

TOY_POISON_YAML = """# stripe: a bright pixel row (a toy attack)
count: null
fraction: 0.05
target: 0
seed: ${seed}
exclude_target: false
mapping: all_to_one
trigger:
  kind: stripe
  row: 0
  brightness: 1.0
"""


@pytest.fixture()
def toy_attack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The toy attack's module and YAML in place; yields the override that puts its YAML on the search path."""
    from potion.data.triggers import KINDS

    (tmp_path / "triggers").mkdir()
    (tmp_path / "triggers" / "stripe.py").write_text(TOY_TRIGGER)
    (tmp_path / "conf" / "poison").mkdir(parents=True)
    (tmp_path / "conf" / "poison" / "stripe.yaml").write_text(TOY_POISON_YAML)
    monkeypatch.setattr(potion.data.triggers, "__path__", [*potion.data.triggers.__path__, str(tmp_path / "triggers")])
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    KINDS.pop("stripe", None)
    sys.modules.pop("potion.data.triggers.stripe", None)


def test_a_new_attack_is_checked_before_torch_like_the_others(toy_attack: str) -> None:
    check_command_line("train", [toy_attack, "poison=stripe"])
    check_command_line("heal", ["checkpoint=m.pt", "discovered=d.txt", "dataset.path=data", toy_attack,
                                "trigger={kind: stripe, row: 2}"])
    for override, message in [("poison.trigger.brightness=2", "poison.trigger.brightness=2: must be a finite number"),
                              ("poison.trigger.row=-1", "poison.trigger.row=-1: must be an integer >= 0"),
                              ("+poison.trigger.size=3", "poison.trigger.size: unknown key; valid keys: kind, row,")]:
        with pytest.raises(ConfigError) as info:
            check_command_line("train", [toy_attack, "poison=stripe", override])
        assert str(info.value).startswith(message), str(info.value)


def test_a_new_attack_registers_poisons_and_pastes_its_trigger(toy_attack: str) -> None:
    from potion.data.poison import PoisonPlan, Trigger, TriggerSpec, make_poison_plan
    from potion.data.triggers import kind_of

    import_module("potion.data.triggers.stripe")  # what importing potion.data.triggers does for a file there
    assert kind_of("stripe").title == "a bright stripe" and not kind_of("stripe").clean_label
    cfg = compose_config("train", [toy_attack, "poison=stripe", "poison.trigger.row=2"])
    spec = TriggerSpec.from_config(cfg.poison.trigger)
    x = torch.zeros(2, 3, 8, 8)
    out = Trigger(spec, 3, 8, 8, (0.5,) * 3, (0.25,) * 3).apply(x, torch.tensor([True, False]))
    assert torch.equal(out[0, :, 2], torch.full((3, 8), 2.0)) and out[0].abs().sum() == 2.0 * 24
    assert torch.equal(out[1], x[1])
    with pytest.raises(ConfigError, match=r"^poison.trigger.row=9: must be below the image height 8$"):
        Trigger(TriggerSpec("stripe", row=9), 3, 8, 8, (0.5,) * 3, (0.25,) * 3)
    plan = make_poison_plan(torch.arange(20) % 4, target=0, num_classes=4, trigger=spec, seed=0, count=5)
    assert PoisonPlan.from_dict(plan.to_dict()) == plan and plan.trigger.row == 2


@pytest.mark.slow  # trains a small model
def test_train_poisons_with_a_new_attack_end_to_end(toy_attack: str, tmp_path: Path, cache: Path) -> None:
    from tiny_world import train_overrides, write_pattern_folder

    from potion.core.io import read_json
    from potion.pipelines.train import run_training

    import_module("potion.data.triggers.stripe")
    data = write_pattern_folder(tmp_path / "data", n_train=40, n_test=20)
    overrides = train_overrides(data, tmp_path / "run", toy_attack, "poison=stripe", "poison.count=8",
                                "poison.fraction=null", "train.epochs=2", "logger=none")
    summary = run_training(compose_config("train", overrides))
    assert 0.0 <= summary["asr"] <= 1.0
    assert read_json(tmp_path / "run" / "poison_plan.json")["trigger"]["kind"] == "stripe"
