"""Hydra configs: every option of every group composes and validates; bad values end in one clear error line.

Options are discovered from the yaml files in conf/<group>/, so a new file is covered automatically.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from potion.config.compose import validate_train_config, validate_unlearn_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN_GROUPS = ("dataset", "model", "poison", "trainer", "logger", "experiment")
UNLEARN_GROUPS = ("discovery", "method", "trainer", "logger")
NEEDS_PATH = {"imagefolder"}  # dataset options whose path is mandatory (???)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _cases(groups: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(g, o) for g in groups for o in _options(g)]


def _compose(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _raw(cfg: object) -> object:
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[arg-type]


def _option(group: str, option: str) -> DictConfig:
    """An option file as Hydra composes it: what it inherits (``/<group>/<name>@_here_``, merged into the option
    itself; ``/blocks/<name>@<key>``: under that key), then its own values."""
    own = OmegaConf.load(CONF / group / f"{option}.yaml")
    defaults = list(own.pop("defaults", ["_self_"]))
    assert "_self_" in defaults, f"{group}/{option}: put _self_ in its defaults list"
    out = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            out = OmegaConf.merge(out, own)
        else:
            path, _, key = str(entry).lstrip("/").partition("@")
            block = _option(*path.rsplit("/", 1))
            out = OmegaConf.merge(out, block if key == "_here_" else {key: block})
    return out  # type: ignore[return-value]


def _train_overrides(group: str, option: str) -> list[str]:
    overrides = [f"{group}={option}"]
    if group == "dataset" and option in NEEDS_PATH:
        overrides.append("dataset.path=x")
    return overrides


def test_every_group_has_options() -> None:
    for group in set(TRAIN_GROUPS) | set(UNLEARN_GROUPS):
        assert _options(group), group


@pytest.mark.parametrize(("group", "option"), _cases(TRAIN_GROUPS))
def test_train_option_composes_and_validates(group: str, option: str) -> None:
    cfg = _compose("train", _train_overrides(group, option))
    own = OmegaConf.load(CONF / group / f"{option}.yaml")
    if group == "experiment":
        assert cfg.name == own.get("name", cfg.name)
        defaults = own.get("defaults", [])
        parent = any(isinstance(entry, str) for entry in defaults)  # e.g. "study_cpu": it extends that experiment
        for entry in (e for e in defaults if not isinstance(e, str)):  # e.g. {"override /dataset": "cifar10_jpg"}
            for key, value in entry.items():
                target = key.split("/")[-1]
                chosen = OmegaConf.merge(_option(target, value), own.get(target, {}))
                if parent:  # the parent's values sit between the option's file and its own: its own must hold
                    assert _raw(OmegaConf.merge(cfg[target], own.get(target, {}))) == _raw(cfg[target]), key
                else:
                    assert _raw(cfg[target]) == _raw(chosen), key
    else:
        expected = _raw(_option(group, option))
        if group == "dataset" and option in NEEDS_PATH:
            expected["path"] = "x"  # type: ignore[index]
        assert _raw(cfg[group]) == expected
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    validate_train_config(cfg)


def test_missing_dataset_path_is_visible_in_the_composed_config() -> None:
    cfg = _compose("train", ["dataset=imagefolder"])
    assert "dataset.path" in OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize(("group", "option"), _cases(UNLEARN_GROUPS))
def test_unlearn_option_composes(group: str, option: str) -> None:
    cfg = _compose("unlearn", [f"{group}={option}", "train_run=runs/train/x"])
    assert _raw(cfg[group]) == _raw(_option(group, option))
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["train_run"] == "runs/train/x"  # type: ignore[index]
    if group == "discovery":
        assert resolved["discovery"]["seed"] == resolved["seed"]  # type: ignore[index]
    validate_unlearn_config(cfg)


@pytest.mark.parametrize("block", ["importance", "ptn", "synthesis"])
def test_method_blocks_are_written_once(block: str) -> None:
    """A method shares the importance/ptn/synthesis block through its defaults list; no option file copies it."""
    shared = set(OmegaConf.load(CONF / "blocks" / f"{block}.yaml"))
    users = []
    for option in _options("method"):
        own = OmegaConf.load(CONF / "method" / f"{option}.yaml")
        assert not shared <= set(own.get(block) or {}), f"method/{option}.yaml copies the {block} block"
        if f"/blocks/{block}@{block}" in list(own.get("defaults", [])):
            users.append(option)
            assert _compose("unlearn", [f"method={option}"]).method[block].keys() >= shared
    assert len(users) >= 2, users


def test_a_method_yaml_changes_the_sgd_block_but_never_repeats_it() -> None:
    block = OmegaConf.load(CONF / "blocks" / "sgd.yaml")
    users = [o for o in _options("method")
             if "/blocks/sgd@_here_" in list(OmegaConf.load(CONF / "method" / f"{o}.yaml").get("defaults", []))]
    for option in users:
        own = OmegaConf.load(CONF / "method" / f"{option}.yaml")
        repeats = [k for k in block if k in own and own[k] == block[k]]
        assert not repeats, f"method/{option}.yaml repeats {repeats} of conf/blocks/sgd.yaml"
    assert len(users) == 5, users


def test_a_trainer_option_inherits_the_cpu_trainer_and_writes_only_what_differs() -> None:
    """One place per shared trainer setting: a new key goes into cpu.yaml and every variant has it."""
    base = OmegaConf.load(CONF / "trainer" / "cpu.yaml")
    for option in set(_options("trainer")) - {"cpu"}:
        own = OmegaConf.load(CONF / "trainer" / f"{option}.yaml")
        assert list(own.get("defaults", []))[-1] == "_self_", option
        composed = _compose("train", [f"trainer={option}"]).trainer
        assert set(composed) == set(base), option
        parent = OmegaConf.load(CONF / f"{str(own.defaults[0]).lstrip('/').split('@')[0]}.yaml")
        repeats = [k for k in own if k != "defaults" and k in parent and own[k] == parent[k]]
        assert not repeats, f"trainer/{option}.yaml repeats {repeats} of what it inherits"


def test_every_setting_of_every_method_is_in_its_config_and_overridable_without_a_plus() -> None:
    """A method's YAML (with its blocks) holds every key its schema class checks, so ``method.<key>=`` works."""
    import dataclasses

    from potion.config.schema import Method
    from potion.unlearning import methods  # noqa: F401 - registers the methods' schema classes

    for option in set(_options("method")) & set(Method.VARIANTS):  # method=none has no settings and no class
        composed = _compose("unlearn", [f"method={option}"]).method
        schema = Method.VARIANTS[option]
        assert {f.name for f in dataclasses.fields(schema)} == set(composed), option
    cfg = _compose("unlearn", ["method=retrain", "method.augment=false", "method.momentum=0.5"])
    assert cfg.method.augment is False and cfg.method.momentum == 0.5


