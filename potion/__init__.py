"""potion: poison unlearning for image classifiers (Potion, SSD family and baselines)."""

__version__ = "0.1.0"
