"""The one naming scheme of potion's MLflow runs: experiments, run names, tags, parameter keys, metric names.

Every run type (train, unlearn, PTN sweep parent, candidate and final run, heal) takes its names from here, so the
same setting has the same key everywhere and the runs of one study compare column by column in the MLflow UI: one
experiment per study (:func:`study_name`), run names that tell a grid's runs apart (:func:`unlearn_run_name`),
params that are settings only, under their config path (those a method resolved at run time too; no bookkeeping
keys), metrics that are measurements only, in one unit convention (README, Metrics), and the ``potion.*`` tags.
Torch-free, so the sweeper (which never imports torch) uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from potion.config.compose import NON_IDENTITY_KEYS
from potion.core.io import plain

# --------------------------------------------------------------------------- tags

TASK = "potion.task"
STUDY = "potion.study"
GRID = "potion.grid"
SWEEP_ID = "potion.sweep_id"
TRAIN_RUN_ID = "potion.train_run_id"
TRAIN_CONFIG_HASH = "potion.train_config_hash"
METHOD = "potion.method"
CONFIG_HASH = "potion.config_hash"
# the last commit that changed the code (potion/, conf/, the entry scripts, pyproject.toml), with that code unchanged
# in the checkout: what a study cell is matched by (committing the study's store moves HEAD, not the code)
CODE_COMMIT = "potion.code_commit"
TRAIN, UNLEARN, SWEEP, CANDIDATE, HEAL = "train", "unlearn", "ptn_sweep", "ptn_candidate", "heal"

TRAJECTORY_PREFIX = "ptn_traj_"  # the PTN trajectory series, in process and on a sweep's parent run

# Top-level keys of a training config that are never params: those outside a run's identity, and the name (the
# study, i.e. the experiment).
NOISE_KEYS = (*NON_IDENTITY_KEYS, "name")

# Numeric method diagnostics that are settings (resolved at run time), as the param key they are logged under.
SETTING_DIAGNOSTICS = {"ptn_threshold": "method.ptn.threshold", "suspect_cutoff": "suspects.cutoff",
                       "retain_importance_samples": "method.importance.retain_samples_used",
                       # the synthetic forget samples a method made and the trigger window it recovered
                       "synth_samples": "method.synthesis.samples_used", "synth_size": "method.synthesis.window_size",
                       "synth_row": "method.synthesis.window_row", "synth_col": "method.synthesis.window_col",
                       "synth_additive": "method.synthesis.additive_used",
                       # the SGD steps of each kind a training-based method ran (its iterations, split)
                       **{f"{k}_steps": f"method.sgd.{k}_steps" for k in ("retain", "max", "min", "distill")}}
SGD_PREFIX, SGD_PARAMS = "sgd_", "method.sgd"  # the SGD settings a training-based method ran with (sgd_lr)
# -> method.sgd.lr
# Method settings whose config value ``auto`` a method resolves at run time, as the diagnostic that reports the
# value it chose: the param is logged once, with the resolved value (never ``auto``).
RESOLVED_AT_RUN = {"method.loss": "importance_loss", "method.ptn.criterion": "ptn_criterion"}

# Summary entries that are bookkeeping or counts logged as params, never metrics (a folder logged from its summary).
SUMMARY_ONLY = ("n_f", "n_p", "target", "num_classes", "channels", "steps", "epochs", "resumed", "reused",
                "mlflow_run_id", "train_mlflow_run_id", "config_hash")

# Heal's summary names what it measured after healing with an _after suffix; as metrics they read as unlearn's.
HEAL_METRIC_NAMES = {"clean_acc_after": "clean_acc", "asr_after": "asr", "poison_acc_after": "poison_acc",
                     "discovered_given_label_after": "forget_acc",
                     "discovered_given_label_before": "forget_acc_before"}


# --------------------------------------------------------------------------- experiments


def study_name(train_cfg: Mapping[str, Any]) -> str:
    """A training config's study: its ``name`` (``${dataset.name}-${model.name}`` by default)."""
    name = train_cfg.get("name")
    if name not in (None, ""):
        return str(name)
    dataset, model = _get(train_cfg, "dataset.name"), _get(train_cfg, "model.name")
    return f"{dataset}-{model}" if dataset and model else "potion"


def heal_study(heal_cfg: Mapping[str, Any]) -> str:
    """A practitioner's study: ``heal-<data folder name>`` (one experiment per data set healed)."""
    path = str(_get(heal_cfg, "dataset.path") or "").rstrip("/")
    folder = path.rsplit("/", 1)[-1] if path else "data"
    for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if folder.endswith(ext):
            folder = folder[: -len(ext)]
    return f"heal-{folder or 'data'}"