def test_the_hydra_block_is_written_once() -> None:
    """train, unlearn and heal select conf/hydra/potion.yaml instead of each holding a hydra: section."""
    expected = _raw(OmegaConf.load(CONF / "hydra" / "potion.yaml"))
    for name in ("train", "unlearn", "heal"):
        assert "hydra" not in OmegaConf.load(CONF / f"{name}.yaml"), name
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=name, return_hydra_config=True)
        assert _raw(cfg.hydra.run) == expected["run"]  # type: ignore[index]
        assert _raw(cfg.hydra.sweep) == expected["sweep"]  # type: ignore[index]
        assert cfg.hydra.job.chdir is False


@pytest.mark.slow  # imports the unlearning pipeline (torch, Lightning, MLflow)
def test_unlearn_requires_train_run() -> None:
    from potion.core.errors import ConfigError
    from potion.pipelines.unlearn import run_unlearning

    cfg = _compose("unlearn", ["logger=none"])
    assert cfg.train_run is None and cfg.train is None
    with pytest.raises(ConfigError, match="train_run"):
        run_unlearning(cfg)


# ---------------------------------------------------------------------------------- bad values, in-process


@pytest.fixture()
def _isolated(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD_TRAIN = [
    (["poison.fraction=1.5"], ["poison.fraction"]),
    (["poison.count=100000", "poison.fraction=null", "experiment=quickstart"], ["poison.count", "100000"]),
    (["model.width=-1", "model=resnet9"], ["model.width"]),
    (["dataset=cifar10", "dataset.path={empty}"], ["CIFAR-10", "imagefolder"]),
    (["train.lr=-1"], ["train.lr"]),
    (["experiment=quickstart", "poison.trigger.size=99"], ["poison.trigger.size"]),
    (["experiment=quickstart", "poison.target=10"], ["poison.target"]),
    (["dataset=imagefolder"], ["dataset.path"]),  # mandatory ??? left unset: one line, not an omegaconf traceback
]


@pytest.mark.slow  # imports the training pipeline (torch, Lightning, MLflow)
@pytest.mark.parametrize(("overrides", "needles"), BAD_TRAIN)
def test_bad_train_values_end_in_one_error_line(overrides: list[str], needles: list[str], _isolated: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from potion.cli import run_guarded
    from potion.pipelines.train import run_training

    empty = _isolated / "empty"
    empty.mkdir()
    out_dir = _isolated / "run"
    cfg = _compose("train", [o.format(empty=empty) for o in overrides] + ["logger=none", f"out_dir={out_dir}"])
    with pytest.raises(SystemExit) as info:
        run_guarded(lambda: run_training(cfg))
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]
    assert not out_dir.exists()  # nothing is written for a rejected config


@pytest.mark.slow  # imports the unlearning pipeline
def test_unlearn_without_train_run_ends_in_one_error_line(_isolated: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from potion.cli import run_guarded
    from potion.pipelines.unlearn import run_unlearning

    cfg = _compose("unlearn", ["logger=none"])
    with pytest.raises(SystemExit) as info:
        run_guarded(lambda: run_unlearning(cfg))
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "train_run" in lines[0]


# ------------------------------------------------------------------------------------- bad values, CLI
# Each case starts an interpreter that imports Lightning (5-10 s on a busy 2-core machine): keep this list short;
# the in-process test above covers every value, these check the script's wiring (exit code, one line, no traceback).

CLI_CASES = [
    (["model=nope"], None),
    (["dataset=cifar10", "dataset.path={empty}"], "imagefolder"),
]


@pytest.mark.slow  # a subprocess that imports Lightning
@pytest.mark.parametrize(("overrides", "key"), CLI_CASES)
def test_train_cli_rejects_bad_values(overrides: list[str], key: str | None, tmp_path: Path, cache: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ)  # with the test's own POTION_CACHE_DIR (the cache fixture)
    env.pop("HYDRA_FULL_ERROR", None)
    args = [o.format(empty=empty) for o in overrides]
    cmd = [sys.executable, "train.py", "logger=none", f"out_dir={tmp_path / 'run'}",
           f"hydra.run.dir={tmp_path / 'hydra'}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    if key is None:  # an unknown option: one line naming the group and its options
        assert proc.stderr.strip() == lines[0]
        assert lines[0].startswith("error: model=nope: no such option in group 'model'; choose one of ")
        for option in _options("model"):
            assert option in lines[0]
    else:
        assert key in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_fast_exit_freezes_the_heap_before_the_interpreter_ends_once() -> None:
    """The last collection is skipped: gc.freeze runs after the atexit handlers registered later (MLflow's),
    before the ones registered earlier; a second call adds nothing."""
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen', flush=True))\n"
            "from potion.cli import fast_exit\n"
            "before = atexit._ncallbacks()\n"
            "fast_exit(); fast_exit()\n"
            "assert atexit._ncallbacks() == before + 1\n"
            "atexit.register(lambda: print('later handler ran, heap frozen: %s' % bool(gc.get_freeze_count())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
    assert out[:2] == ["later handler ran, heap frozen: False", "frozen"]


# ------------------------------------------------------------------------------------- Lightning's own arguments


def test_more_lightning_arguments_pass_through_and_are_part_of_the_run() -> None:
    from potion.config.compose import check_config, compose_config, identity_hash
    from potion.core.errors import ConfigError

    base = compose_config("train", ["experiment=quickstart"])
    clipped = compose_config("train", ["experiment=quickstart", "+trainer.lightning.gradient_clip_val=1.0"])
    check_config("train", clipped)
    assert identity_hash(clipped) != identity_hash(base)  # it changes what the run computes
    owned = compose_config("train", ["experiment=quickstart", "+trainer.lightning.max_steps=3"])
    with pytest.raises(ConfigError, match=r"^trainer.lightning.max_steps: train.py sets this pl.Trainer argument"):
        check_config("train", owned)


@pytest.mark.slow  # imports Lightning and reads the tiny data
def test_train_py_passes_its_own_trainer_arguments_and_the_lightning_block(tiny_data: Path, tmp_path: Path,
                                                                           cache: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema's list of the arguments potion sets is exactly what it passes; the block goes through as given."""
    import pytorch_lightning as pl
    from tiny_world import train_overrides

    from potion.config.compose import compose_config
    from potion.config.schema import POTION_TRAINER_ARGS
    from potion.core.errors import ConfigError
    from potion.pipelines.train import run_training

    seen: dict = {}

    class Stop(Exception):
        """Raised in place of building the Trainer: the test only needs its arguments."""

    def record(**kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    lightnings_own = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", record)
    cfg = compose_config("train", train_overrides(tiny_data, tmp_path / "run", "logger=none",
                                                  "+trainer.lightning.gradient_clip_val=0.5"))
    with pytest.raises(Stop):
        run_training(cfg)
    assert seen.pop("gradient_clip_val") == 0.5 and set(seen) == POTION_TRAINER_ARGS
    monkeypatch.setattr(pl, "Trainer", lightnings_own)  # an argument it does not take: one config error line
    typo = compose_config("train", train_overrides(tiny_data, tmp_path / "typo", "logger=none",
                                                   "+trainer.lightning.gradient_clip=0.5"))
    with pytest.raises(ConfigError, match=r"^trainer.lightning=\{'gradient_clip': 0.5\}: pl.Trainer refused it"):
        run_training(typo)
