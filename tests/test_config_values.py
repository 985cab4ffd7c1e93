"""The bad-value catalogue: a bad value of any group ends in one ``error:`` line (exit 2), before torch is imported.

The schema (potion/config/schema.py) is checked on the composed config before Hydra starts a job, so these
fail in well under a second and leave nothing behind: no run folder, no MLflow store, no Hydra output folder.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potion.config.compose import check_command_line, check_creatable_dir, method_arguments, variant_of
from potion.config.schema import Method, heal_methods
from potion.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUN = "train_run=runs/train/x"
HEAL = ["checkpoint=model.pt", "discovered=list.txt", "dataset.path=data"]

TRAIN_CASES = [
    (["train.epochs=abc"], "train.epochs='abc': must be a finite number > 0 or null"),
    (["train.eval_batch_size=0"], "train.eval_batch_size=0: must be an integer >= 1"),
    (["train.epoch_eval_samples=0"], "train.epoch_eval_samples=0: must be an integer >= 1"),
    (["train.batch_size=64.5"], "train.batch_size=64.5: must be an integer >= 1"),
    (["train.epochs=null"], "train: set train.epochs (> 0) or train.iterations (>= 1)"),
    (["train.momentum=1"], "train.momentum=1: must be a finite number >= 0 and < 1"),
    (["train.momentum=0", "train.nesterov=true"], "train.nesterov=true needs train.momentum > 0"),
    (["train.flip=yes"], "train.flip='yes': must be true or false"),
    (["train.trigger_in_files=1"], "train.trigger_in_files=1: must be true or false"),
    (["train.lr=-1"], "train.lr=-1: must be a finite number > 0"),
    (["train.epochz=3"], "Could not override 'train.epochz'."),
    (["train.epochs=[1"], "cannot parse the override 'train.epochs=[1'"),
    (["train.epochs=1,2"], "Ambiguous value for argument 'train.epochs=1,2'"),
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["resume=maybe"], "resume='maybe': must be true or false"),
    (["+foo=1"], "foo: unknown key; valid keys: seed, resume"),
    (["out_dir=/proc/foo"], "out_dir=/proc/foo: cannot write in /proc"),
    (["out_dir=/dev/null/run"], "out_dir=/dev/null/run: /dev/null is not a folder"),
    (["dataset=nosuch"], "dataset=nosuch: no such option in group 'dataset'; choose one of cifar10, cifar100,"),
    (["dataset=imagefolder"], "dataset.path: required; a folder or .tar.gz archive"),
    (["dataset.image_size=0"], "dataset.image_size=0: must be an integer >= 1 or null"),
    (["dataset.source=mnist"], "dataset.source='mnist': must be one of ['cifar10', 'cifar100', 'imagefolder'"),
    (["dataset.std=[0.2,0,0.2]"], "dataset.std=[0.2, 0, 0.2]: must be a list of numbers > 0 or null"),
    (["dataset.mean=[0.5,0.5]"], "dataset.mean=[0.5, 0.5]: give one value per channel (1 or 3)"),
    (["model=nosuch"], "model=nosuch: no such option in group 'model'; choose one of resnet9, small_cnn, wrn28x10"),
    (["model=resnet9", "model.width=-1"], "model.width=-1: must be a finite number > 0"),
    (["model=small_cnn", "model.width=0.5"], "model.width=0.5: must be an integer >= 1"),
    (["model=wrn28x10", "model.depth=27"], "model.depth=27: must be 6n+4 with n >= 1"),
    (["model=wrn28x10", "model.dropout=1"], "model.dropout=1: must be a finite number >= 0 and < 1"),
    (["model.name=nope"], "model.name=nope: unknown model; choose one of ['resnet9', 'small_cnn', 'wrn', 'wrn28x10']"),
    (["model=resnet9", "+model.depth=3"], "model.depth: unknown key; valid keys: name, width"),
    (["poison=nosuch"], "poison=nosuch: no such option in group 'poison'; choose one of badnets, blend,"),
    (["poison.fraction=1.5"], "poison.fraction=1.5: must be a finite number > 0 and < 1 or null"),
    (["poison.fraction=null"], "poison: set exactly one of poison.count (e.g. 500) or poison.fraction"),
    (["poison.count=0", "poison.fraction=null"], "poison.count=0: must be >= 1"),
    (["poison.target=-1"], "poison.target=-1: must be an integer >= 0"),
    (["poison.mapping=some_to_one"], "poison.mapping='some_to_one': must be one of ['all_to_one', 'all_to_all']"),
    (["poison.trigger.kind=checkerboard"], "poison.trigger.kind=checkerboard: unknown poison.trigger; choose one of"),
    (["poison=blend", "+poison.trigger.size=3"], "poison.trigger.size: unknown key; valid keys: kind, alpha"),
    (["poison.exclude_target=1"], "poison.exclude_target=1: must be true or false"),
    (["trainer=nosuch"], "trainer=nosuch: no such option in group 'trainer'; choose one of cpu, ddp, gpu"),
    (["trainer.devices=abc"], "trainer.devices='abc': give a device count >= 1, -1 (all devices) or auto"),
    (["trainer.devices=0"], "trainer.devices=0: give a device count >= 1, -1 (all devices) or auto"),
    (["trainer.precision=banana"], "trainer.precision='banana': must be one of ['64-true', '32-true',"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu': must be one of ['cpu', 'gpu', 'cuda', 'auto', 'mps']"),
    (["trainer.strategy=magic"], "trainer.strategy='magic': must be one of ['auto', 'ddp',"),
    (["trainer.deterministic=1"], "trainer.deterministic=1: must be true or false"),
    (["logger=nosuch"], "logger=nosuch: no such option in group 'logger'; choose one of mlflow, none"),
    (["logger.fallback=banana"], "logger.fallback='banana': must be one of ['none', 'local']"),
    (["logger.name=wandb"], "logger.name='wandb': must be one of ['mlflow', 'none']"),
    (["experiment=nosuch"], "experiment=nosuch: no such option in group 'experiment'; choose one of cpu_bench,"),
    (["hydra/launcher=nosuch"], "hydra/launcher=nosuch: no such option in group 'hydra/launcher'; choose one of"),
]

UNLEARN_CASES = [
    ([], "train_run: required; give a training run folder"),
    ([RUN, "eval_batch_size=0"], "eval_batch_size=0: must be an integer >= 1"),
    ([RUN, "save_weights=2"], "save_weights=2: must be true or false"),
    ([RUN, "suspects.enabled=maybe"], "suspects.enabled='maybe': must be true or false"),
    ([RUN, "out_dir=/proc/foo"], "out_dir=/proc/foo: cannot write in /proc"),
    ([RUN, "+train=5"], "train=5: must be a mapping or a list of strings or null"),
    ([RUN, "discovery=nosuch"], "discovery=nosuch: no such option in group 'discovery'; choose one of half, share,"),
    ([RUN, "discovery.share=0"], "discovery.share=0: must be a finite number > 0 and <= 1 or null"),
    ([RUN, "discovery.share=null"], "discovery: set discovery.share (in (0, 1]) or discovery.count"),
    ([RUN, "discovery.count=0"], "discovery.count=0: must be an integer >= 1 or null"),
    ([RUN, "method=nosuch"], "method=nosuch: no such option in group 'method'; choose one of assd, bad_teacher,"),
    ([RUN, "method.name=nope"], "method.name=nope: unknown method; choose one of ['assd', 'bad_teacher',"),
    ([RUN, "method.ptn.rho=1.5"], "method.ptn.rho=1.5: must be a finite number >= 0 and <= 1"),
    ([RUN, "method.ptn.s_step=1.0"], "method.ptn.s_step=1.0: must be a finite number > 1"),
    ([RUN, "method.ptn.max_steps=0"], "method.ptn.max_steps=0: must be an integer >= 1"),
    ([RUN, "method.ptn.criterion=some"],
     "method.ptn.criterion='some': must be one of ['auto', 'all', 'exclude_natural_target']"),
    ([RUN, "method.ptn.fixed_step=500"], "method.ptn.fixed_step=500: must be below method.ptn.max_steps=500"),
    ([RUN, "method.ptn.fixed_step=[]"], "method.ptn.fixed_step: an empty list of steps"),
    ([RUN, "method.importance.order=random"], "method.importance.order='random': must be one of ['by_label',"),
    ([RUN, "method.importance.batch_size=0"], "method.importance.batch_size=0: must be an integer >= 1"),
    ([RUN, "method.importance.retain_samples=0"], "method.importance.retain_samples=0: must be an integer >= 1"),
    ([RUN, "method.synthesis.sizes=[0,2]"], "method.synthesis.sizes=[0, 2]: must be a list of integers >= 1"),
    ([RUN, "method.synthesis.min_flip_rate=2"], "method.synthesis.min_flip_rate=2: must be a finite number >= 0"),
    ([RUN, "method.synthesis.samples=0"], "method.synthesis.samples=0: must be an integer >= 1"),
    ([RUN, "method=ssd", "method.alpha=0"], "method.alpha=0: must be a finite number > 0"),
    ([RUN, "method=ssd", "method.lam=-1"], "method.lam=-1: must be a finite number > 0"),
    ([RUN, "method=potion_iterative", "method.rounds=0"], "method.rounds=0: must be an integer >= 1"),
    ([RUN, "method=potion_iterative", "method.stop_on=never"], "method.stop_on='never': must be one of ['forget',"),
    ([RUN, "method=potion_iterative", "method.repair.lr=0"], "method.repair.lr=0: must be a finite number > 0"),
    ([RUN, "method=potion_iterative", "method.repair=5"], "method.repair=5: must be a mapping or null"),
    ([RUN, "method=potion_iterative", "method.cutoff_quantile=2"], "method.cutoff_quantile=2: must be a finite"),
    ([RUN, "method=discover_retrain", "method.iterations=0"], "method.iterations=0: must be an integer >= 1 or null"),
    ([RUN, "method=scrub", "method.max_steps=1000"], "method.max_steps=1000: at most one max step per min step"),
    ([RUN, "method=scrub", "method.temperature=0"], "method.temperature=0: must be a finite number > 0"),
    ([RUN, "method=finetune", "method.k=0"], "method.k=0: must be a positive integer or -1 (all layers)"),
    ([RUN, "method=eu_k", "method.k=-1"], "method.k=-1: must be an integer >= 1"),
    ([RUN, "method=bad_teacher", "method.batch_size=1"], "method.batch_size=1: must be an integer >= 2 or null"),
    ([RUN, "method=retrain", "method.schedule=cosine"], "method.schedule='cosine': must be one of ['linear',"),
    ([RUN, "method=retrain", "method.momentum=0", "method.nesterov=true"], "method.nesterov=true needs method"),
    ([RUN, "method=retrain", "+method.extra_forget=[-1]"], "method.extra_forget=[-1]: must be a list of integers"),
    ([RUN, "method=retrain", "+method.bogus=1"], "method.bogus: unknown key; valid keys: name, lr, momentum,"),
    ([RUN, "method=rem", "method.epochs=0"], "method.epochs=0: must be an integer >= 1"),
    ([RUN, "method=rem", "method.lr=0"], "method.lr=0: must be a finite number > 0"),
    ([RUN, "method=rem", "method.mask_share=1.5"], "method.mask_share=1.5: must be a finite number > 0 and <= 1"),
    ([RUN, "method=rem", "method.threshold=-0.1"], "method.threshold=-0.1: must be a finite number >= 0 and <= 1"),
    ([RUN, "method=rem", "method.width=0"], "method.width=0: must be a finite number > 0"),
    ([RUN, "method=rem", "method.select=best"], "method.select='best': must be one of ['proxy', 'last']"),
    ([RUN, "method=rem", "method.augment=yes"], "method.augment='yes': must be true or false"),
    ([RUN, "method=rem", "method.tap_modules=features"], "method.tap_modules='features': must be a list of strings"),
    ([RUN, "method=rem", "method.tap_modules=[]"], "method.tap_modules=[]: name at least one module"),
    ([RUN, "hydra/launcher=nosuch"], "hydra/launcher=nosuch: no such option in group 'hydra/launcher'"),
    # +train.* names the training run (trained first if missing): its config is checked before anything starts
    (["+train.experiment=quickstart", "+train.train.epochs=abc"], "+train: train.epochs='abc': must be a finite"),
    (["+train.experiment=quickstart", "+train.poison.count=100"], "+train: poison: set exactly one of poison.count"),
    (["+train=['dataset=imagefolder']"], "+train: dataset.path: required"),
]

HEAL_CASES = [
    ([], "checkpoint: required; your model's weights"),
    (["checkpoint=model.pt", "dataset.path=data"], "discovered: required; a text file with one discovered"),
    ([*HEAL, "method=retrain"],
     "method=retrain: heal runs one of ['assd', 'lfssd', 'potion', 'potion_iterative', 'ssd']"),
    ([*HEAL, "trigger={kind: star}"], "trigger.kind=star: unknown trigger; choose one of ['blend', 'ftrojan',"),
    ([*HEAL, "eval_batch_size=0"], "eval_batch_size=0: must be an integer >= 1"),
    ([*HEAL, "model=resnet9", "model.width=0"], "model.width=0: must be a finite number > 0"),
]

CATALOGUE = ([("train", o, m) for o, m in TRAIN_CASES] + [("unlearn", o, m) for o, m in UNLEARN_CASES]
             + [("heal", o, m) for o, m in HEAL_CASES])


@pytest.mark.parametrize(("name", "overrides", "message"), CATALOGUE, ids=[" ".join(c[1]) or c[0] for c in CATALOGUE])
def test_a_bad_value_is_one_line_naming_it(name: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_command_line(name, overrides)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_good_command_lines_pass() -> None:
    check_command_line("train", ["experiment=cpu_bench", "trainer.devices=auto", "trainer.precision=32"])
    check_command_line("unlearn", ["+train.experiment=quickstart", "+train.poison.count=100",
                                   "+train.poison.fraction=null", "method=ssd"])
    check_command_line("unlearn", [RUN, "method=retrain", "method.momentum=0.5", "method.schedule=constant"])
    check_command_line("heal", [*HEAL, "trigger={kind: patch, size: 3}", "method=ssd"])
    check_command_line("train", ["--cfg", "job", "train.epochs=abc"])  # Hydra's own flags: left to Hydra


def test_every_swept_value_is_checked_before_the_first_job() -> None:
    check_command_line("unlearn", ["-m", RUN, "method=potion,ssd,retrain", "discovery.share=0.1,0.5,1.0"])
    with pytest.raises(ConfigError, match=r"^discovery.share=1.5: "):
        check_command_line("unlearn", ["-m", RUN, "method=potion,ssd", "discovery.share=0.1,0.5,1.5"])
    with pytest.raises(ConfigError, match=r"^method=nosuch: no such option"):
        check_command_line("unlearn", ["--multirun", RUN, "method=potion,nosuch"])


def test_the_out_dir_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    check_creatable_dir(str(tmp_path / "a" / "b"), "out_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_creatable_dir(str(tmp_path / "file" / "run"), "out_dir")


def test_every_registered_method_has_a_schema_of_its_arguments() -> None:
    """A method's schema (its class in the schema, else one made from its signature) has exactly its keyword
    arguments, and its defaults live in the YAML and the schema only (a default in the signature would be a second
    copy)."""
    from potion.unlearning.methods import METHODS

    for name, info in METHODS.items():
        params = dict(inspect.signature(info.fn).parameters)
        params.pop("task")
        fields = set(inspect.signature(variant_of(Method, {"name": name})).parameters) - {"name"}
        assert fields == set(params), name
        assert [p for p, v in params.items() if v.default is not inspect.Parameter.empty] == [], name


@pytest.mark.parametrize("capability", ["ptn", "heal_ok", "changes_model", "dampens", "iterative", "trains"])
def test_the_torch_free_checks_read_what_the_registry_holds(capability: str) -> None:
    """heal's method check and the PTN sweeper read the ``@register`` lines (no torch); importing the methods
    registers the same names with the same capabilities."""
    from potion.unlearning.methods import method_names
    from potion.unlearning.registry import declared_names

    assert declared_names(**{capability: True}) == method_names(**{capability: True})
    assert declared_names(**{capability: False}) == method_names(**{capability: False})
    assert heal_methods() == method_names(heal_ok=True) == ["assd", "lfssd", "potion", "potion_iterative", "ssd"]


def test_every_registered_model_has_a_schema_and_is_checked_by_it() -> None:
    """build_model checks its arguments with the schema: also a run folder's config.yaml, never composed by Hydra."""
    from potion.config.schema import Model
    from potion.models import MODELS, build_model

    assert set(Model.VARIANTS) == set(MODELS)
    with pytest.raises(ConfigError, match=r"^model.depth: unknown key; valid keys: name, width$"):
        build_model("resnet9", num_classes=10, in_channels=3, width=0.5, depth=3)
    with pytest.raises(ConfigError, match=r"^model.width='1': must be a finite number > 0$"):
        build_model("resnet9", num_classes=10, in_channels=3, width="1")


