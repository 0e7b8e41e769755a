"""The default numeric precision: bf16 autocast + channels_last where the hardware does bf16.

On a CPU, ``torch.autocast("cpu", torch.bfloat16)`` is about 2.2x faster than float32 when the
CPU computes bf16 natively (x86 ``avx512_bf16`` or AMX ``amx_bf16``; BENCHMARKS.md), and slower
where bf16 would be emulated. :func:`default_precision` (the ``${default_precision:...}``
resolver of ``configs/trainer/*.yaml``) therefore picks ``bf16-mixed`` for CPU runs only on such
CPUs and ``32-true`` elsewhere; GPU runs keep their configured precision (``trainer=gpu``:
``16-mixed``). ``module.channels_last=auto`` follows the precision (:func:`use_channels_last`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

__all__ = [
    "NATIVE_BF16_FLAGS",
    "cpu_bf16_flags",
    "default_precision",
    "precision_summary",
    "use_channels_last",
]

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
OVERRIDE_ENV = "XGKD_CPU_BF16"  # "1"/"0": force the CPU verdict (tests, unusual machines)


@lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no bf16 by default
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 CPU flags this machine has (empty: bf16 would be emulated)."""
    forced = os.environ.get(OVERRIDE_ENV)
    if forced is not None:
        return ["forced by " + OVERRIDE_ENV] if forced == "1" else []
    return [f for f in NATIVE_BF16_FLAGS if f in _cpuinfo_flags()]


def _runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not (torch.cuda.is_available() or torch.backends.mps.is_available())


def default_precision(accelerator: str = "auto") -> str:
    """Lightning precision for a run on ``accelerator``: ``bf16-mixed`` on a CPU with native
    bf16, ``32-true`` on other CPUs and on GPUs (set ``trainer.precision`` to choose)."""
    return "bf16-mixed" if _runs_on_cpu(str(accelerator)) and cpu_bf16_flags() else "32-true"


def use_channels_last(setting: bool | str, precision: str) -> bool:
    """``module.channels_last``: ``auto`` = on with mixed precision (bf16/fp16 convolutions run
    faster in channels_last on CPUs and GPUs), off in float32."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"module.channels_last must be true, false or auto, got {setting!r}")
    return str(precision).startswith(("bf16", "16"))


def precision_summary(precision: str, channels_last: bool, accelerator: str) -> str:
    """One line for the run log: what ran and why."""
    layout = "channels_last" if channels_last else "contiguous (NCHW)"
    why = ""
    if accelerator == "cpu":
        flags = cpu_bf16_flags()
        why = (
            f"; CPU has native bf16 ({', '.join(flags)})"
            if flags
            else "; CPU has no native bf16 (avx512_bf16/amx_bf16), so float32"
        )
    return f"precision: {precision}, memory format: {layout}{why}"