def experiment_name(logger_cfg: Mapping[str, Any] | None, study: str) -> str:
    """The experiment a run logs to: ``logger.experiment`` when set, else its study."""
    given = (logger_cfg or {}).get("experiment")
    return str(given) if given not in (None, "") else study


def logger_for(logger_cfg: Mapping[str, Any] | None, study: str) -> dict[str, Any] | None:
    """The ``logger`` config with its experiment filled in (the study's unless set); None stays None."""
    if logger_cfg is None:
        return None
    return {**plain(logger_cfg), "experiment": experiment_name(logger_cfg, study)}


# --------------------------------------------------------------------------- run names


def attack_label(poison_cfg: Mapping[str, Any] | None) -> str:
    """The attack as its ``poison=`` option reads (a patch trigger is ``badnets``)."""
    kind = str(_get(poison_cfg or {}, "trigger.kind") or "none")
    return "badnets" if kind == "patch" else kind


def discovery_label(discovery_cfg: Mapping[str, Any] | None, n_f: int | None = None) -> str:
    """``d=10%`` for a discovered share, ``d=3`` for a discovered count (which overrides a share)."""
    d = discovery_cfg or {}
    if d.get("count") not in (None, ""):
        return f"d={int(d['count'])}"
    share = d.get("share")
    if share not in (None, ""):
        return f"d={_percent(float(share))}"
    return f"d={n_f}" if n_f is not None else "d=?"


def poison_label(poison_cfg: Mapping[str, Any] | None, n_p: int | None = None) -> str:
    """``p=16`` (poisoned training samples), or ``p=5%`` while only the configured fraction is known."""
    p = poison_cfg or {}
    if n_p is not None:
        return f"p={int(n_p)}"
    if p.get("count") not in (None, ""):
        return f"p={int(p['count'])}"
    if p.get("fraction") not in (None, ""):
        return f"p={_percent(float(p['fraction']))}"
    return "p=?"


def train_run_name(cfg: Mapping[str, Any], extra: Sequence[str] = ()) -> str:
    """``train resnet9 badnets p=1% s=0``: a training run, told apart by model, attack, poison size and seed."""
    parts = ["train", str(_get(cfg, "model.name")), attack_label(cfg.get("poison")), poison_label(cfg.get("poison")),
             f"s={cfg.get('seed')}"]
    return " ".join([*parts, *extra])


def unlearn_run_name(cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], n_f: int | None, n_p: int | None,
                     extra: Sequence[str] = ()) -> str:
    """``potion d=10% p=16 s=0 resnet9 badnets``: method, discovery, poison size, seed, model, attack, then
    ``extra`` (the settings a grid varies, ``rho=0.2``) and, for a fixed PTN step (a sweep's final run), ``k=7``."""
    method = cfg.get("method") or {}
    # the poison size as the training run's name gives it (p=5% or p=500): one spelling per training run
    poison = poison_label(train_cfg.get("poison"))
    parts = [str(method.get("name")), discovery_label(cfg.get("discovery"), n_f),
             poison if poison != "p=?" else poison_label(None, n_p),
             f"s={cfg.get('seed')}", str(_get(train_cfg, "model.name")), attack_label(train_cfg.get("poison")),
             *extra]
    if (k := fixed_step(method)) is not None:
        parts.append(f"k={k}")
    return " ".join(p for p in parts if p)


def fixed_step(method_cfg: Mapping[str, Any]) -> int | None:
    """The one PTN step a run evaluates (``method.ptn.fixed_step=k``: a PTN sweep's final run), else None."""
    fixed = _get(method_cfg, "ptn.fixed_step")
    return fixed if isinstance(fixed, int) and not isinstance(fixed, bool) else None


def sweep_run_name(unlearn_name: str) -> str:
    """The PTN sweep's parent run: ``ptn-sweep`` and what its final run is."""
    return f"ptn-sweep {unlearn_name}"


def candidate_run_name(step: int, unlearn_name: str) -> str:
    """A candidate: its step k first, so a name cut off in the UI still tells candidates apart."""
    return f"k={int(step)} {unlearn_name}"


def heal_run_name(method: str, n_f: int, model: str) -> str:
    """``heal potion d=3 resnet9``: a practitioner's run (d = the number of discovered files)."""
    return f"heal {method} d={int(n_f)} {model}"


