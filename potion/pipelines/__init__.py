"""The run lifecycles: train, unlearn, heal, the clean reference, run folders."""
