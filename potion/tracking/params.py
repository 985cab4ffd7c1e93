"""Configs and values as MLflow accepts them: flat string params, clean keys, tag text within its limits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from potion.core.io import plain

MAX_PARAM_VALUE = 6000  # MLflow's param value limit
MAX_TAG_VALUE = 8000  # MLflow's tag value limit
MAX_KEY = 250  # MLflow's param/metric/tag key limit
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Turn a nested config into the flat, string-valued params MLflow accepts.

    Nested mappings become dotted keys, sequences their JSON text; keys are sanitised and values cut
    to MLflow's limits, so logging a whole config never fails on one odd entry.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[sanitize_key(name)] = _param_text(value)[:MAX_PARAM_VALUE]
    return flat


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | Sequence) and not isinstance(value, bytes | bytearray):
        return json.dumps(plain(value), default=str)
    return str(value)


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: only alphanumerics, ``_ - . space /``, no empty or dot path segments."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p != ".." else "__" for p in key.split("/") if p not in ("", ".")]
    return "/".join(parts)[:MAX_KEY] or "_"


def tag_text(value: Any) -> str:
    """A tag value as text within MLflow's limit."""
    return str(value)[:MAX_TAG_VALUE]
