"""Running the protocol: the teacher, the cached teacher maps and every cell x seed, each as its
own process logged to ``<run dir>/harness.log`` (locally, on the workers of ``--devices``:
:mod:`distill.harness.devices`) or as SLURM job arrays (``--launcher slurm``:
:mod:`distill.harness.slurm`), under the results-folder lock; what failed is collected and summed
up at the end, the other steps still run."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.harness.devices import Local
from distill.harness.lock import results_lock
from distill.harness.processes import Runner, Step, exit_reason
from distill.harness.profiles import HarnessError, Profile
from distill.harness.records import GitRecorder, export_teacher_weights
from distill.harness.runs import (
    check_same_config,
    compose,
    config_mismatch,
    deviation,
    read_metrics,
)
from distill.harness.slurm import Slurm

Placement = Local | Slurm


@dataclass
class Failure:
    """A step that did not finish: what, why, and where its output is."""

    name: str
    reason: str
    log: Path


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _device_spec(profile: Profile, devices: str | None, n_jobs: int | None) -> str:
    """The ``--devices`` value, with the deprecated ``--n-jobs N`` / ``n_jobs`` as ``cpu:N``."""
    if n_jobs is not None:
        if devices is not None:
            raise HarnessError("give --devices or --n-jobs, not both (--n-jobs N is cpu:N)")
        if n_jobs < 1:
            raise HarnessError(f"--n-jobs {n_jobs}: use --devices cpu:N with N >= 1")
        _warn("--n-jobs is deprecated: use --devices cpu:N (N CPU workers) or 0,1 (GPUs)")
        return profile.devices if n_jobs == 1 else f"cpu:{n_jobs}"
    if devices is not None:
        return devices
    if profile.n_jobs != 1:
        if profile.devices != "auto":
            raise HarnessError("the profile sets devices and the deprecated n_jobs: drop n_jobs")
        _warn(f"profile key n_jobs is deprecated: use devices: cpu:{profile.n_jobs}")
        return f"cpu:{profile.n_jobs}"
    return profile.devices


def placement(
    profile: Profile,
    devices: str | None = None,
    n_jobs: int | None = None,
    launcher: str | None = None,
    slurm: Sequence[str] = (),
) -> Placement:
    """Where the steps run: the command line's choice, else the profile's (``devices``,
    ``launcher``, ``slurm``). Contradictory or malformed choices raise naming the fix."""
    kind = launcher or profile.launcher
    if kind == "slurm":
        if devices is not None or n_jobs is not None:
            flag = "--devices" if devices is not None else "--n-jobs"
            raise HarnessError(
                f"{flag} places runs on this machine; with --launcher slurm each run is a SLURM "
                "job: drop it and set the job's GPUs with --slurm-gpus N"
            )
        return Slurm.parse(profile.slurm, slurm)
    if kind != "local":
        raise HarnessError(f"unknown launcher {kind!r}: use local or slurm")
    if slurm:
        raise HarnessError(
            f"SLURM options ({', '.join(slurm)}) need --launcher slurm; drop them to run here"
        )
    return Local.parse(_device_spec(profile, devices, n_jobs))


def run_teacher(
    profile: Profile, runner: Runner, place: Placement, recorder: GitRecorder | None = None
) -> Failure | None:
    """Train the teacher unless it is finished; with ``recorder`` (``--commit``), export its
    weights and commit them with its records (also for a teacher finished earlier)."""
    overrides = profile.teacher_overrides()
    check_same_config(profile.teacher_dir, overrides)
    if read_metrics(profile.teacher_dir) is not None:
        print(f"teacher: finished, reusing {profile.teacher_dir}")
    else:
        step = place.teacher(profile)
        (code,) = place.run([step], runner)
        if code:
            return Failure("teacher", f"{exit_reason(code)}; no student run was started", step.log)
    if recorder is not None and not runner.dry_run:
        export_teacher_weights(profile.teacher_dir)
        recorder.commit_run("teacher", profile.teacher_dir)
    return None


def run_precompute(
    profile: Profile, pending: dict[int, list[str]], runner: Runner, place: Placement
) -> dict[str, Failure]:
    """Precompute teacher maps for every method whose pending cells read them from the cache
    (none once those cells are finished: a finished table needs no teacher checkpoint).
    Returns the failed methods."""
    methods = sorted({c.removesuffix("_kd") for cells in pending.values() for c in cells} - {"ce"})
    steps: dict[str, Step] = {}
    for method in methods:
        overrides = profile.cell_overrides(method, profile.seeds[0])
        if compose(overrides)["loss"]["teacher_maps"] == "cache":
            steps[method] = place.precompute(profile, method, [*overrides, *profile.precompute])
    codes = place.run(list(steps.values()), runner)
    return {
        method: Failure(step.name, exit_reason(code), step.log)
        for (method, step), code in zip(steps.items(), codes, strict=True)
        if code
    }


def pending_cells(profile: Profile, skip_other: bool = False) -> dict[int, list[str]]:
    """Per seed, the cells without a finished run (config mismatches raise; with
    ``skip_other`` they are neither pending nor raised: ``status`` lists them apart)."""
    todo: dict[int, list[str]] = {}
    for seed in profile.seeds:
        for cell in profile.cells:
            run_dir = profile.run_dir(cell, seed)
            overrides = profile.cell_overrides(cell, seed)
            if skip_other and config_mismatch(run_dir, overrides):
                continue
            check_same_config(run_dir, overrides)
            if read_metrics(run_dir) is None:
                todo.setdefault(seed, []).append(cell)
    return todo


def deviating_runs(profile: Profile) -> list[tuple[str, Path, str]]:
    """Finished runs that differ from the profile since their start (name, run directory, how:
    :func:`~distill.harness.runs.deviation`), the teacher first, then in table order. They count as
    finished, so ``run`` never retrains (or overwrites) them; ``report`` leaves them out of the
    means."""
    found = [("teacher", profile.teacher_dir, profile.teacher_overrides())]
    found += [
        (f"{cell}-s{seed}", profile.run_dir(cell, seed), profile.cell_overrides(cell, seed))
        for seed in profile.seeds
        for cell in profile.cells
    ]
    # a run of another configuration is listed as such (reporting.other_config_runs), not here
    found = [(n, d, o) for n, d, o in found if not config_mismatch(d, o)]
    return [(name, d, why) for name, d, overrides in found if (why := deviation(d, overrides))]


def deviation_lines(profile: Profile, command: str) -> list[str]:
    """One line per run of :func:`deviating_runs`, naming how to train it as the profile asks
    (``command``: this profile's ``run`` command)."""
    lines = []
    for name, run_dir, why in deviating_runs(profile):
        if name == "teacher":
            fix = "run the profile into another results folder (--results-dir NEW)"
        else:
            fix = f"to train it as the profile asks: mv {run_dir} {run_dir}.set-aside && {command}"
        lines.append(f"{name} differs from the profile ({why}): not in the table's means; {fix}")
    return lines


def _run_failure(name: str, run_dir: Path, code: int, step: Step) -> Failure | None:
    metrics = read_metrics(run_dir)
    if code == 0 and metrics is not None:
        print(f"{name}: finished, test error {metrics.get('test_error')}%", flush=True)
        return None
    reason = exit_reason(code) if code else "exited without writing metrics.json"
    reason += f" ({step.note})" if step.note else ""
    print(f"{name}: FAILED ({reason}); log: {step.log}", flush=True)
    return Failure(name, reason, step.log)


def run_cells(
    profile: Profile,
    pending: dict[int, list[str]],
    runner: Runner,
    place: Placement,
    skip: dict[str, Failure] | None = None,
    recorder: GitRecorder | None = None,
) -> list[Failure]:
    """Train every pending cell (as ``place`` runs them); a cell that dies does not stop the
    others. Cells of a method in ``skip`` (failed precompute) are not started. Returns the
    failures, in table order. With ``recorder``, each finished run's records are committed as it
    ends."""
    skip = skip or {}
    order = [f"{cell}-s{seed}" for seed, cells in pending.items() for cell in cells]
    failures: dict[str, Failure] = {}
    todo: dict[int, list[str]] = {}
    for seed, cells in pending.items():
        for cell in cells:
            cause = skip.get(cell.removesuffix("_kd"))
            if cause is None:
                todo.setdefault(seed, []).append(cell)
            else:
                reason = f"not started: {cause.name} failed"
                failures[f"{cell}-s{seed}"] = Failure(f"{cell}-s{seed}", reason, cause.log)

    def done(step: Step, code: int) -> None:
        for name, run_dir in step.runs:
            if failure := _run_failure(name, run_dir, code, step):
                failures[name] = failure
            elif recorder is not None:
                recorder.commit_run(name, run_dir)

    place.run(place.cells(profile, todo) if todo else [], runner, done)
    return [failures[name] for name in order if name in failures]


def run(
    profile: Profile,
    n_jobs: int | None = None,
    dry_run: bool = False,
    *,
    devices: str | None = None,
    launcher: str | None = None,
    slurm: Sequence[str] = (),
    commit: bool = False,
) -> list[Failure]:
    """The whole protocol, resumable: teacher, cached maps, every cell x seed, placed by
    :func:`placement` (``n_jobs`` is the deprecated form of ``devices="cpu:N"``). ``commit``:
    commit each finished run's records and the teacher's weights to git as they finish
    (:mod:`distill.harness.records`).

    Holds the results-folder lock throughout (not for ``dry_run``, which prints the plan and
    starts or writes nothing). Returns what failed: the teacher (then nothing else is started), or
    precomputes and cells (the others still run).
    """
    place = placement(profile, devices, n_jobs, launcher, slurm)
    if dry_run:
        return _run_locked(profile, place, Runner(dry_run=True))
    with results_lock(profile.out) as fd:
        recorder = GitRecorder(profile.out) if commit else None
        return _run_locked(profile, place, Runner(keep_fds=(fd,)), recorder)


def _run_locked(
    profile: Profile, place: Placement, runner: Runner, recorder: GitRecorder | None = None
) -> list[Failure]:
    pending = pending_cells(profile)
    if not pending:
        print(f"every run of profile {profile.name!r} is finished")
        return []
    place = place.prepare(profile, pending, runner.dry_run)
    print(f"placement: {place.describe(runner.dry_run)}", flush=True)
    failed = run_teacher(profile, runner, place, recorder)
    if failed is not None:
        return [failed]
    skip = run_precompute(profile, pending, runner, place)
    return [*skip.values(), *run_cells(profile, pending, runner, place, skip, recorder)]


def failure_summary(failures: Sequence[Failure]) -> str:
    """A header naming the fix, then one line per failed step with its log."""
    lines = [
        f"error: {len(failures)} step(s) failed; fix the cause (see the logs) and rerun the "
        "same command: finished runs are kept"
    ]
    lines += [f"  {f.name}: {f.reason}; log: {f.log}" for f in failures]
    return "\n".join(lines)
