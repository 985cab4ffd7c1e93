"""The attack catalogue: one module per trigger kind (``poison.trigger.kind``), registered in ``KINDS``.

A kind's module declares its settings with their defaults and ranges, the checks that need the image size and
the trigger it builds (potion/data/triggers/base.py says how); importing this package imports every module that
declares one (found by :func:`potion.core.declared.declared`), so a new kind needs no line here.
"""

from __future__ import annotations

from importlib import import_module

from potion.core.declared import declared
from potion.data.triggers.base import KINDS, AttackKind, TriggerFields, kind_of

for _module in sorted({item.module for item in declared(__name__, "trigger_kind").values()}):
    import_module(_module)

__all__ = ["KINDS", "AttackKind", "TriggerFields", "kind_of"]
