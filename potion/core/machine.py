"""The processor a run computed on, from ``/proc/cpuinfo``: its flags decide ``auto`` settings, and its name and
vector extensions are recorded on every run, because CPU timings (and bf16 numbers) differ between machines."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that change a CPU run's speed or precision


def _first_cpu(cpuinfo: str | Path) -> dict[str, str]:
    """The ``key: value`` lines of the first processor in a cpuinfo file (empty where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str]:
    """The instruction-set flags of the first CPU (empty where /proc/cpuinfo does not exist)."""
    return set(_first_cpu(cpuinfo).get("flags", "").split())


def cpu_description(cpuinfo: str | Path = CPUINFO) -> str:
    """``<model name> (<vector extensions>)``, e.g. ``AMD EPYC (avx2 avx512f avx512_bf16)``; '' where unknown."""
    fields = _first_cpu(cpuinfo)
    name = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags)
    return f"{name} ({vector or 'no avx2'})" if name else ""
