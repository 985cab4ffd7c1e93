"""Pixel-space triggers (sig, ftrojan, wanet) never read row masks that live on an accelerator.

Reading a GPU tensor on the host (``bool(rows.any())``) waits for the device, once per batch. A mask on the
meta device stands in for one (reading it raises), and the path taken there (the change computed for
every row, then selected) gives exactly the values of the path that skips clean batches.
"""

from __future__ import annotations

import pytest
import torch

from potion.data.poison import Trigger, TriggerSpec
from potion.data.triggers import base

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
KINDS = [TriggerSpec(kind="sig"), TriggerSpec(kind="ftrojan"), TriggerSpec(kind="wanet", noise_ratio=2.0)]


def _trigger(spec: TriggerSpec) -> Trigger:
    return Trigger(spec, 3, 32, 32, MEAN, STD)


def _masks(n: int) -> list[torch.Tensor | None]:
    mixed = torch.zeros(n, dtype=torch.bool)
    mixed[1::3] = True
    codes = torch.zeros(n, dtype=torch.uint8)
    codes[::4] = 1
    return [None, torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), mixed,
            torch.zeros(n, dtype=torch.uint8), codes]


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
def test_a_mask_on_a_device_is_never_read(spec: TriggerSpec) -> None:
    x = torch.randn(6, 3, 32, 32, device="meta")
    with pytest.raises(RuntimeError):  # what a host read of a device mask does here
        bool(torch.zeros(6, dtype=torch.bool, device="meta").any())
    for which in (torch.zeros(6, dtype=torch.bool, device="meta"), torch.ones(6, dtype=torch.bool, device="meta")):
        assert _trigger(spec).apply(x, which).shape == x.shape


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: s.kind)
def test_the_device_path_gives_the_same_values(spec: TriggerSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trig = _trigger(spec)
    skipping = []
    for which in _masks(12):
        torch.manual_seed(1)  # wanet's noise mode draws from the global stream: the same draws both ways
        skipping.append(trig.apply(x, which))
    monkeypatch.setattr(base, "may_hold", lambda which, code: True)  # as on a GPU: never read, always computed
    for which, expected in zip(_masks(12), skipping, strict=True):
        torch.manual_seed(1)
        got = trig.apply(x, which)
        assert torch.equal(got, expected)
        if which is not None and not bool(which.any()):
            assert torch.equal(got, x)  # a clean batch comes back unchanged


def test_may_hold_reads_a_host_mask() -> None:
    codes = torch.tensor([0, 2, 0], dtype=torch.uint8)
    assert not base.may_hold(codes, base.TRIGGER) and base.may_hold(codes, base.NOISE)
    assert base.may_hold(torch.tensor([False, True]), base.TRIGGER)
    assert not base.may_hold(torch.tensor([False, False]), base.TRIGGER)
    assert not base.may_hold(torch.tensor([True]), base.NOISE)  # a bool mask holds no noise-mode rows
