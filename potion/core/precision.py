"""``trainer.precision=auto`` / ``trainer.channels_last=auto``: decided by what the machine can do.

bf16 autocast plus channels_last ran a ResNet-9 training step 1.2x faster than fp32 on an Intel CPU with
native bf16 (AVX-512-BF16 / AMX), but 6-9x SLOWER on an AMD EPYC with AVX2 only, where bf16 is emulated.
So on a CPU the choice follows the instruction set (``/proc/cpuinfo`` flags); on a GPU, bf16 where the card
supports it. The concrete choice replaces ``auto`` in the config before the run's identity is hashed:
it is part of the run folder's name and of config.yaml, so a run is reproducible on another machine
by giving the same concrete values.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from potion.core.machine import cpu_flags

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_cpu(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (else bf16 autocast is emulated and slow)."""
    return any(f in (cpu_flags() if flags is None else flags) for f in BF16_FLAGS)


def choose(accelerator: str, flags: set[str] | None = None) -> tuple[str, bool, str]:
    """(precision, channels_last, why) for a Lightning accelerator name."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", True, "GPU with bf16"
        return "16-mixed", True, "GPU without bf16"
    if native_bf16_cpu(flags):
        return "bf16-mixed", True, "CPU with native bf16 (avx512_bf16/amx_bf16)"
    return "32-true", False, "CPU without native bf16 (bf16 would be emulated)"


def resolve_auto(cfg: DictConfig, flags: set[str] | None = None) -> tuple[DictConfig, str | None]:
    """The config with ``auto`` precision / channels_last replaced by this machine's choice, and the reason."""
    tr = cfg.get("trainer")
    if tr is None or (str(tr.get("precision")) != "auto" and str(tr.get("channels_last")) != "auto"):
        return cfg, None
    precision, channels_last, why = choose(str(tr.get("accelerator", "cpu")), flags)
    d: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
    if str(tr.get("precision")) == "auto":
        d["trainer"]["precision"] = precision
    if str(tr.get("channels_last")) == "auto":
        d["trainer"]["channels_last"] = channels_last
    return OmegaConf.create(d), why
