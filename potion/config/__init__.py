"""Typed config schemas (checked before torch is imported) and Hydra composition."""
