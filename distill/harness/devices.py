"""Running on this machine's devices (``--devices``): one worker per device, each starting the
next step from a shared queue when its last one has ended.

``auto``: one worker per visible GPU when the profile trains on GPU (else one CPU worker); ``0,1``:
GPUs by index among the visible ones (through ``CUDA_VISIBLE_DEVICES`` when it is set; an index
that CUDA does not show here is refused before anything starts); ``cpu:N``: N CPU workers. A GPU
worker's processes see only their GPU (``CUDA_VISIBLE_DEVICES=<i>``), a CPU worker's none
(``CUDA_VISIBLE_DEVICES=``); with several workers, each process gets ``cores // workers``
threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``). The training config is the profile's wherever
a run goes (placement is by environment only), so a run compares equal whichever device made it.

Steps start in table order, seed by seed (a stopped run leaves whole seeds of the table). Their
durations are unknown, so a dry run shows the start order as if they were equal: round robin.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from distill.harness.processes import LOG_NAME, Runner, Step
from distill.harness.profiles import HarnessError, Profile
from distill.harness.runs import compose

SPEC_HELP = "auto, GPU indices like 0,1, or cpu:N (N CPU worker processes)"
Done = Callable[[Step, int], None]


@dataclass(frozen=True)
class Device:
    """A worker's device: ``gpu:<index>`` or ``cpu:<worker>``."""

    kind: str
    index: int
    visible: str = ""  # CUDA_VISIBLE_DEVICES of its processes
    threads: int | None = None  # OMP/MKL threads (None: the library default)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.index}"

    def env(self) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": self.visible}
        if self.threads is not None:
            env |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return env


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _threads(workers: int) -> int | None:
    return None if workers == 1 else max(1, len(os.sched_getaffinity(0)) // workers)


def cpu_devices(count: int) -> list[Device]:
    return [Device("cpu", i, "", _threads(count)) for i in range(count)]


def gpu_devices(indices: Sequence[int]) -> list[Device]:
    """GPU workers for visible indices, mapped through this process's CUDA_VISIBLE_DEVICES; an
    index that CUDA does not show here (:func:`visible_gpus`) is refused before anything starts."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = None if parent is None else [n.strip() for n in parent.split(",") if n.strip()]
    devices = []
    for i in indices:
        if names is not None and i >= len(names):
            raise HarnessError(
                f"--devices: GPU {i} is not visible (CUDA_VISIBLE_DEVICES={parent!r} shows "
                f"{len(names)}); use indices below {len(names)}, or cpu:N"
            )
        _check_visible(i)
        visible = str(i) if names is None else names[i]
        devices.append(Device("gpu", i, visible, _threads(len(indices))))
    return devices


def _check_visible(index: int) -> None:
    count = visible_gpus()
    if index < count:
        return
    if count == 0:
        raise HarnessError(
            f"--devices: GPU {index} is not visible: this machine shows no GPU "
            "(torch.cuda.device_count() is 0); use --devices cpu:N with a CPU profile "
            "(trainer=cpu), or --launcher slurm"
        )
    raise HarnessError(
        f"--devices: GPU {index} is not visible: this machine shows {count} "
        f"(torch.cuda.device_count()); use indices below {count}, or cpu:N"
    )


def parse_devices(spec: str) -> list[Device] | None:
    """The workers of a ``--devices`` value (None for ``auto``, resolved by :func:`auto_devices`);
    a malformed value raises naming the accepted forms."""
    text = spec.strip().lower()
    if text == "auto":
        return None
    if text == "cpu" or text.startswith("cpu:"):
        count = text.partition(":")[2] or "1"
        if not count.isdigit() or int(count) < 1:
            raise HarnessError(f"--devices {spec!r}: cpu:N needs a whole number N >= 1, e.g. cpu:2")
        return cpu_devices(int(count))
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise HarnessError(f"unknown --devices {spec!r}: use {SPEC_HELP}")
    if len(set(parts)) < len(parts):
        raise HarnessError(f"--devices {spec!r} names a GPU twice: list each GPU once")
    return gpu_devices([int(p) for p in parts])


def auto_devices(trains_on_cpu: bool) -> list[Device]:
    """``auto``: every visible GPU unless the profile trains on CPU; else one CPU worker."""
    count = 0 if trains_on_cpu else visible_gpus()
    return gpu_devices(range(count)) if count else cpu_devices(1)


def check_trainer(devices: Sequence[Device], trainer: dict[str, Any], profile: str) -> None:
    """Refuse workers that cannot run the profile's trainer, naming the fix."""
    accelerator, count = str(trainer.get("accelerator")), str(trainer.get("devices"))
    labels = ",".join(d.label for d in devices)
    if devices[0].kind == "cpu" and accelerator in ("gpu", "cuda"):
        raise HarnessError(
            f"profile {profile!r} trains on GPU (trainer.accelerator={accelerator}) but the "
            f"workers are CPUs ({labels}): on a machine with GPUs use --devices auto or 0,1; "
            "elsewhere --launcher slurm"
        )
    if devices[0].kind == "gpu" and accelerator == "cpu":
        raise HarnessError(
            f"profile {profile!r} trains on CPU (trainer.accelerator=cpu) but the workers are "
            f"GPUs ({labels}): use --devices cpu:N"
        )
    if devices[0].kind == "gpu" and count != "1":
        raise HarnessError(
            f"profile {profile!r} trains on {count} devices per run (trainer.devices={count}) "
            "but a GPU worker gives each run one GPU: set trainer.devices=1 in the profile"
        )


def round_robin(steps: Sequence[Step], devices: Sequence[Device]) -> list[tuple[Step, Device]]:
    """The start order as a dry run shows it: step k on worker k mod n (equal durations)."""
    return [(step, devices[k % len(devices)]) for k, step in enumerate(steps)]


@dataclass
class Local:
    """Steps as processes on this machine's workers (see the module docstring)."""

    spec: str
    devices: list[Device] = field(default_factory=list)
    assumed: bool = False  # a dry run's assumed GPU worker on a machine without GPUs

    @classmethod
    def parse(cls, spec: str) -> Local:
        return cls(spec, parse_devices(spec) or [])

    def prepare(
        self, profile: Profile, pending: dict[int, list[str]], dry_run: bool = False
    ) -> Local:
        """Resolve ``auto`` and check the workers against the trainer of the teacher and of the
        first pending cell (before anything starts). A dry run of a GPU profile with ``auto`` on
        a machine without GPUs plans on one assumed GPU worker (``gpu:0``, not checked)."""
        seed, cells = next(iter(pending.items()))
        trainers = [
            compose(profile.teacher_overrides())["trainer"],
            compose(profile.cell_overrides(cells[0], seed))["trainer"],
        ]
        on_cpu = trainers[0].get("accelerator") == "cpu"
        if dry_run and not self.devices and not on_cpu and visible_gpus() == 0:
            return replace(self, devices=[Device("gpu", 0, "0")], assumed=True)
        devices = self.devices or auto_devices(on_cpu)
        for trainer in trainers:
            check_trainer(devices, trainer, profile.name)
        return replace(self, devices=devices)

    def describe(self, dry_run: bool = False) -> str:
        workers = ", ".join(
            f"{d.label} ({' '.join(f'{k}={v}' for k, v in d.env().items())})" for d in self.devices
        )
        text = (
            f"{len(self.devices)} worker(s) on this machine: {workers}; steps start in table "
            "order (seed by seed), each on the next free worker"
        )
        if dry_run:
            text += (
                "; durations are unknown, so the plan below assumes equal ones (round robin: "
                f"step k of each phase on worker k mod {len(self.devices)})"
            )
        if self.assumed:
            text += (
                "; this machine shows no GPU: the plan assumes one (run it where "
                "torch.cuda.device_count() > 0, or with --launcher slurm)"
            )
        return text

    def teacher(self, profile: Profile) -> Step:
        where = profile.teacher_dir
        args = ["train.py", *profile.teacher_overrides()]
        return Step("teacher", args, where / LOG_NAME, [("teacher", where)])

    def precompute(self, profile: Profile, method: str, overrides: list[str]) -> Step:
        where = profile.out / "precompute" / method
        args = ["-m", "distill.precompute", *overrides, f"hydra.run.dir={where}"]
        return Step(f"precompute {method}", args, where / LOG_NAME, [(method, where)])

    def cells(self, profile: Profile, pending: dict[int, list[str]]) -> list[Step]:
        return [
            Step(
                f"{cell}-s{seed}",
                ["train.py", *profile.cell_overrides(cell, seed)],
                profile.run_dir(cell, seed) / LOG_NAME,
                [(f"{cell}-s{seed}", profile.run_dir(cell, seed))],
            )
            for seed, cells in pending.items()
            for cell in cells
        ]

    def run(self, steps: Sequence[Step], runner: Runner, done: Done | None = None) -> list[int]:
        """Run ``steps`` on the workers; their exit statuses in step order. ``done(step, code)``
        is called as each one ends (not in a dry run, which prints the round-robin plan)."""
        if runner.dry_run:
            for step, device in round_robin(steps, self.devices):
                print(f"{step.name} -> {device.label}", flush=True)
                runner(step.args, step.log, device.env(), device.label)
            return [0] * len(steps)
        workers = self.devices[: len(steps)]
        quiet = replace(runner, echo=runner.echo and len(workers) == 1)
        free: queue.SimpleQueue[Device] = queue.SimpleQueue()
        for device in workers:
            free.put(device)
        mine = threading.local()

        def one(step: Step) -> int:
            device = mine.device
            print(f"{step.name} -> {device.label}", flush=True)
            code = quiet(step.args, step.log, device.env(), device.label)
            if done is not None:
                done(step, code)
            return code

        def claim() -> None:  # each pool thread owns one device for its lifetime
            mine.device = free.get_nowait()

        # the pool's work queue is FIFO: an idle thread takes the next step in table order
        with ThreadPoolExecutor(max(1, len(workers)), initializer=claim) as pool:
            return list(pool.map(one, steps))
