"""The config schema: one dataclass per config group (and per method), with every value's type and range.

This module is the one place that says what a config value may be. The YAML files under ``conf/`` hold the
defaults a user sees; :func:`potion.config.compose.check_config` checks a composed config against the classes here
before any data is read or any heavy framework is imported.

How to read a class:

* A field without a default is required: the composed config must hold the key (the group's YAML sets it).
  A field with a default is optional: a user may add it (``+dataset.train_size=10000``); the default is the value
  meaning "not given" that :func:`potion.config.compose.method_arguments` passes on.
* Types are the annotations (``int`` means an integer, not a bool; ``float`` accepts integers; ``X | None``
  accepts null; ``Literal`` lists the choices). Ranges are :func:`num` bounds, applied to every element of
  a list.
* ``relations`` (optional) checks what involves more than one value and yields one message per problem.
* ``OPEN = True`` lets a class hold keys it does not list (loosely typed, checked by their owner).
* Groups whose options are different shapes (``model``, ``method``, ``poison.trigger``) derive from :class:`Named`
  and pick their class by ``name`` (``kind``) from ``VARIANTS``, else from what the modules of ``DECLARED`` declare
  (:mod:`potion.core.declared`: a method's parameters, a trigger kind's fields), read without importing them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal, get_args

from potion.core.declared import declared


def num(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, help: str = "") -> Any:
    """A field with a range (``ge``/``gt`` below, ``le``/``lt`` above) and an optional hint for a missing value."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": meta, "help": help})


def text(default: Any = MISSING, *, help: str = "", directory: bool = False, identity: bool = True) -> Any:
    """A string field; ``directory``: a folder this command will create, so its parent must be writable."""
    return field(default=default, metadata={"help": help, "directory": directory, "identity": identity})


def run_only(default: Any = MISSING) -> Any:
    """How a command runs (where it writes, whether it resumes, how it logs and shows progress), not what it
    computes: outside a run's identity (:func:`potion.config.compose.identity_hash`)."""
    return field(default=default, metadata={"identity": False})


def _unset(value: Any) -> bool:
    return value in (None, "", "???")


# ------------------------------------------------------------------------------------------ training groups


@dataclass(kw_only=True)
class Dataset:
    """conf/dataset: where the images come from."""

    name: str
    source: Literal["cifar10", "cifar100", "imagefolder", "digits"]
    path: str | None = text(help="a folder or .tar.gz archive with train/<class>/* and test/<class>/*")
    download: bool
    image_size: int | None = num(ge=1)
    mean: list[float] | None
    std: list[float] | None = num(gt=0)
    # What reading a tar archive may expand to (potion.data.sources.ArchiveLimits); null = its default.
    archive_max_member_mb: float | None = num(None, gt=0)
    archive_max_total_gb: float | None = num(None, gt=0)
    archive_max_members: int | None = num(None, ge=1)
    # a seeded, class-balanced subset of the training split (the study's CPU tier); null = all of it
    train_size: int | None = num(None, ge=2)
    subset_seed: int = num(0, ge=0)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d["source"] == "imagefolder" and _unset(d.get("path")):
            yield "dataset.path: required for dataset=imagefolder (a folder or a .tar.gz archive)"
        for key in ("mean", "std"):
            if d.get(key) is not None and len(d[key]) not in (1, 3):
                yield f"dataset.{key}={d[key]}: give one value per channel (1 or 3)"


@dataclass(kw_only=True)
class Named:
    """A group whose options are different shapes (model, method): the class is picked by ``name``."""

    VARIANTS: ClassVar[dict[str, type]] = {}  # each group sets its own
    HINT: ClassVar[str] = ""  # what else ``name`` accepts, for the error message
    KEY: ClassVar[str] = "name"  # the key that picks the class
    DECLARED: ClassVar[tuple[str, str] | None] = None  # (package, decorator) declaring the other options

    @classmethod
    def variant(cls, name: Any) -> type | None:
        """The class registered as ``name`` (None if unknown)."""
        return cls.VARIANTS.get(name)


@dataclass(kw_only=True)
class Model(Named):
    """conf/model: the architecture; the class is picked by ``model.name``."""

    VARIANTS: ClassVar[dict[str, type]] = {}
    HINT: ClassVar[str] = " or torchvision:<name>"
    name: str

    @classmethod
    def variant(cls, name: Any) -> type | None:
        """The class of the model called ``name`` (None if unknown)."""
        if isinstance(name, str) and name.startswith("torchvision:"):
            return TorchvisionModel
        return super().variant(name)


