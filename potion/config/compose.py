"""Config handling: compose (Hydra), check against the schema (:mod:`potion.config.schema`), hash, convert.

Everything here is torch-free, so a command checks its whole config before anything heavy is imported:
:func:`check_config` walks a composed config against the schema classes and raises one
:class:`~potion.core.errors.ConfigError` naming the key, the value and what is allowed; :func:`compose_config`
turns Hydra's own composition errors (unknown option, unknown key, unparsable override) into the same.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import os
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from potion.config.schema import ROOTS, Method, Named, num, text
from potion.core.declared import declared
from potion.core.errors import ConfigError
from potion.core.io import plain, sha256_json

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _run_only_paths(schema: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The paths of the schema's ``run_only`` settings (how a command runs, not what it computes)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.metadata.get("identity") is False:
            yield (*prefix, f.name)
        elif dataclasses.is_dataclass(block := hints[f.name]):
            yield from _run_only_paths(block, (*prefix, f.name))  # type: ignore[arg-type]


# Outside a run's identity: every command's run-only settings (schema metadata) and Hydra's own node.
RUN_ONLY_PATHS = tuple(sorted({("hydra",), *(p for root in ROOTS.values() for p in _run_only_paths(root))}))
# The top-level ones: never a training run's params either.
NON_IDENTITY_KEYS = tuple(p[0] for p in RUN_ONLY_PATHS if len(p) == 1)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from a DictConfig or mapping; an unresolvable value is a ConfigError."""
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_full_key(exc) or 'config'}: {_first_line(getattr(exc, 'msg', str(exc)))}") from None
    return dict(cfg)


def identity_hash(cfg: Any, extra_exclude: tuple[str, ...] = ()) -> str:
    """Content hash of the settings that determine a run's result (12 hex chars)."""
    d = to_dict(cfg)
    for *parents, key in (*RUN_ONLY_PATHS, *((k,) for k in extra_exclude)):
        node = d
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return sha256_json(d)[:12]


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the configured model (everything but its name)."""
    return {k: v for k, v in dict(model_cfg).items() if k != "name"}


# ------------------------------------------------------------------------------------------ checking


def check_config(kind: str, cfg: Any) -> dict[str, Any]:
    """Check a composed ``train``, ``unlearn`` or ``heal`` config against its schema; return it as a plain dict."""
    d = to_dict(cfg)
    check_node(ROOTS[kind], d, "")
    return d


def validate_train_config(cfg: Any) -> None:
    """Every training value a user can get wrong, checked before any data is read."""
    check_config("train", cfg)


def validate_unlearn_config(cfg: Any) -> None:
    """Every unlearning value checkable without the training run, checked before the run is loaded.

    Values that need the run (``discovery.count`` against n_p) are checked where the run is known.
    """
    check_config("unlearn", cfg)


def validate_heal_config(cfg: Any) -> None:
    """Every value of a heal command, checked before any file is read."""
    check_config("heal", cfg)


def method_arguments(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The registered method's keyword arguments: the config's values, the schema's for optional keys not given
    (in nested blocks too: ``synthesis.additive`` of a config written before the key existed)."""
    d = to_dict(method_cfg)
    args = _with_defaults(variant_of(Method, d) or Method, d)
    args.pop("name", None)
    return args


def method_defaults(name: str, **changes: Any) -> dict[str, Any]:
    """The keyword arguments ``method=<name>`` passes (its YAML and blocks: the one place of its defaults), with
    ``changes``: how one method runs another (discover_retrain's retraining)."""
    return {**method_arguments(compose_config("unlearn", ["train_run=-", f"method={name}", "logger=none"]).method),
            **changes}


def _with_defaults(schema: type, d: Mapping[str, Any]) -> dict[str, Any]:
    out = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    out.update(d)
    for name, spec in _fields(schema).items():
        block = next((t for t in _options(spec.type) if dataclasses.is_dataclass(t)), None)
        if block is not None and isinstance(out.get(name), Mapping):
            out[name] = _with_defaults(block, out[name])  # type: ignore[arg-type]
    return out


def check_field(schema: type, name: str, value: Any, path: str) -> None:
    """One value checked against one field of a schema class (for values read at run time, e.g. a run's config)."""
    spec = _fields(schema)[name]
    check_value(spec.type, value, path, spec.meta.get("range", {}))


