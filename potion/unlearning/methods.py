"""Every built-in method, registered: import names from here to look methods up.

Importing this module imports every module of :mod:`potion.unlearning` that declares a method
(``@register(...)``, found by :func:`potion.core.declared.declared`), so their decorators fill the registry:
a new method module needs no line here.
"""

from __future__ import annotations

from importlib import import_module

from potion.core.declared import declared
from potion.unlearning.registry import METHODS, get_method, method_info, method_names

for _module in sorted({item.module for item in declared("potion.unlearning", "register").values()}):
    import_module(_module)

__all__ = ["METHODS", "get_method", "method_info", "method_names"]
