"""Potion's Hydra plugins: the ``ptn`` sweeper (``hydra/sweeper=ptn``)."""
