"""What a practitioner does after ``potion.heal``: confirm the suspects, add them to the list, heal again.

Healing is only as complete as the discovered list, and the suspects are likely undiscovered poison: this writes
``next_discovered.txt`` (the list, then the suspects commented out for the user to confirm) and the exact command
that heals again with it (without ``out_dir=``: the next run's default folder is its own).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from potion.config.compose import CONF_DIR
from potion.core.io import atomic_write_text

NEXT_LIST = "next_discovered.txt"
FEW_FOUND = 10  # at most this many discovered files: suggest method=potion_iterative
SUSPECT_HINT = ("# Suspects, most likely first: delete the '# ' in front of each file you confirmed as poisoned "
                "(the trigger is in its pixels);\n# leave the others as they are (commented lines are ignored).\n")


def override_key(arg: str) -> str:
    """The key an override sets: ``+model.width=1`` -> ``model.width``."""
    return arg.lstrip("+~").split("=", 1)[0].strip()


def without(args: Sequence[str], key: str) -> list[str]:
    """The overrides without ``key`` and its sub-keys (``method`` drops ``method.ptn.rho=...`` too)."""
    return [a for a in args if override_key(a) != key and not override_key(a).startswith(key + ".")]


def replaced(args: Sequence[str], key: str, value: Any) -> list[str]:
    """The overrides with ``key`` (and its sub-keys) set to ``value`` alone."""
    return [*without(args, key), f"{key}={value}"]


def command(args: Sequence[str]) -> str:
    """A shell command line for ``python -m potion.heal`` with these overrides, quoted for sh."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "potion.heal", *args])


def _model_args(model: Mapping[str, Any]) -> list[str]:
    """``model=<group>`` (the conf/model file whose name is the model's) and its values; else ``model.name=``."""
    name = str(model["name"])
    groups = sorted((CONF_DIR / "model").glob("*.yaml"))
    group = next((g.stem for g in groups if OmegaConf.load(g).get("name") == name), None)
    head = [f"model={group}"] if group else [f"model.name={name}"]
    return head + [f"model.{k}={json.dumps(v)}" for k, v in model.items() if k != "name"]


def config_args(d: Mapping[str, Any]) -> list[str]:
    """The inputs of a heal config as overrides, for a run started without a command line (in-process).

    The checkpoint, data, list, model, normalisation, method and trigger; other options take their defaults.
    """
    data = d.get("dataset") or {}
    args = [f"checkpoint={d['checkpoint']}", f"dataset.path={data.get('path')}", f"discovered={d['discovered']}",
            *_model_args(d["model"])]
    args += [f"dataset.{k}={json.dumps(list(data[k]))}" for k in ("mean", "std") if data.get(k) is not None]
    args.append(f"method={d['method']['name']}")
    if d.get("trigger"):
        args.append("trigger={" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in dict(d["trigger"]).items()) + "}")
    return args


def write_next_list(path: Path, discovered: Sequence[str], suspects: Sequence[str], source: str) -> Path:
    """The discovered files as they are, then the suspects commented out for the user to confirm."""
    text = f"# Your discovered files (from {source}):\n" + "".join(f"{p}\n" for p in discovered)
    if suspects:
        text += SUSPECT_HINT + "".join(f"# {p}\n" for p in suspects)
    return atomic_write_text(path, text)


def next_commands(args: Sequence[str], next_list: Path, method: str, n_f: int) -> dict[str, str]:
    """``heal_again``: this run's command with the new list; ``iterative`` (few files found, another method):
    the same with ``method=potion_iterative``, which adds the suspects it flags by itself."""
    base = without(args, "out_dir")
    out = {"heal_again": command(replaced(base, "discovered", next_list))}
    if method != "potion_iterative" and n_f <= FEW_FOUND:
        out["iterative"] = command(replaced(base, "method", "potion_iterative"))
    return out


def format_next_steps(s: Mapping[str, Any]) -> list[str]:
    """The report's closing section: confirm, add, heal again (with the exact commands)."""
    listed, tgt = int(s.get("next_suspects_listed", 0)), s["target_class"]
    lines = ["## Next steps", ""]
    if listed:
        lines += [
            f"1. **Confirm the suspects.** [{NEXT_LIST}]({NEXT_LIST}) lists your {s['n_f']} discovered files and, "
            f"commented out, {listed} suspect{'s' if listed != 1 else ''} "
            + ("(the files this run added to the forget set, then the others above the cut-off)"
               if s.get("suspects_added") else "(the files above the cut-off, most likely first)")
            + f". Open each one and look for the trigger; poison sits in the `{tgt}` folder.",
            f"2. **Add the confirmed ones.** In {NEXT_LIST}, delete the `# ` in front of each confirmed file "
            "(the full ranking is in [suspects.csv](suspects.csv) if you find more).",
            "3. **Heal again** from your original weights with the longer list (a run with more of the poison "
            "found removes more of the backdoor):", "",
        ]
    elif "suspects_flagged" in s:
        lines += ["No other training file scored above the suspect cut-off. If you find more poisoned files "
                  "(the ranking is in [suspects.csv](suspects.csv), most likely first), add them to "
                  f"[{NEXT_LIST}]({NEXT_LIST}) and heal again from your original weights:", ""]
    else:
        lines += ["The suspect ranking was off (`suspects.enabled=false`). If you find more poisoned files, add them "
                  f"to [{NEXT_LIST}]({NEXT_LIST}) and heal again from your original weights:", ""]
    lines += ["```bash", s["next_command"], "```", ""]
    if s.get("next_command_iterative"):
        lines += [f"With only {s['n_f']} discovered file{'s' if s['n_f'] != 1 else ''}, `method=potion_iterative` "
                  "adds the suspects it flags to the forget set by itself (up to `method.rounds` rounds), then "
                  "repairs the clean accuracy with a short fine-tune without them:", "",
                  "```bash", s["next_command_iterative"], "```", ""]
    return lines