@dataclass(kw_only=True)
class ResNet9(Model):
    width: float = num(gt=0)


@dataclass(kw_only=True)
class SmallCNN(Model):
    width: int = num(ge=1)


@dataclass(kw_only=True)
class WideResNet(Model):
    depth: int = num(ge=10)
    widen_factor: int = num(ge=1)
    dropout: float = num(0.0, ge=0, lt=1)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if (d["depth"] - 4) % 6:
            yield f"model.depth={d['depth']}: must be 6n+4 with n >= 1 (e.g. 16, 22, 28)"


@dataclass(kw_only=True)
class TorchvisionModel(Model):
    """``model.name=torchvision:<name>``: its keyword arguments are torchvision's."""

    OPEN: ClassVar[bool] = True


Model.VARIANTS.update(resnet9=ResNet9, small_cnn=SmallCNN, wrn=WideResNet, wrn28x10=WideResNet)

@dataclass(kw_only=True)
class TriggerConfig(Named):
    """poison.trigger: the class is picked by ``kind`` from the kinds potion/data/triggers/<kind>.py declare
    (their settings, defaults and size-free ranges); the rules that need the image size run where it is known."""

    KEY: ClassVar[str] = "kind"
    DECLARED: ClassVar[tuple[str, str] | None] = ("potion.data.triggers", "trigger_kind")
    kind: str


@dataclass(kw_only=True)
class Poison:
    """conf/poison: which training samples get the trigger and the target label."""

    count: int | None = num(ge=0)
    fraction: float | None = num(gt=0, lt=1)
    target: int = num(ge=0)
    seed: int = num(ge=0)
    exclude_target: bool
    mapping: Literal["all_to_one", "all_to_all"] = "all_to_one"
    trigger: TriggerConfig

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d["trigger"]["kind"] == "none":
            return  # nothing is poisoned: an experiment's count or fraction is reset (pipelines.reference)
        if (d.get("count") is None) == (d.get("fraction") is None):
            yield "poison: set exactly one of poison.count (e.g. 500) or poison.fraction (e.g. 0.01); null the other"
        elif d.get("count") == 0 and d["trigger"]["kind"] != "none":
            yield "poison.count=0: must be >= 1 (poison=none trains the clean reference model)"


# The pl.Trainer arguments train.py derives from the config; every other one may be given in trainer.lightning.
POTION_TRAINER_ARGS = frozenset({
    "accelerator", "devices", "strategy", "precision", "max_steps", "max_epochs", "logger", "callbacks", "plugins",
    "enable_progress_bar", "enable_model_summary", "num_sanity_val_steps", "limit_val_batches", "deterministic",
    "benchmark", "default_root_dir", "log_every_n_steps"})


@dataclass(kw_only=True)
class Trainer:
    """conf/trainer: Lightning's device settings (the unlearning runs use the accelerator only)."""

    accelerator: Literal["cpu", "gpu", "cuda", "auto", "mps"]
    devices: int | str
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_notebook", "ddp_find_unused_parameters_true", "fsdp",
                      "deepspeed", "single_device"]
    precision: Literal["64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "64", "32", "16",
                       "bf16", 64, 32, 16, "auto"]  # auto: by what the machine can do (potion/core/precision.py)
    channels_last: bool | Literal["auto"]
    progress_bar: bool | Literal["auto"] = run_only()  # auto: a terminal and not a multirun job (core/progress.py)
    deterministic: bool
    benchmark: bool
    lightning: dict[str, Any] = field(default_factory=dict)  # more ``pl.Trainer`` arguments for train.py, as given

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        for key in sorted(set(d.get("lightning") or {}) & POTION_TRAINER_ARGS):
            yield (f"trainer.lightning.{key}: train.py sets this pl.Trainer argument itself (trainer.<key>, train.* "
                   "and the run folder say it)")
        devices = d["devices"]
        if devices != "auto" and (isinstance(devices, str) or (devices != -1 and devices < 1)):
            yield f"trainer.devices={devices!r}: give a device count >= 1, -1 (all devices) or auto"


