"""With enough discovered samples, synthesis only asks whether a patch trigger is there (then synthesises
nothing): that answer needs the candidate windows, not the refined location (``_refine``, ``_shrink``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import full_method_args
from tiny_world import defender_task

from potion.data.discovery import discover
from potion.data.poison import TriggerSpec, make_poison_plan, patch_origin
from potion.data.poisoned import poison
from potion.data.sources import DatasetBundle, ImageSplit
from potion.unlearning import ssd_family, synthesis
from potion.unlearning.ssd_family import with_synthesis
from potion.unlearning.task import UnlearnTask

SPEC = TriggerSpec(size=2)
TARGET = 0


class WindowDetector(nn.Module):
    """Calls the target when a 2x2 window at (row, col) is bright (a backdoored model), class 1 otherwise."""

    def __init__(self, row: int, col: int) -> None:
        super().__init__()
        self.row, self.col = row, col
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x[:, :, self.row:self.row + 2, self.col:self.col + 2].mean((1, 2, 3))
        out = torch.zeros(x.shape[0], 4, dtype=x.dtype, device=x.device)
        out[:, 1] = 0.5
        return out + torch.nn.functional.one_hot(torch.tensor(TARGET), 4) * (self.scale * bright - 4).view(-1, 1)


def _task(model: nn.Module, share: float) -> UnlearnTask:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ImageSplit:
        return ImageSplit(torch.randint(0, 200, (n, 1, 8, 8), dtype=torch.uint8, generator=gen),
                          torch.randint(0, 4, (n,), generator=gen))

    bundle = DatasetBundle("tiny", split(240), split(40), ("a", "b", "c", "d"), (0.5,), (0.25,), "tiny-fp")
    plan = make_poison_plan(bundle.train.labels, target=TARGET, num_classes=4, trigger=SPEC, seed=0, count=20)
    return defender_task(model.eval(), poison(bundle, plan), discover(plan, share=share, seed=0), seed=0,
                         model_factory=lambda: model, train_cfg={})


def _fail(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the window was located exactly although nothing is synthesised")


def test_enough_discovered_samples_skip_locating_the_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    row, col = patch_origin(SPEC, 8, 8)
    task = _task(WindowDetector(row, col), share=0.6)  # 12 discovered: more than max_discovered (10)
    block = full_method_args("potion")["synthesis"]
    assert task.discovery.n_f > block["max_discovered"] and block["additive"]
    monkeypatch.setattr(synthesis, "_refine", _fail)
    monkeypatch.setattr(synthesis, "_shrink", _fail)
    same, info, found = with_synthesis(task, block)
    assert info == {"synth_samples": 0, "synth_patch_found": 1.0} and found is None and same is task


def test_few_discovered_samples_still_get_the_refined_window() -> None:
    row, col = patch_origin(SPEC, 8, 8)
    task = _task(WindowDetector(row, col), share=0.25)  # 5 discovered
    _, info, found = with_synthesis(task, full_method_args("potion")["synthesis"])
    assert found is not None and (found.row, found.col, found.size) == (row, col, 2)
    assert info["synth_samples"] == found.labels.numel() > 100


@pytest.mark.parametrize("where", ["trigger", "elsewhere"])
def test_patch_present_answers_as_synthesize_forget(where: str) -> None:
    row, col = patch_origin(SPEC, 8, 8)
    model = WindowDetector(row, col) if where == "trigger" else WindowDetector(0, 0)  # elsewhere: no backdoor
    task = _task(model, share=0.6)
    forget_x, _ = task.forget_tensors()
    probes = task.train.normalised(task.retain_idx[:200])
    present = synthesis.patch_present(model, forget_x, probes, TARGET)
    assert present == (synthesis.synthesize_forget(model, forget_x, probes, TARGET) is not None)
    assert present == (where == "trigger")


def test_each_refinement_window_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shifts clamped at the border and sub-windows tried again are not recomputed; the result is the same."""
    row, col = patch_origin(SPEC, 8, 8)  # the bottom-right corner: many shifts clamp to one window
    model = WindowDetector(row, col)
    task = _task(model, share=0.25)
    forget_x, _ = task.forget_tensors()
    probes = task.train.normalised(task.retain_idx[:200])
    calls = {"n": 0}
    measured = synthesis.strength

    def counted(*args: object) -> tuple[float, float]:
        calls["n"] += 1
        return measured(*args)

    monkeypatch.setattr(synthesis, "strength", counted)
    once = synthesis.synthesize_forget(model, forget_x, probes, TARGET)
    n_once, calls["n"] = calls["n"], 0

    def uncached(self: synthesis.WindowStrength, r: int, c: int, k: int) -> tuple[float, float]:
        return counted(self.model, synthesis.paste(self.probe_x, self.source[:, r:r + k, c:c + k], r, c), self.target)

    monkeypatch.setattr(synthesis.WindowStrength, "__call__", uncached)
    every = synthesis.synthesize_forget(model, forget_x, probes, TARGET)
    assert once is not None and every is not None
    assert (once.row, once.col, once.size, once.flip_rate) == (every.row, every.col, every.size, every.flip_rate)
    assert torch.equal(once.images, every.images)
    assert n_once < calls["n"] * 0.7, (n_once, calls["n"])


