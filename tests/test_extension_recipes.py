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