@dataclass(kw_only=True)
class Logger:
    """conf/logger: the MLflow tracking store."""

    name: Literal["mlflow", "none"]
    tracking_uri: str | None
    fallback: Literal["none", "local"]
    experiment: str | None  # null: the study (potion.tracking.naming.study_name)
    timeout_s: float | None = num(60.0, gt=0)  # one server call gives up after ~this long (potion.tracking.tracker)
    system_metrics: bool = False  # MLflow's system metrics monitor (CPU, memory, disk, network, GPU) on every run
    system_metrics_interval_s: float = num(10.0, gt=0)  # how often it samples


@dataclass(kw_only=True)
class Train:
    """train.yaml's ``train`` section: the optimisation schedule and evaluation during training."""

    batch_size: int = num(ge=1)
    iterations: int | None = num(ge=1)
    epochs: float | None = num(gt=0)
    lr: float = num(gt=0)
    momentum: float = num(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = num(ge=0)
    warmup: float = num(ge=0, lt=1)
    label_smoothing: float = num(ge=0, lt=1)
    crop_padding: int = num(ge=0)
    flip: bool
    trigger_in_files: bool
    eval_batch_size: int = num(ge=1)
    epoch_eval: bool
    epoch_eval_samples: int = num(ge=1)
    checkpoint_every_n_steps: int | None = num(ge=1)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d.get("iterations") is None and d.get("epochs") is None:
            yield "train: set train.epochs (> 0) or train.iterations (>= 1)"
        if d["nesterov"] and d["momentum"] == 0:
            yield "train.nesterov=true needs train.momentum > 0"


@dataclass(kw_only=True)
class TrainConfig:
    """conf/train.yaml: train a poisoned model."""

    seed: int = num(ge=0)
    resume: bool = run_only()
    force: bool = run_only()
    out_dir: str | None = text(directory=True, identity=False)
    name: str
    train: Train
    dataset: Dataset
    model: Model
    poison: Poison
    trainer: Trainer
    logger: Logger = run_only()


# ---------------------------------------------------------------------------------------- unlearning groups


@dataclass(kw_only=True)
class DiscoveryConfig:
    """conf/discovery: how many of the poisoned samples were found."""

    share: float | None = num(gt=0, le=1)
    count: int | None = num(ge=1)
    seed: int = num(ge=0)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d.get("share") is None and d.get("count") is None:
            yield "discovery: set discovery.share (in (0, 1]) or discovery.count (in [1, n_p])"


@dataclass(kw_only=True)
class Importance:
    """method.importance: how the retain and forget importances are computed."""

    batch_size: int = num(ge=1)
    order: Literal["by_label", "shuffled"]
    retain_samples: int | None = num(ge=1)
    cache: bool


Criterion = Literal["auto", "all", "exclude_natural_target"]
PTN_CRITERIA: tuple[str, ...] = get_args(Criterion)


@dataclass(kw_only=True)
class PTN:
    """method.ptn: the search for the assumed poisoned share (method.md §3)."""

    rho: float = num(ge=0, le=1)
    s_start: float | None = num(gt=0)
    s_step: float = num(gt=1)
    max_steps: int = num(ge=1)
    criterion: Criterion
    measure: Literal["decisive", "full"] = "decisive"  # how far a scanned step is measured (ptn_search's decide)
    fixed_step: int | list[int] | None = num(ge=0)
    max_acc_loss: float | None = num(None, gt=0, le=100)  # the guard (potion.unlearning.ptn_guard); None = off
    guard_samples: int = num(1024, ge=1)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        fixed = d.get("fixed_step")
        steps = fixed if isinstance(fixed, list) else [] if fixed is None else [fixed]
        if isinstance(fixed, list) and not fixed:
            yield "method.ptn.fixed_step: an empty list of steps"
        for k in steps:
            if k >= d["max_steps"]:
                yield f"method.ptn.fixed_step={k}: must be below method.ptn.max_steps={d['max_steps']}"


@dataclass(kw_only=True)
class Synthesis:
    """method.synthesis: trigger synthesis for tiny discovered sets."""

    enabled: bool
    max_discovered: int = num(ge=0)
    samples: int = num(ge=1)
    min_flip_rate: float = num(ge=0, le=1)
    sizes: list[int] = num(ge=1)
    additive: bool = True  # estimate image-wide additive triggers (blend, sig, ftrojan) from several samples
    additive_min_discovered: int = num(ge=2, default=5)
    invert_steps: int = num(ge=0, default=60)  # fewer discovered and no patch: invert an additive trigger (0 = off)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if not d["sizes"]:
            yield "method.synthesis.sizes: give at least one window size"


@dataclass(kw_only=True)
class Repair:
    """method.repair of potion_iterative: the short fine-tune after the last round."""

    iterations: int = num(ge=0)
    lr: float = num(gt=0)


@dataclass(kw_only=True)
class Method(Named):
    """conf/method: a registered method's name and its arguments; the class is picked by ``method.name``.

    A method with a class here gets its ranges checked; any other gets its keys and types from its signature.
    """

    VARIANTS: ClassVar[dict[str, type]] = {}
    DECLARED: ClassVar[tuple[str, str] | None] = ("potion.unlearning", "register")
    name: str


@dataclass(kw_only=True)
class SSD(Method):
    alpha: float = num(gt=0)
    lam: float = num(gt=0)
    importance: Importance


@dataclass(kw_only=True)
class PTNMethod(Method):
    """potion, assd, lfssd: importances, percentile rule and PTN."""

    importance: Importance
    ptn: PTN
    synthesis: Synthesis


PotionLoss = Literal["auto", "logit_norm", "ce"]


@dataclass(kw_only=True)
class Potion(PTNMethod):
    """potion and the methods that run Potion rounds: the importance loss is a choice (potion.unlearning.ssd_family)."""

    loss: PotionLoss


@dataclass(kw_only=True)
class SuspectCutoff(Potion):
    cutoff_quantile: float = num(ge=0, le=1)
    cutoff_fraction: float = num(gt=0)
    signature: bool
    target_only: bool


@dataclass(kw_only=True)
class PotionIterative(SuspectCutoff):
    rounds: int = num(ge=1)
    stop_on: Literal["forget", "discovered"]
    repair: Repair | None


@dataclass(kw_only=True)
class DiscoverRetrain(SuspectCutoff):
    iterations: int | None = num(ge=1)


@dataclass(kw_only=True)
class SGD(Method):
    """SGD settings of the training-based baselines (conf/blocks/sgd.yaml); null = the training run's value."""

    lr: float | None = num(gt=0)
    momentum: float | None = num(ge=0, lt=1)
    weight_decay: float | None = num(ge=0)
    nesterov: bool | None
    warmup: float | None = num(ge=0, lt=1)
    batch_size: int | None = num(ge=1)
    schedule: Literal["linear", "constant"]
    augment: bool

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d.get("nesterov") is True and d.get("momentum") == 0:
            yield "method.nesterov=true needs method.momentum > 0"


@dataclass(kw_only=True)
class Retrain(SGD):
    iterations: int | None = num(ge=1)
    label_smoothing: float | None = num(ge=0, lt=1)
    extra_forget: list[int] | None = num(ge=0)


@dataclass(kw_only=True)
class EUk(SGD):
    k: int = num(ge=1)
    iterations: int = num(ge=1)
    label_smoothing: float | None = num(ge=0, lt=1)


@dataclass(kw_only=True)
class Finetune(SGD):
    k: int
    iterations: int = num(ge=1)
    label_smoothing: float | None = num(ge=0, lt=1)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        yield from SGD.relations(d)
        if d["k"] != -1 and d["k"] < 1:
            yield f"method.k={d['k']}: must be a positive integer or -1 (all layers)"


@dataclass(kw_only=True)
class Scrub(SGD):
    alpha: float = num(ge=0)
    gamma: float = num(ge=0)
    temperature: float = num(gt=0)
    max_steps: int = num(ge=0)
    iterations: int = num(ge=1)
    lr: float = num(gt=0)
    momentum: float = num(ge=0, lt=1)
    weight_decay: float = num(ge=0)
    nesterov: bool
    forget_batch_size: int | None = num(ge=1)

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        yield from SGD.relations(d)
        if d["max_steps"] > d["iterations"]:
            yield (f"method.max_steps={d['max_steps']}: at most one max step per min step "
                   f"(method.iterations={d['iterations']}); lower max_steps or raise iterations")


@dataclass(kw_only=True)
class BadTeacher(SGD):
    iterations: int = num(ge=1)
    lr: float = num(gt=0)
    temperature: float = num(gt=0)
    forget_share: float | None = num(gt=0, lt=1)
    batch_size: int | None = num(ge=2)


@dataclass(kw_only=True)
class REM(Method):
    """rem (potion/unlearning/rem.py): NPO removal plus redirection into added, discarded units."""

    epochs: int = num(ge=1)
    lr: float = num(gt=0)
    momentum: float = num(ge=0, lt=1)
    weight_decay: float = num(ge=0)
    batch_size: int | None = num(ge=1)
    beta: float = num(gt=0)
    threshold: float = num(ge=0, le=1)
    max_flush: int = num(ge=0)
    width: float = num(gt=0)
    mask_share: float = num(gt=0, le=1)
    taps: int = num(ge=1)
    tap_modules: list[str] | None
    augment: bool
    select: Literal["proxy", "last"]

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if d.get("tap_modules") == []:
            yield "method.tap_modules=[]: name at least one module, or null for the stage outputs"


Method.VARIANTS.update(
    ssd=SSD, potion=Potion, assd=PTNMethod, lfssd=PTNMethod, potion_iterative=PotionIterative,
    discover_retrain=DiscoverRetrain, retrain=Retrain, eu_k=EUk, finetune=Finetune, scrub=Scrub,
    bad_teacher=BadTeacher, rem=REM)


@dataclass(kw_only=True)
class Suspects:
    """Suspect ranking after healing (unlearn.yaml, heal.yaml)."""

    enabled: bool
    signature: bool
    target_only: bool


@dataclass(kw_only=True)
class Attack:
    """attack: what the user declares about the attack (unlearn.yaml, heal.yaml); null = inferred from the
    discovered samples (potion.unlearning.attack). The benchmark's own poison plan never fills it in."""

    target: int | None = num(ge=0)
    mapping: Literal["all_to_one", "all_to_all"] | None
    clean_label: bool | None


TRAIN_RUN_HELP = ("give a training run folder (printed by train.py), mlflow:<run id>, "
                  "or train overrides (+train.experiment=quickstart)")


@dataclass(kw_only=True)
class UnlearnConfig:
    """conf/unlearn.yaml: heal a poisoned model from a training run."""

    train_run: str | None
    train: dict[str, Any] | list[str] | None
    seed: int = num(ge=0)
    force: bool = run_only()
    out_dir: str | None = text(directory=True, identity=False)
    save_weights: bool
    eval_batch_size: int = num(ge=1)
    reference: Literal["auto", "train", "off"] = "auto"  # the clean reference model for healed_attainable
    attack: Attack
    suspects: Suspects
    discovery: DiscoveryConfig
    method: Method
    trainer: Trainer
    logger: Logger = run_only()
    ptn_job: dict[str, Any] | None = None  # added by the PTN sweeper to its jobs
    skip_logged: bool = run_only(False)  # a study's cells: skip one whose finished run of this commit is in the store

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        if _unset(d.get("train_run")) and not d.get("train"):
            yield f"train_run: required; {TRAIN_RUN_HELP}"


@dataclass(kw_only=True)
class SweeperConfig:
    """hydra/sweeper=ptn (hydra_plugins/potion_ptn): candidate steps launched per round, and per job."""

    batch_size: int = num(ge=1)
    steps_per_job: int | None = num(ge=1)  # null: a whole round per job


@dataclass(kw_only=True)
class HealConfig:
    """conf/heal.yaml: heal a model trained anywhere with a list of discovered files."""

    checkpoint: str = text(help="your model's weights: a state dict saved with torch.save (.pt/.pth) "
                                "or a .safetensors file")
    discovered: str = text(help="a text file with one discovered training file per line (train/<class>/<file>) "
                                "or a CSV with a `path` column")
    out_dir: str | None = text(directory=True, identity=False)
    force: bool = run_only(False)  # start over in another heal's out_dir
    trigger: TriggerConfig | None
    attack: Attack
    seed: int = num(ge=0)
    eval_batch_size: int = num(ge=1)
    suspects: Suspects
    dataset: Dataset
    model: Model
    method: Method
    trainer: Trainer
    logger: Logger = run_only()

    @staticmethod
    def relations(d: Mapping[str, Any]) -> Iterator[str]:
        name = d["method"]["name"]
        if name not in (heal := heal_methods()):
            yield (f"method={name}: heal runs one of {heal} (training-based baselines need the "
                   "original training recipe; use unlearn.py for those)")


def heal_methods() -> list[str]:
    """The methods declared ``heal_ok`` (``@register(..., heal_ok=True)``: the model and the data are enough)."""
    return sorted(n for n, d in declared(*Method.DECLARED).items() if d.options.get("heal_ok"))


ROOTS: dict[str, type] = {"train": TrainConfig, "unlearn": UnlearnConfig, "heal": HealConfig}