# Override keys a run name shows already, or that say how a command runs: left out of the name's extras.
SHOWN_KEYS = ("seed", "method", "method.name", "method.ptn.fixed_step", "discovery", "discovery.share",
              "discovery.count", "poison", "poison.count", "poison.fraction", "model", "model.name", "experiment",
              "dataset", "dataset.path")
UNNAMED_PREFIXES = ("logger", "hydra", "out_dir", "force", "resume", "train_run", "train", "ptn_job", "trainer",
                    "save_weights", "eval_batch_size")


TRAIN_UNNAMED_PREFIXES = tuple(p for p in UNNAMED_PREFIXES if p != "train")  # train.lr is a training run's own


def train_extras(cfg: Mapping[str, Any], overrides: Sequence[str]) -> list[str]:
    """:func:`grid_extras` of a training run: only overrides of its own config's keys (a training run that an
    unlearning job trains first sees that job's ``method.*`` and ``+train.*`` overrides too)."""
    own = [o for o in overrides if _get(cfg, o.lstrip("+~").partition("=")[0]) is not None]
    return grid_extras(own, TRAIN_UNNAMED_PREFIXES)


def grid_extras(overrides: Sequence[str], unnamed: Sequence[str] = UNNAMED_PREFIXES) -> list[str]:
    """The settings a Hydra job's overrides set beyond what the run name shows, as short parts
    (``method.ptn.rho=0.2`` -> ``rho=0.2``), so the runs of a grid over them get distinct names. ``unnamed``: the
    key prefixes left out (an unlearning run's ``+train.*`` names its training run; ``TRAIN_UNNAMED_PREFIXES`` for
    a training run, whose ``train.lr`` is its own)."""
    out = []
    for text in overrides:
        key, sep, value = text.lstrip("+~").partition("=")
        if not sep or "${" in value or "/" in value or key in SHOWN_KEYS:
            continue
        if any(key == p or key.startswith(p + ".") for p in unnamed):
            continue
        out.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return out


# --------------------------------------------------------------------------- params


def train_params(cfg: Mapping[str, Any], n_p: int | None) -> dict[str, Any]:
    """A training run's params: its config without the bookkeeping keys, plus ``poison.n_p``."""
    params = {k: v for k, v in plain(cfg).items() if k not in NOISE_KEYS}
    params["poison"] = {**(params.get("poison") or {}), "n_p": n_p}
    return params


def unlearn_params(cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], n_f: int | None, n_p: int | None
                   ) -> dict[str, Any]:
    """An unlearning run's params (also a sweep's parent, candidates and final run): the training run's data,
    model and poison, and this run's method, discovery, seed, trainer and suspects settings."""
    c, t = plain(cfg), plain(train_cfg)
    params: dict[str, Any] = {
        "dataset": t.get("dataset") or {}, "model": t.get("model") or {},
        "poison": {**(t.get("poison") or {}), "n_p": n_p},
        "method": c.get("method") or {}, "discovery": {**(c.get("discovery") or {}), "n_f": n_f},
        "seed": c.get("seed"),
    }
    params.update({k: c[k] for k in ("trainer", "suspects", "reference", "eval_batch_size") if c.get(k) is not None})
    return without_auto(params)


def heal_params(cfg: Mapping[str, Any], n_f: int, target: int) -> dict[str, Any]:
    """A practitioner's heal run: data set, model, method, discovered count, target class, seed, trainer, suspects."""
    c = plain(cfg)
    params: dict[str, Any] = {"dataset": c.get("dataset") or {}, "model": c.get("model") or {},
                              "method": c.get("method") or {}, "discovery": {"n_f": n_f}, "poison": {"target": target},
                              "checkpoint": c.get("checkpoint"), "seed": c.get("seed")}
    params.update({k: c[k] for k in ("trainer", "suspects") if c.get(k) is not None})
    return without_auto(params)


def resolved_settings(diagnostics: Mapping[str, Any]) -> dict[str, Any]:
    """The settings among a run's diagnostics (see :data:`SETTING_DIAGNOSTICS`, :data:`RESOLVED_AT_RUN`), as flat
    params; give the text diagnostics too (``importance_loss``), or ``method.loss`` is never logged."""
    out: dict[str, Any] = {}
    for key, value in diagnostics.items():
        if key in SETTING_DIAGNOSTICS and _is_number(value):
            out[SETTING_DIAGNOSTICS[key]] = value
        elif key.startswith(SGD_PREFIX):
            out[f"{SGD_PARAMS}.{key[len(SGD_PREFIX):]}"] = value
    for param, key in RESOLVED_AT_RUN.items():
        if isinstance(diagnostics.get(key), str) and diagnostics[key]:
            out[param] = diagnostics[key]
    return out