def test_method_arguments_fill_what_the_yaml_leaves_out() -> None:
    args = method_arguments({"name": "scrub", "alpha": 1.0, "iterations": 5})
    assert args == {"alpha": 1.0, "iterations": 5}  # required keys (conf/blocks/sgd.yaml's too) are the YAML's to give
    # nested blocks too: a run folder's config written before synthesis.additive existed
    older = {"enabled": True, "max_discovered": 10, "samples": 500, "min_flip_rate": 0.5, "sizes": [3]}
    synthesis = method_arguments({"name": "potion", "synthesis": older})["synthesis"]
    assert synthesis == {**older, "additive": True, "additive_min_discovered": 5, "invert_steps": 60}
    assert method_arguments({"name": "potion_iterative", "repair": None})["repair"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["logger=none", "unlearn.method.ptn.rho=5"], "error: method.ptn.rho=5: must be a finite number >= 0 and <= 1"),
    (["train.epochs=abc"], "error: train.epochs='abc': must be a finite number > 0 or null"),
])
def test_the_quickstart_checks_both_configs_before_training(args: list[str], message: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from potion import quickstart

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        quickstart.main(args)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- the CLI

CLI = [
    (["train.py", "train.epochs=abc"], "error: train.epochs='abc': must be a finite number > 0 or null"),
    (["train.py", "trainer.precision=banana"], "error: trainer.precision='banana': must be one of"),
    (["train.py", "-m", "train.epochs=1,abc"], "error: train.epochs='abc': must be"),
    (["unlearn.py", "method=nosuch"], "error: method=nosuch: no such option in group 'method'; choose one of"),
    (["unlearn.py", RUN, "method.ptn.rho=5"], "error: method.ptn.rho=5: must be a finite number >= 0 and <= 1"),
    (["sweep.py", RUN, "hydra/launcher=nosuch"], "error: hydra/launcher=nosuch: no such option in group"),
    (["-m", "potion.heal", *HEAL, "method=retrain"], "error: method=retrain: heal runs one of"),
]


@pytest.mark.parametrize(("args", "line"), CLI, ids=[" ".join(c[0]) for c in CLI])
def test_the_command_fails_in_one_line_without_importing_torch(args: list[str], line: str, tmp_path: Path,
                                                              cache: Path) -> None:
    script = [str(ROOT / args[0])] if args[0].endswith(".py") else args[:2]
    rest = args[1:] if args[0].endswith(".py") else args[2:]
    env = dict(os.environ)  # with the test's own POTION_CACHE_DIR (the cache fixture)
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", *script, *rest], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    imports = [x.rsplit("|", 1)[-1].strip() for x in proc.stderr.splitlines() if x.startswith("import time:")]
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == [lines[0]] and lines[0].startswith(line), lines
    assert proc.stdout == ""
    heavy = [m for m in imports if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning", "mlflow")]
    assert heavy == [], heavy[:5]
    assert list(tmp_path.iterdir()) == [], "a rejected command wrote something"
    assert seconds < 30, seconds  # ~0.5 s on an idle machine: Hydra and the schema, nothing heavy


def test_an_override_naming_a_hydra_job_value_is_left_to_the_job() -> None:
    """``out_dir=/x/${hydra:job.num}`` resolves only inside a job: the pre-Hydra check must not refuse it."""
    from potion.config.compose import check_command_line

    check_command_line("unlearn", ["-m", "train_run=/nowhere", "method=potion,ssd", "out_dir=/tmp/x/${hydra:job.num}"])