def check_node(schema: type, value: Any, path: str) -> None:
    """Check a mapping against a schema class: known keys, required keys, each value, then the relations."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'config'}={value!r}: must be a mapping")
    schema = _variant(schema, value, path)
    specs = _fields(schema)
    unknown = [k for k in value if k not in specs]
    if unknown and not getattr(schema, "OPEN", False):
        raise ConfigError(f"{_key(path, unknown[0])}: unknown key; valid keys: {', '.join(specs)}")
    for name, spec in specs.items():
        key = _key(path, name)
        if name not in value or value[name] == "???":
            if spec.required or name in value:
                hint = spec.meta.get("help") or f"set {key}=<value>"
                raise ConfigError(f"{key}: required; {hint}")
            continue
        check_value(spec.type, value[name], key, spec.meta.get("range", {}))
        if spec.meta.get("directory") and value[name] is not None:
            check_creatable_dir(str(value[name]), key)
    for message in _relations(schema, value):
        raise ConfigError(message)


def check_value(tp: Any, value: Any, path: str, bounds: Mapping[str, float]) -> None:
    """Check one value against a type (and, for numbers and lists of numbers, the bounds)."""
    chosen = _matching(tp, value)
    if chosen is None or not _in_bounds(chosen, value, bounds):
        raise ConfigError(f"{path}={value!r}: must be {_describe(tp, bounds)}")
    if dataclasses.is_dataclass(chosen):
        check_node(chosen, value, path)  # type: ignore[arg-type]


def check_creatable_dir(path: str, key: str) -> None:
    """The folder ``path`` exists or can be created (probed by creating and removing a folder where it goes)."""
    target = Path(path).expanduser()
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key}={path}: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".potion-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot write in {parent} ({exc.strerror or exc})") from None


@dataclasses.dataclass(frozen=True)
class _Spec:
    type: Any
    meta: Mapping[str, Any]
    required: bool


@cache
def _fields(schema: type) -> dict[str, _Spec]:
    hints = typing.get_type_hints(schema)
    return {f.name: _Spec(hints[f.name], f.metadata,
                          f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(schema)}


def _variant(schema: type, value: Mapping[str, Any], path: str) -> type:
    """A group with differently shaped options (model, method, trigger): the class of the chosen one."""
    if not (isinstance(schema, type) and issubclass(schema, Named)) or not (schema.VARIANTS or schema.DECLARED):
        return schema
    chosen = variant_of(schema, value)
    if chosen is None:
        names = sorted({*schema.VARIANTS, *(declared(*schema.DECLARED) if schema.DECLARED else ())})
        raise ConfigError(f"{_key(path, schema.KEY)}={value.get(schema.KEY)}: unknown {path}; choose one of "
                          f"{names}{schema.HINT}")
    return chosen


def variant_of(schema: type[Named], value: Mapping[str, Any]) -> type | None:
    """The class of a group's chosen option: the schema's own, else one made from the option's declaration."""
    name = value.get(schema.KEY)
    chosen = schema.variant(name)
    if chosen is None and schema.DECLARED and isinstance(name, str):
        item = declared(*schema.DECLARED).get(name)
        if item is not None:
            chosen = declared_class(schema, item.name, item.fields)
    return chosen


@cache
def declared_class(base: type, name: str, fields: tuple[tuple[str, str, str | None], ...]) -> type:
    """A schema class for a declared option: its fields typed by their annotations (Any where the checker has no
    such type), required unless they have a default; a default written ``num(...)`` carries its range."""
    specs = []
    for key, annotation, default in fields:
        try:
            tp = eval(annotation, {"__builtins__": {}}, _TYPES)  # noqa: S307 - the package's own annotations
            _matching(tp, object())  # raises for a type the checker does not know
        except (NameError, SyntaxError, TypeError):  # the key is still checked, its value is not
            tp = Any
        specs.append((key, tp, _default(default)))
    return dataclasses.make_dataclass(name, specs, bases=(base,), kw_only=True)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict, "Any": Any,
          "Literal": Literal, "None": None, "Sequence": list}


