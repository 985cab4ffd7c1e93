"""Every built-in method, registered: import names from here to look methods up.

The method modules' ``@register`` decorators fill :mod:`potion.unlearning.registry` when they are imported;
importing this module imports them all, so ``get_method("potion")`` finds it. A new method module is added
to the import line below.
"""

from __future__ import annotations

from potion.unlearning import iterative, rem, ssd_family, training_based  # noqa: F401  (their decorators register)
from potion.unlearning.registry import METHODS, get_method, method_info, method_names

__all__ = ["METHODS", "get_method", "method_info", "method_names"]