@pytest.mark.parametrize("share", [0.25, 0.6])
def test_a_second_search_on_the_same_inputs_is_read_from_the_cache(share: float, cache: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs of a PTN sweep search the windows once: the outcome (a refined window, or 'a patch is there') is
    stored content-addressed, and a later call with the same model and samples gets it back without searching."""
    row, col = patch_origin(SPEC, 8, 8)
    task = _task(WindowDetector(row, col), share=share)
    block = full_method_args("potion")["synthesis"]
    first_task, first, found = with_synthesis(task, block, cache=True)
    assert list((cache / "synthesis").glob("*.safetensors"))
    monkeypatch.setattr(synthesis, "synthesize_forget", _fail)
    monkeypatch.setattr(synthesis, "patch_present", _fail)
    monkeypatch.setattr(ssd_family, "synthesize_forget", _fail)
    monkeypatch.setattr(ssd_family, "patch_present", _fail)
    again_task, again, found_again = with_synthesis(task, block, cache=True)
    assert again == first and (found is None) == (found_again is None)
    if found is not None:
        assert (found.row, found.col, found.size, found.flip_rate) == (found_again.row, found_again.col,
                                                                       found_again.size, found_again.flip_rate)
        assert torch.equal(first_task.extra_forget[0], again_task.extra_forget[0])
        assert torch.equal(first_task.extra_forget[1], again_task.extra_forget[1])
    other = WindowDetector(row, col)
    with torch.no_grad():
        other.scale.fill_(5.0)
    with pytest.raises(AssertionError, match="located exactly"):  # other weights: a search of their own
        with_synthesis(_task(other, share=share), block, cache=True)


def test_taking_the_trigger_out_fills_the_window_and_a_margin_with_clean_pixels() -> None:
    """A model trained with crop augmentation answers to any part of a 3x3 patch, while the window that flips the
    probes may be its 2x2 corner: the fill reaches one pixel around the window (clipped at the border)."""
    found = synthesis.SynthesisResult(row=4, col=4, size=2, flip_rate=1.0, images=torch.zeros(0),
                                      labels=torch.zeros(0))
    x = torch.full((1, 1, 6, 6), 9.0)
    clean = torch.stack([torch.full((1, 6, 6), v) for v in (1.0, 2.0, 3.0)])  # per-pixel median: 2
    out = found.remove_from(x, clean)
    assert torch.equal(out[0, 0, 3:, 3:], torch.full((3, 3), 2.0))  # rows/cols 3-5: the window and its margin
    assert (out[0, 0, :3] == 9.0).all() and (out[0, 0, :, :3] == 9.0).all()  # nothing else touched
    assert torch.equal(found.remove_from(x, clean, margin=0)[0, 0, 3], torch.full((6,), 9.0))