def without_auto(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the ``auto`` values a method resolves (:data:`RESOLVED_AT_RUN`): logged resolved later
    (an MLflow param cannot change its value once logged)."""
    for dotted in RESOLVED_AT_RUN:
        *path, last = dotted.split(".")
        node: Any = params
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last) == "auto":
            _set(params, path, {k: v for k, v in node.items() if k != last})
    return params


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        tree[part] = dict(tree[part])
        tree = tree[part]
    tree[path[-1]] = value


def measurements(values: Mapping[str, Any], method_cfg: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The measurements among a run's numbers: settings (resolved ones, or a method key such as SSD's alpha,
    already a param) and non-numbers left out; booleans as 0/1."""
    method_keys = set(method_cfg or ())
    out: dict[str, float] = {}
    for key, value in values.items():
        if key in SETTING_DIAGNOSTICS or key.startswith(SGD_PREFIX) or key in method_keys or not _is_number(value):
            continue
        out[key] = float(value)
    return out


def heal_measurements(values: Mapping[str, Any], method_cfg: Mapping[str, Any] | None = None) -> dict[str, float]:
    """A heal run's measurements under unlearn's names (``clean_acc_after`` -> ``clean_acc``)."""
    return {HEAL_METRIC_NAMES.get(k, k): v for k, v in measurements(values, method_cfg).items()}


CANDIDATE_METRICS = {"s": "ptn_s", "percentile": "ptn_percentile", "alpha": "ptn_alpha",
                     "dampened_share": "ptn_dampened_share", "forget_acc": "ptn_forget_acc", "a0": "ptn_a0",
                     "qualifies": "ptn_qualifies"}


def candidate_measurements(values: Mapping[str, Any]) -> dict[str, float]:
    """A PTN candidate job's values as metrics, named as an unlearning run names its chosen step's
    (``ptn_forget_acc``, ``ptn_alpha``, ...); its step and threshold are params."""
    return measurements({CANDIDATE_METRICS.get(k, k): v for k, v in values.items()
                         if k not in ("step", "threshold")})


def trajectory_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """One PTN trajectory row (step, s, percentile, alpha, dampened_share, forget_acc) as ``ptn_traj_*`` values."""
    return {f"{TRAJECTORY_PREFIX}{k}": float(v) for k, v in row.items() if k != "step" and _is_number(v)}


# --------------------------------------------------------------------------- tags


def study_tags(task: str, study: str) -> dict[str, str]:
    """The tags every run carries: its task and study."""
    return {TASK: task, STUDY: study}


def train_link_tags(train_summary: Mapping[str, Any]) -> dict[str, str]:
    """The link to the training run a run derives from: its MLflow id (where it has one) and config hash."""
    tags = {}
    if train_summary.get("mlflow_run_id"):
        tags[TRAIN_RUN_ID] = str(train_summary["mlflow_run_id"])
    if train_summary.get("config_hash"):
        tags[TRAIN_CONFIG_HASH] = str(train_summary["config_hash"])
    return tags


def hydra_job() -> tuple[str | None, list[str]]:
    """This process's Hydra multirun job: (its multirun folder or None, the job's command-line overrides).

    Outside a multirun: (None, []): a single command's run is told apart by its name's fixed parts, a grid's
    runs also by the settings their overrides set. The PTN sweeper's jobs get no multirun folder (their runs are
    grouped by ``potion.sweep_id``) and lose the sweeper's own overrides, so their names read as the sweep's.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None, []
    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    if getattr(hc, "mode", None) != RunMode.MULTIRUN:
        return None, []
    given = [str(o) for o in (hc.overrides.task or ())]
    overrides = [o for o in given if not o.lstrip("+~").startswith("ptn_job")]
    return (str(hc.sweep.dir) if len(overrides) == len(given) else None), overrides


def grid_tags(sweep_dir: str | None) -> dict[str, str]:
    """``potion.grid``: the Hydra multirun folder every job of one ``-m`` command shares."""
    return {GRID: sweep_dir} if sweep_dir else {}


# --------------------------------------------------------------------------- helpers


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "get"):
            return None
        node = node.get(part)
        if node is None:
            return None
    return node


def _percent(fraction: float) -> str:
    return f"{round(100 * fraction, 4):g}%"


def _is_number(value: Any) -> bool:
    """Ints, floats and booleans (0/1); NaN counts (MLflow stores it, and it flags an undefined value)."""
    return isinstance(value, int | float)
