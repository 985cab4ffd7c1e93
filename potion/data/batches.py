"""A lean batch loader over in-memory uint8 tensors (no per-sample Python work, no worker processes).

Each batch is ``(images_u8, labels, triggered)``; augmentation, normalisation and the trigger are applied
to the whole batch on the device by the consumer (see ``potion.pipelines.lightning_module``). Shuffling is seeded per
epoch and the loader is stateful (``state_dict``/``load_state_dict``, saved by Lightning in every
checkpoint), so a run resumed mid-epoch continues with exactly the batches an uninterrupted one would see.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """Iterate mini-batches of (images, labels, flags), shuffled with ``seed + epoch``, sharded by rank."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor | None = None, *,
                 batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels
        self.flags = flags if flags is not None else torch.zeros(labels.shape[0], dtype=torch.bool)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._consumed = 0  # batches handed out in the current epoch (Lightning fetches no extra: we have a len)
        self._resume: tuple[int, int] | None = None

    @property
    def sampler(self) -> TensorBatches:
        """Lightning calls ``sampler.set_epoch(epoch)`` at each epoch start; we are our own sampler."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the iteration stands: the epoch and how many of its batches were handed out."""
        return {"epoch": self.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration of that epoch skip the batches a checkpointed run already trained on."""
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def _order(self) -> torch.Tensor:
        n = self.labels.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size
            order = order[self.rank::self.world_size][:per_rank]
        return order

    def __len__(self) -> int:
        n = self.labels.shape[0] // max(1, self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.images.device)
        start = 0
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            start = done if epoch == self.epoch else 0
        self._consumed = start
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            self._consumed = i + 1
            yield self.images[idx], self.labels[idx], self.flags[idx]