def _default(source: str | None) -> Any:
    """A dataclass field for a declared default: ``num(...)`` / ``text(...)`` as the schema's, else a literal."""
    if source is None:
        return dataclasses.field()
    node = ast.parse(source, mode="eval").body
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("num", "text"):
        make = num if node.func.id == "num" else text  # type: ignore[attr-defined]
        return make(*(ast.literal_eval(a) for a in node.args), **{k.arg: ast.literal_eval(k.value)
                                                                   for k in node.keywords if k.arg})
    value = ast.literal_eval(node)
    if isinstance(value, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    return dataclasses.field(default=value)


def _relations(schema: type, value: Mapping[str, Any]) -> Iterator[str]:
    rule = getattr(schema, "relations", None)
    return iter(rule(value)) if rule is not None else iter(())


def _options(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union type (a plain type is its only alternative)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _matching(tp: Any, value: Any) -> Any:
    """The alternative of ``tp`` that ``value`` has the shape of, or None."""
    for option in _options(tp):
        if _is(option, value):
            return option
    return None


def _is(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, ListConfig)) and all(_is(item, v) for v in value)
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    raise TypeError(f"config schema: unsupported type {tp!r}")


def _in_bounds(tp: Any, value: Any, bounds: Mapping[str, float]) -> bool:
    if typing.get_origin(tp) is list:
        return all(_in_bounds(typing.get_args(tp)[0], v, bounds) for v in value)
    if tp not in (int, float):
        return True
    tests = {"ge": value.__ge__, "gt": value.__gt__, "le": value.__le__, "lt": value.__lt__}
    return all(tests[k](v) for k, v in bounds.items())


_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_PLURAL = {int: "integers", float: "numbers", str: "strings"}


def _describe(tp: Any, bounds: Mapping[str, float]) -> str:
    """What a type and its bounds allow, in words: 'an integer >= 1 or null'."""
    rng = " and ".join(f"{_OPS[k]} {v:g}" for k, v in bounds.items())
    parts = []
    for option in _options(tp):
        origin = typing.get_origin(option)
        if option is type(None):
            parts.append("null")
        elif origin is Literal:
            parts.append(f"one of {list(typing.get_args(option))}")
        elif origin is list:
            item = typing.get_args(option)[0]
            parts.append(f"a list of {_PLURAL.get(item, 'values')}" + (f" {rng}" if rng else ""))
        elif option in (int, float):
            parts.append(("an integer" if option is int else "a finite number") + (f" {rng}" if rng else ""))
        else:
            parts.append({bool: "true or false", str: "a string"}.get(option, "a mapping"))
    return " or ".join(parts)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ------------------------------------------------------------------------------------------ composing


def compose_config(name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose a config from conf/ in-process (the same configs the entry scripts use).

    Hydra's composition errors become one-line ConfigErrors. Works inside a running Hydra app too (an
    unlearning job composing its training config): the app's global Hydra state is set aside for the
    compose and restored afterwards.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    outer = GlobalHydra.instance()
    saved = outer.hydra if outer.is_initialized() else None
    if saved is not None:
        outer.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_message(exc)) from None
    finally:
        if saved is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(saved)


def hydra_message(exc: BaseException) -> str:
    """One line for one of Hydra's (multi-line) composition errors."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        return f"{group}={option}: no such option in group '{group}'; choose one of {', '.join(exc.options)}"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {_first_line(exc.message)}"
    lines = [line.strip() for line in str(exc).split("Config search path")[0].splitlines() if line.strip()]
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException):
        lines.append(f"({_first_line(getattr(cause, 'msg', str(cause)))})")
    return " ".join(lines) or type(exc).__name__


def check_command_line(name: str, argv: Sequence[str]) -> None:
    """Compose and check the config(s) a command line asks for, before Hydra runs any job.

    A multirun's swept values are each composed at least once (the i-th composition takes every sweep's
    i-th value, cycling), so a bad value anywhere in a grid fails before its first job; command lines with
    Hydra's own flags other than ``-m`` (``--cfg``, ``--help``, ...) are left to Hydra.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return
    # ``${hydra:...}`` exists only inside a job (``out_dir=/x/${hydra:job.num}``): such overrides are checked there
    args = [a for a in argv if not a.startswith("-") and "${hydra:" not in a]
    for overrides in _sweep_samples(args) if any(a in ("-m", "--multirun") for a in argv) else [args]:
        d = check_config(name, compose_config(name, overrides))
        if name == "unlearn" and d.get("train"):  # +train.*: the training run it names (trained if missing)
            try:
                check_config("train", compose_config("train", train_overrides(d["train"], d.get("logger"))))
            except ConfigError as exc:
                raise ConfigError(f"+train: {exc}") from None


def train_overrides(train: Any, logger: Mapping[str, Any] | None = None) -> list[str]:
    """train.py overrides from an unlearning config's ``train`` value, with the unlearning run's logger.

    A mapping is flattened (``{experiment: x, poison: {count: 5}}``), a list taken verbatim (needed when a
    group choice also gets nested values: ``['dataset=imagefolder', 'dataset.path=/x']``).
    """
    given = plain(train)
    flat = [str(o) for o in given] if isinstance(given, list) else flatten_overrides(given)
    if logger is not None:
        flat += [f"logger.{k}={v}" for k, v in to_dict(logger).items() if v is not None and k != "name"]
        flat.append(f"logger={logger.get('name', 'mlflow')}")
    return flat


def flatten_overrides(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    """{'experiment': 'x', 'poison': {'count': 5}} -> ['experiment=x', 'poison.count=5'] (group choices first)."""
    out: list[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += flatten_overrides(v, key + ".")
        else:
            out.append(f"{key}={'null' if v is None else v}")
    return sorted(out, key=lambda o: "." in o.split("=")[0])


def _sweep_samples(args: list[str]) -> list[list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise ConfigError(hydra_message(exc)) from None
    values: list[list[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
        elif o.value_type is not None and o.value_type.name != "GLOB_CHOICE_SWEEP":  # a glob picks existing options
            values.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    width = max((len(v) for v in values), default=1)
    return [[v[i % len(v)] for v in values if v] for i in range(width)]


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _full_key(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "full_key", "") or "")
