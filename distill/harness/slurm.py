"""Running on a SLURM cluster (``--launcher slurm``) through Hydra's submitit launcher.

Each step is a Hydra multirun (``train.py -m`` / ``distill.precompute -m``) with
``hydra/launcher=harness_slurm`` (``configs/hydra/launcher/harness_slurm.yaml``: submitit_slurm with
one GPU per job); the launcher submits its jobs as one job array and waits for them. The teacher
goes first, then the cached maps, then every pending cell: one sweep per group of cells that share
their pending seeds and method overrides (``seed=0,1 loss=ce,ce_kd,...``, job index = seed
position x cells + cell position), all groups submitted at once.

A job's directory is its run directory (``hydra.sweep.subdir=${paths.output_dir}``, absolute, so
``hydra.sweep.dir`` only holds the sweep's ``multirun.yaml`` and submitit's logs under
``<results>/slurm/<step>/``) and its run name is the local one (``<cell>-s<seed>``): a run started
on SLURM resumes locally and the other way round (``ckpt_path=auto``), and a requeued job resumes
from its run's last checkpoint. Every path a job reads or writes derives from the profile's
results folder and the repository (``paths.root_dir``: cached maps, data), none from the job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distill.harness.processes import LOG_NAME, Runner, Step
from distill.harness.profiles import HarnessError, Profile

LAUNCHER = "harness_slurm"  # configs/hydra/launcher/harness_slurm.yaml
JOB_DIR = "${paths.output_dir}"  # hydra.sweep.subdir: absolute, so it is the job's directory
Done = Callable[[Step, int], None]
_PLAIN = re.compile(r"[\w./@%+-]+")


def override_value(value: Any) -> str:
    """``value`` in Hydra's override syntax (strings quoted unless plain)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launcher_keys() -> list[str]:
    """The keys of Hydra's submitit SLURM launcher config."""
    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:
        raise HarnessError(
            "--launcher slurm needs Hydra's submitit launcher: pip install hydra-submitit-launcher"
        ) from None
    return [f.name for f in dataclasses.fields(SlurmQueueConf) if f.name != "_target_"]


def _pairs(profile_options: Mapping[str, Any], cli: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [(str(k), override_value(v)) for k, v in profile_options.items()]
    for option in cli:
        key, eq, value = option.partition("=")
        if not eq or not key.strip():
            raise HarnessError(f"--slurm-option {option!r}: expected KEY=VALUE, e.g. qos=high")
        pairs.append((key.strip(), value))
    return pairs


@dataclass
class Slurm:
    """Steps as SLURM job arrays (see the module docstring); ``options`` are ``hydra.launcher``
    overrides (the profile's ``slurm`` map, then the command line's)."""

    options: list[str]

    @classmethod
    def parse(cls, profile_options: Mapping[str, Any], cli: Sequence[str] = ()) -> Slurm:
        known = launcher_keys()
        pairs = _pairs(profile_options, cli)
        for key, _ in pairs:
            if key not in known:
                raise HarnessError(
                    f"unknown SLURM launcher option {key!r} (profile slurm: or --slurm-option); "
                    f"known: {', '.join(known)}"
                )
        return cls([f"hydra.launcher.{k}={v}" for k, v in pairs])

    def prepare(
        self, profile: Profile, pending: dict[int, list[str]], dry_run: bool = False
    ) -> Slurm:
        return self

    def describe(self, dry_run: bool = False) -> str:
        return (
            f"SLURM through Hydra's submitit launcher (hydra/launcher={LAUNCHER}): each step is "
            "a multirun submitted as one job array, waited for; the teacher, then the cached "
            "maps, then every cell sweep at once"
        )

    def _sweep(self, profile: Profile, name: str, overrides: list[str], job_dir: str) -> list[str]:
        return [
            *overrides,
            f"hydra.sweep.dir={profile.out / 'slurm' / name}",
            f"hydra.sweep.subdir={job_dir}",
            f"hydra/launcher={LAUNCHER}",
            f"hydra.launcher.name={profile.name}-{name}",
            *self.options,
        ]

    def _log(self, profile: Profile, name: str) -> Path:
        return profile.out / "slurm" / name / LOG_NAME

    def teacher(self, profile: Profile) -> Step:
        sweep = self._sweep(profile, "teacher", profile.teacher_overrides(), JOB_DIR)
        runs = [("teacher", profile.teacher_dir)]
        return Step("teacher", ["train.py", "-m", *sweep], self._log(profile, "teacher"), runs)

    def precompute(self, profile: Profile, method: str, overrides: list[str]) -> Step:
        name, where = f"precompute-{method}", profile.out / "precompute" / method
        sweep = self._sweep(profile, name, overrides, str(where))
        args = ["-m", "distill.precompute", "-m", *sweep]
        return Step(f"precompute {method}", args, self._log(profile, name), [(method, where)])

    def cells(self, profile: Profile, pending: dict[int, list[str]]) -> list[Step]:
        """One sweep per group of cells with the same pending seeds and method overrides."""
        groups: dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]] = {}
        for cell in profile.cells:
            seeds = tuple(s for s, cells in pending.items() if cell in cells)
            if seeds:
                groups.setdefault((seeds, tuple(profile.method_extra(cell))), []).append(cell)
        steps = []
        for k, ((seeds, _), cells) in enumerate(groups.items()):
            name = f"cells-{k}"
            overrides = profile.sweep_overrides(cells, list(seeds))
            runs = [(f"{c}-s{s}", profile.run_dir(c, s)) for s in seeds for c in cells]
            args = ["train.py", "-m", *self._sweep(profile, name, overrides, JOB_DIR)]
            note = (
                f"SLURM sweep {name}, job logs in {profile.out / 'slurm' / name / '.submitit'}; "
                "a job still queued or running (squeue) must end before a rerun"
            )
            steps.append(Step(name, args, self._log(profile, name), runs, note))
        return steps

    def run(self, steps: Sequence[Step], runner: Runner, done: Done | None = None) -> list[int]:
        """Submit every step at once and wait for all; exit statuses in step order. A dry run
        prints each command and which job index is which run."""
        quiet = replace(runner, echo=runner.echo and len(steps) == 1)

        def one(step: Step) -> int:
            print(f"{step.name}: SLURM job array of {len(step.runs)}, log {step.log}", flush=True)
            code = quiet(step.args, step.log)
            if runner.dry_run:
                for i, (run, run_dir) in enumerate(step.runs):
                    print(f"  job {i}: {run} -> {run_dir}")
            elif done is not None:
                done(step, code)
            return code

        if runner.dry_run or len(steps) <= 1:
            return [one(step) for step in steps]
        with ThreadPoolExecutor(len(steps)) as pool:
            return list(pool.map(one, steps))
