"""Timing, machine description and peak memory shared by the benchmark scripts.

The scripts run as ``python benchmarks/<script>.py`` from the repository root; Python puts the
script's folder on ``sys.path``, so ``from _common import ...`` finds this file.

    sync = device_sync("cuda")            # torch.cuda.synchronize, or a no-op on CPU
    seconds = timed(step, sync)           # wall time of one call, synchronized on both ends
    with stopwatch(sync) as sw: ...       # sw.seconds (wall), sw.cpu_seconds (process CPU time)
    machine_info(); machine_line(); load_avg(); peak_rss_mb()
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

clock = time.perf_counter  # for timestamps that span callbacks (no single block to time)


def _no_sync() -> None:
    pass


def device_sync(device: Any) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device (timings cover the kernels), else a no-op."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else _no_sync


class stopwatch:  # noqa: N801  (used like a function: ``with stopwatch(sync) as sw``)
    """Wall and process CPU seconds of a ``with`` block, ``sync()`` called on both ends."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync or _no_sync
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> stopwatch:
        self.sync()
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


def timed(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Wall seconds of one ``fn()``, synchronized on both ends."""
    with stopwatch(sync) as sw:
        fn()
    return sw.seconds


def _cpuinfo() -> tuple[str | None, int | None, set[str]]:
    """Model name, physical core count and flags from ``/proc/cpuinfo`` (Linux; else empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None, set()
    name, flags, cores, package = None, set(), set(), "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and name is None:
            name = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    return name, len(cores) or None, flags


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPUs (``cores``, as the recorded results call them), physical cores,
    torch's intra-op ``threads``, torch version, and whether the CPU has bf16 instructions."""
    import torch

    name, physical, flags = _cpuinfo()
    return {
        "cpu": name or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "physical_cores": physical,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def load_avg() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages."""
    return os.getloadavg()


def load_str() -> str:
    return "/".join(f"{x:.1f}" for x in load_avg())


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for a script's output: :func:`machine_info` and the current load average."""
    m = info or machine_info()
    isa = [f for f in ("avx512_bf16", "amx") if m[f]]
    return (
        f"{m['cpu']}, {m['cores']} CPUs ({m['physical_cores'] or '?'} cores), "
        f"torch {m['torch']}, {m['threads']} threads, bf16 ISA: {', '.join(isa) or 'none'}; "
        f"load {load_str()}"
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB else
