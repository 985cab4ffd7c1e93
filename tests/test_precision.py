"""trainer.precision=auto / channels_last=auto follow the processor, and the choice is part of the run's identity."""

from __future__ import annotations

from pathlib import Path

from potion.config.compose import compose_config, identity_hash
from potion.core.machine import cpu_description, cpu_flags
from potion.core.precision import choose, resolve_auto

AVX2 = {"sse2", "avx", "avx2", "fma"}
BF16 = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16"}


def test_bf16_only_where_the_cpu_computes_it_natively() -> None:
    assert choose("cpu", BF16)[:2] == ("bf16-mixed", True)
    assert choose("cpu", AVX2)[:2] == ("32-true", False)


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_a_run_records_the_processor_by_name_and_vector_extensions(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: other\n")
    assert cpu_description(info) == "AMD EPYC (avx2 avx512f avx512_bf16)"
    info.write_text("model name\t: Old Xeon\nflags\t\t: fpu sse2\n")
    assert cpu_description(info) == "Old Xeon (no avx2)"
    assert cpu_description(tmp_path / "missing") == ""

    from potion.tracking.liveness import CPU_TAG, process_tags

    assert process_tags().get(CPU_TAG, "") == cpu_description()  # every run says where it computed


def test_auto_is_resolved_before_hashing_and_explicit_values_are_kept() -> None:
    cfg = compose_config("train", ["experiment=cpu_bench"])
    assert cfg.trainer.precision == "auto"
    fast, why = resolve_auto(cfg, BF16)
    slow, _ = resolve_auto(cfg, AVX2)
    assert (fast.trainer.precision, fast.trainer.channels_last) == ("bf16-mixed", True) and "bf16" in why
    assert (slow.trainer.precision, slow.trainer.channels_last) == ("32-true", False)
    assert identity_hash(fast) != identity_hash(slow)  # another processor's choice is another run
    explicit = compose_config("train", ["experiment=cpu_bench", "trainer.precision=32-true",
                                        "trainer.channels_last=false"])
    same, why = resolve_auto(explicit, BF16)
    assert why is None and same.trainer.precision == "32-true" and identity_hash(same) == identity_hash(slow)
