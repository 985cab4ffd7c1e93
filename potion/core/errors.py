"""Errors a user can cause, reported as one clear line by the entry scripts."""

from __future__ import annotations


class PotionError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class ConfigError(PotionError):
    """A configuration value is out of range, of the wrong type or unknown."""


class DataError(PotionError):
    """A data set is missing, empty, corrupt or inconsistent."""


class CheckpointError(PotionError):
    """A checkpoint or run folder cannot be read safely."""


class TrackingError(PotionError):
    """The MLflow tracking store cannot be reached or used."""
