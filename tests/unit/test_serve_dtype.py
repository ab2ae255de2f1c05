"""How `deltaw serve` picks the weights' dtype: bf16 where the CPU multiplies bf16 natively (read from its
/proc/cpuinfo flags), fp32 otherwise; an explicit --dtype always wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltaw.runtime import native_bf16
from deltaw.serve.config import ServeConfig

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd dotprod\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(SAPPHIRE_RAPIDS, True), (SKYLAKE, False), (GRAVITON3, True),
                                                  (GRAVITON2, False)])
def test_native_bf16_reads_the_cpu_flags(tmp_path: Path, cpuinfo: str, native: bool):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert native_bf16("cpu", str(tmp_path / "cpuinfo")) is native


def test_unreadable_cpu_flags_mean_no_native_bf16(tmp_path: Path):
    assert native_bf16("cpu", str(tmp_path / "missing")) is False


def test_auto_resolves_to_the_cpus_choice_and_explicit_dtypes_win(monkeypatch):
    monkeypatch.setattr("deltaw.serve.config.native_bf16", lambda device: True)
    assert ServeConfig().dtype == "auto" and ServeConfig().weights_dtype() == "bf16"
    assert ServeConfig(dtype="fp32").weights_dtype() == "fp32"
    monkeypatch.setattr("deltaw.serve.config.native_bf16", lambda device: False)
    assert ServeConfig().weights_dtype() == "fp32" and ServeConfig(dtype="bf16").weights_dtype() == "bf16"


def test_an_unknown_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"--dtype must be one of \('auto', 'fp32', 'bf16'\), found 'fp16'"):
        ServeConfig(dtype="fp16").check()
