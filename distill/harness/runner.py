"""Running the protocol: the teacher, the cached teacher maps and every cell x seed, each as its
own process logged to ``<run dir>/harness.log``, under the results-folder lock; what failed is
collected and summed up at the end, the other steps still run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from distill.harness.lock import results_lock
from distill.harness.profiles import ROOT, Profile
from distill.harness.runs import check_same_config, compose, read_metrics

LOG_NAME = "harness.log"


@dataclass
class Failure:
    """A step that did not finish: what, why, and where its output is."""

    name: str
    reason: str
    log: Path


@dataclass
class Runner:
    """Starts ``python ARGS`` processes from the repository root, each logged to a file.

    ``echo`` copies the output to the console as well (off when several run at once);
    ``keep_fds`` are inherited by the processes (the results lock).
    """

    dry_run: bool = False
    echo: bool = True
    keep_fds: tuple[int, ...] = ()

    def __call__(self, args: Sequence[str], log: Path) -> int:
        """Run ``python ARGS``, appending its stdout and stderr to ``log``; the exit status."""
        cmd = [sys.executable, *args]
        print("$", shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} $ {shlex.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=self.keep_fds,
            )
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(1 << 16):
                out.write(chunk)
                if self.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return proc.wait()


def _exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def run_teacher(profile: Profile, runner: Runner) -> Failure | None:
    overrides = profile.teacher_overrides()
    check_same_config(profile.teacher_dir, overrides)
    if read_metrics(profile.teacher_dir) is not None:
        print(f"teacher: finished, reusing {profile.teacher_dir}")
        return None
    log = profile.teacher_dir / LOG_NAME
    code = runner(["train.py", *overrides], log)
    reason = f"{_exit_reason(code)}; no student run was started"
    return Failure("teacher", reason, log) if code else None


def run_precompute(
    profile: Profile, pending: dict[int, list[str]], runner: Runner
) -> dict[str, Failure]:
    """Precompute teacher maps for every method whose pending cells read them from the cache
    (none once those cells are finished: a finished table needs no teacher checkpoint).
    Returns the failed methods."""
    methods = sorted({c.removesuffix("_kd") for cells in pending.values() for c in cells} - {"ce"})
    failed: dict[str, Failure] = {}
    for method in methods:
        overrides = profile.cell_overrides(method, profile.seeds[0])
        if compose(overrides)["loss"]["teacher_maps"] == "cache":
            where = profile.out / "precompute" / method
            args = ["-m", "distill.precompute", *overrides, *profile.precompute]
            code = runner([*args, f"hydra.run.dir={where}"], where / LOG_NAME)
            if code:
                failed[method] = Failure(
                    f"precompute {method}", _exit_reason(code), where / LOG_NAME
                )
    return failed


def pending_cells(profile: Profile) -> dict[int, list[str]]:
    """Per seed, the cells without a finished run (config mismatches raise)."""
    todo: dict[int, list[str]] = {}
    for seed in profile.seeds:
        for cell in profile.cells:
            run_dir = profile.run_dir(cell, seed)
            check_same_config(run_dir, profile.cell_overrides(cell, seed))
            if read_metrics(run_dir) is None:
                todo.setdefault(seed, []).append(cell)
    return todo


def run_cells(
    profile: Profile,
    pending: dict[int, list[str]],
    runner: Runner,
    n_jobs: int = 1,
    skip: dict[str, Failure] | None = None,
) -> list[Failure]:
    """Train every pending cell as its own process (``n_jobs`` at once); a cell that dies does
    not stop the others. Cells of a method in ``skip`` (failed precompute) are not started.
    Returns the failures, in table order."""
    skip = skip or {}
    jobs = [(cell, seed) for seed, cells in pending.items() for cell in cells]

    def one(job: tuple[str, int]) -> Failure | None:
        cell, seed = job
        name, log = f"{cell}-s{seed}", profile.run_dir(cell, seed) / LOG_NAME
        if cell.removesuffix("_kd") in skip:
            cause = skip[cell.removesuffix("_kd")]
            return Failure(name, f"not started: {cause.name} failed", cause.log)
        code = runner(["train.py", *profile.cell_overrides(cell, seed)], log)
        if runner.dry_run:
            return None
        metrics = read_metrics(profile.run_dir(cell, seed))
        if code == 0 and metrics is not None:
            print(f"{name}: finished, test error {metrics.get('test_error')}%", flush=True)
            return None
        reason = _exit_reason(code) if code else "exited without writing metrics.json"
        print(f"{name}: FAILED ({reason}); log: {log}", flush=True)
        return Failure(name, reason, log)

    if n_jobs > 1:
        with ThreadPoolExecutor(n_jobs) as pool:
            results = list(pool.map(one, jobs))
    else:
        results = [one(job) for job in jobs]
    return [f for f in results if f is not None]


def run(profile: Profile, n_jobs: int | None = None, dry_run: bool = False) -> list[Failure]:
    """The whole protocol, resumable: teacher, cached maps, every cell x seed.

    Holds the results-folder lock throughout (not for ``dry_run``). Returns what failed: the
    teacher (then nothing else is started), or precomputes and cells (the others still run).
    """
    if dry_run:
        return _run_locked(profile, n_jobs, Runner(dry_run=True))
    with results_lock(profile.out) as fd:
        jobs = n_jobs or profile.n_jobs
        return _run_locked(profile, jobs, Runner(echo=jobs <= 1, keep_fds=(fd,)))


def _run_locked(profile: Profile, n_jobs: int | None, runner: Runner) -> list[Failure]:
    pending = pending_cells(profile)
    if not pending:
        print(f"every run of profile {profile.name!r} is finished")
        return []
    failed = run_teacher(profile, runner)
    if failed is not None:
        return [failed]
    skip = run_precompute(profile, pending, runner)
    return [*skip.values(), *run_cells(profile, pending, runner, n_jobs or 1, skip)]


def failure_summary(failures: Sequence[Failure]) -> str:
    """A header naming the fix, then one line per failed step with its log."""
    lines = [
        f"error: {len(failures)} step(s) failed; fix the cause (see the logs) and rerun the "
        "same command: finished runs are kept"
    ]
    lines += [f"  {f.name}: {f.reason}; log: {f.log}" for f in failures]
    return "\n".join(lines)
