"""Reproduction harness for the Shap-CAM paper's CIFAR-10 table (WRN-40-2 -> WRN-16-2).

``python -m distill.harness run --profile cpu-mini`` trains (or reuses) the teacher, precomputes the
cached teacher maps, and trains every cell of the table for every seed, each as its own
``train.py`` process (``--n-jobs N`` runs N at once) whose output goes to ``<run dir>/harness.log``.
A cell that dies does not stop the others: the failed ones are listed at the end (with their log)
and the exit status is 1. Finished runs are skipped, interrupted runs resume from ``last.ckpt``, and
a run directory made with a different configuration is refused (by ``run``, ``status`` and
``report``). One ``run`` at a time per results folder (a lock file, ``.harness.lock``). Paths under
the results folder are stored relative to it (``${paths.log_dir}/...``), so a copied or moved
results folder stays valid. ``python -m distill.harness report --profile cpu-mini`` writes
``results/<profile>/table.md``, ``table.csv`` and ``chart.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import fcntl
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = ROOT / "configs" / "harness"

# Test error (%) of the WRN-16-2 student, Shap-CAM paper Table 4 (first three columns from the
# Grad-CAM++ paper, section 5). ShapleyCAM was not in the paper.
PAPER_ERRORS: dict[str, float] = {
    "ce": 6.78,
    "gradcam": 6.86,
    "gradcampp": 6.74,
    "scorecam": 6.75,
    "shapcam": 6.69,
    "ce_kd": 5.68,
    "gradcam_kd": 5.80,
    "gradcampp_kd": 5.56,
    "scorecam_kd": 5.42,
    "shapcam_kd": 5.37,
}
ALL_CELLS = ("ce", "gradcam", "gradcampp", "scorecam", "shapcam", "shapleycam")
IGNORED_KEYS = ("paths", "hydra", "run_name", "ckpt_path", "logger", "callbacks")
RESULTS_ROOT = "${paths.log_dir}"  # how paths under the results folder are stored in configs
LOCK_NAME = ".harness.lock"
LOG_NAME = "harness.log"


class HarnessError(RuntimeError):
    """Bad profile/cell names, or results that cannot be trusted."""


@dataclass
class Profile:
    """A reproduction protocol: which cells, seeds and Hydra overrides."""

    name: str
    seeds: list[int]
    cells: list[str]
    common: list[str] = field(default_factory=list)
    teacher: list[str] = field(default_factory=list)
    student: list[str] = field(default_factory=list)
    precompute: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    n_jobs: int = 1
    results_dir: str = "results"
    description: str = ""

    @classmethod
    def load(
        cls, name: str, directory: Path = PROFILE_DIR, results_dir: str | None = None
    ) -> Profile:
        """Profile ``name`` from ``directory``, or from a YAML file when ``name`` ends in .yaml."""
        path = Path(name) if name.endswith((".yaml", ".yml")) else Path(directory) / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in Path(directory).glob("*.yaml"))
            raise HarnessError(f"unknown profile {name!r}; choose one of {known}")
        data = yaml.safe_load(path.read_text())
        if results_dir is not None:
            data["results_dir"] = results_dir
        profile = cls(**data)
        bad = [c for c in profile.cells if c.removesuffix("_kd") not in ALL_CELLS]
        if bad:
            raise HarnessError(
                f"profile {name!r} names unknown cells {bad}; "
                f"known: {[c + s for c in ALL_CELLS for s in ('', '_kd')]}"
            )
        return profile

    @property
    def out(self) -> Path:
        return (ROOT / self.results_dir / self.name).resolve()  # absolute results_dir wins

    def run_dir(self, cell: str, seed: int) -> Path:
        return self.out / "runs" / f"{cell}-s{seed}"

    @property
    def teacher_dir(self) -> Path:
        return self.out / "runs" / "teacher"

    def location(self, task: str, run: str) -> list[str]:
        return [f"paths.log_dir={self.out}", f"task_name={task}", f"run_name={run}"]

    def teacher_overrides(self) -> list[str]:
        return [*self.common, *self.teacher, *self.location("runs", "teacher")]

    def method_extra(self, cell: str) -> list[str]:
        """Overrides for this cell's CAM method only (e.g. reduced permutations); spelled
        ``++key=value`` so they compose with any loss preset."""
        return list(self.method_overrides.get(cell.removesuffix("_kd"), []))

    def cell_overrides(self, cell: str, seed: int) -> list[str]:
        # relative to the results root (paths.log_dir): a copied results folder stays valid
        ckpt = f"{RESULTS_ROOT}/runs/teacher/checkpoints/last.ckpt"
        return [
            *self.common,
            *self.student,
            *self.method_extra(cell),
            f"loss={cell}",
            f"seed={seed}",
            f"teacher.checkpoint={ckpt}",
            *self.location("runs", f"{cell}-s{seed}"),
        ]


# --------------------------------------------------------------------------- configs
def _relative(value: Any, root: str) -> Any:
    """``value`` with the results root ``root`` spelled ``${paths.log_dir}`` in every string."""
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root + "/")):
        return RESULTS_ROOT + value[len(root) :]
    return value


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without run-location keys, with paths under its results root made relative.

    The root is the config's own ``paths.log_dir`` (the results folder it was written in), so runs
    saved with absolute paths by older versions compare equal after the folder is copied.
    """
    root = str((config.get("paths") or {}).get("log_dir") or "")
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    if not root or "${" in root:
        return kept
    return _relative(kept, root.rstrip("/"))


_COMPOSED: dict[tuple[str, ...], dict[str, Any]] = {}


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed training config for ``overrides`` (comparable form, see :func:`_comparable`)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = hydra_compose("train", overrides=list(overrides))
        _COMPOSED[key] = _comparable(OmegaConf.to_container(cfg, resolve=False))
    return copy.deepcopy(_COMPOSED[key])


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config saved in ``run_dir`` (comparable form), or None when there is none."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    return _comparable(yaml.safe_load(path.read_text()) or {})


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def config_mismatch(run_dir: Path, overrides: Sequence[str]) -> str | None:
    """Why ``run_dir``'s saved config differs from what ``overrides`` compose to (None: same, or
    nothing saved yet)."""
    found = saved_config(run_dir)
    if found is None:
        return None
    diff = _diff_keys(compose(overrides), found)
    return f"{run_dir} (differs in {', '.join(diff[:8])})" if diff else None


def check_same_config(run_dir: Path, overrides: Sequence[str]) -> None:
    """Refuse a run directory whose saved config differs from what the profile asks for."""
    mismatch = config_mismatch(run_dir, overrides)
    if mismatch:
        raise HarnessError(
            f"{mismatch} holds a run with a different config; it is not reused or merged: "
            "move it away, or run this profile into another results folder (--results-dir)"
        )


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- locking
def _lock_holder(handle: Any) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        info = {}
    pid, host = info.get("pid", "?"), info.get("host", "?")
    alive = ""
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = "; that process is gone but a training it started still runs"
        except PermissionError:
            pass
    return f"pid {pid} on {host}, started {info.get('started', '?')}{alive}"


def running_holder(directory: Path) -> str | None:
    """Who holds the results lock of ``directory`` now (None: nobody); takes no lock."""
    path = directory / LOCK_NAME
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(handle)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


@contextmanager
def results_lock(directory: Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``directory/.harness.lock`` (yields its file descriptor).

    The lock file records pid, host and start time for the message a second run prints. The kernel
    drops the lock when every holder has exited, so a killed run leaves no stale lock; runs started
    with the descriptor (``pass_fds``) keep it until they end, so an orphaned training still
    blocks a new harness run on the same folder.
    """
    path = directory / LOCK_NAME
    directory.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HarnessError(
                f"results folder {directory} is in use by another harness run "
                f"({_lock_holder(handle)}); wait for it to finish, or use another --results-dir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv,
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        try:
            yield handle.fileno()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- running
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


# --------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def check_report_configs(profile: Profile) -> None:
    """Refuse to report runs whose saved config differs from the profile (as ``run`` and
    ``status`` do): every mismatch is named in one message."""
    dirs = [(profile.teacher_dir, profile.teacher_overrides())]
    dirs += [
        (profile.run_dir(c, s), profile.cell_overrides(c, s))
        for c in profile.cells
        for s in profile.seeds
    ]
    bad = [m for d, o in dirs if (m := config_mismatch(d, o))]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise HarnessError(
            f"not reporting runs made with a different config than profile {profile.name!r}: "
            f"{'; '.join(bad[:3])}{more}; move them away, or report the profile they were run "
            "with"
        )


def collect(profile: Profile) -> list[dict[str, Any]]:
    """One row per cell: errors per seed, mean, std, missing seeds, paper value (runs whose config
    differs from the profile raise :class:`HarnessError`)."""
    check_report_configs(profile)
    rows = []
    for cell in profile.cells:
        errors, missing, wall = [], [], 0.0
        for seed in profile.seeds:
            metrics = read_metrics(profile.run_dir(cell, seed))
            if metrics is None or metrics.get("test_error") is None:
                missing.append(seed)
            else:
                errors.append(float(metrics["test_error"]))
                wall += float(metrics.get("wall_seconds") or 0.0)
        mean, std = _mean_std(errors) if errors else (float("nan"), float("nan"))
        rows.append(
            {
                "cell": cell,
                "errors": errors,
                "mean": mean,
                "std": std,
                "missing": missing,
                "paper": PAPER_ERRORS.get(cell, float("nan")),
                "wall_seconds": wall,
            }
        )
    return rows


def _baseline(cell: str) -> str:
    return "ce_kd" if cell.endswith("_kd") else "ce"


def pooled_sd(rows: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """Seed-noise standard deviation pooled over every cell with two or more seeds, and its
    degrees of freedom: ``sqrt(sum_cells sum_seeds (e - mean_cell)^2 / sum_cells (n - 1))``.

    One protocol's cells share the same seed noise, so pooling gives a far steadier estimate
    than each cell's own standard deviation from a handful of seeds. ``(nan, 0)`` without
    repeated seeds.
    """
    squares = sum(sum((e - r["mean"]) ** 2 for e in r["errors"]) for r in rows)
    dof = sum(max(len(r["errors"]) - 1, 0) for r in rows)
    return (math.sqrt(squares / dof), dof) if dof else (float("nan"), 0)


def _diff_se(row: dict[str, Any], base: dict[str, Any], sd: float) -> float:
    """Standard error of ``row``'s mean minus ``base``'s mean for seed noise ``sd``."""
    return sd * math.sqrt(1 / max(len(row["errors"]), 1) + 1 / max(len(base["errors"]), 1))


def _noise_note(row: dict[str, Any], base: dict[str, Any], sd: float) -> str:
    """Whether ``row``'s difference to its baseline exceeds 2 standard errors of a difference
    of means (:func:`_diff_se` with the pooled seed noise ``sd``)."""
    if row["cell"] == base["cell"] or not row["errors"] or not base["errors"]:
        return ""
    if not math.isfinite(sd):
        return "single seeds: noise unknown"
    beyond = abs(row["mean"] - base["mean"]) > 2 * _diff_se(row, base, sd)
    return "beyond 2 standard errors" if beyond else "within seed noise"


def _noise_footer(sd: float, dof: int, seeds: int) -> str:
    if not dof:
        return "Seed noise: unknown (no cell has two seeds)."
    threshold = 2 * sd * math.sqrt(2 / seeds)
    return (
        f"Seed noise: standard deviation {sd:.2f} points, pooled over the cells ({dof} degrees "
        f"of freedom). A difference to the baseline is noted as beyond noise when it exceeds 2 "
        f"standard errors of a difference of means ({threshold:.2f} points for {seeds} vs "
        f"{seeds} seeds); with many cells a few such notes arise by chance alone."
    )


def _fmt(x: float, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "—"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def report(profile: Profile) -> Path:
    """Write table.md, table.csv and chart.png under results/<profile>/."""
    rows = collect(profile)
    by_cell = {r["cell"]: r for r in rows}
    sd, dof = pooled_sd(rows)
    profile.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Student test error (%), profile `{profile.name}`",
        "",
        profile.description.strip(),
        "",
        "| cell | seeds | error (mean ± std) | paper | diff to paper | diff to baseline | note |",
        "|---|---|---|---|---|---|---|",
    ]
    with open(profile.out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "cell",
                "n_seeds",
                "errors",
                "mean",
                "std",
                "paper",
                "diff_paper",
                "baseline",
                "diff_baseline",
                "note",
                "missing_seeds",
            ]
        )
        for row in rows:
            base = by_cell.get(_baseline(row["cell"]))
            diff_base = row["mean"] - base["mean"] if base else float("nan")
            note = _noise_note(row, base, sd) if base else ""
            if row["missing"]:
                note = (note + "; " if note else "") + f"missing seeds {row['missing']}"
            cell_err = f"{_fmt(row['mean'])} ± {_fmt(row['std'])}"
            lines.append(
                f"| {row['cell']} | {len(row['errors'])} | {cell_err} | "
                f"{_fmt(row['paper'])} | {_fmt(row['mean'] - row['paper'], True)} | "
                f"{_fmt(diff_base, True)} | {note} |"
            )
            writer.writerow(
                [
                    row["cell"],
                    len(row["errors"]),
                    " ".join(f"{e:.2f}" for e in row["errors"]),
                    row["mean"],
                    row["std"],
                    row["paper"],
                    row["mean"] - row["paper"],
                    _baseline(row["cell"]),
                    diff_base,
                    note,
                    " ".join(map(str, row["missing"])),
                ]
            )
    teacher = read_metrics(profile.teacher_dir) or {}
    total = sum(r["wall_seconds"] for r in rows) + float(teacher.get("wall_seconds") or 0.0)
    lines += [
        "",
        f"Teacher test error: {_fmt(teacher.get('test_error') or float('nan'))}%. "
        f"Training wall time of the finished runs (teacher + cells, fit + test, "
        f"without precompute): {total / 60:.1f} min.",
        "",
        _noise_footer(sd, dof, len(profile.seeds)),
    ]
    (profile.out / "table.md").write_text("\n".join(lines) + "\n")
    _chart(rows, profile.out / "chart.png", profile.name, sd)
    return profile.out / "table.md"


def _chart(rows: list[dict[str, Any]], path: Path, title: str, sd: float) -> None:
    """Left: every seed's test error and the cell mean ± std. Right: each cell's difference to
    its baseline (mean ± 2 standard errors from the pooled seed noise) beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_cell = {r["cell"]: r for r in rows}
    names = [r["cell"] for r in rows]
    xs = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(rows)), 4.5))
    for x, r in zip(xs, rows, strict=True):
        left.scatter([x] * len(r["errors"]), r["errors"], color="tab:gray", s=12, zorder=3)
    stds = [r["std"] if math.isfinite(r["std"]) else 0.0 for r in rows]
    left.errorbar(
        xs,
        [r["mean"] for r in rows],
        yerr=stds,
        fmt="o",
        color="tab:blue",
        capsize=4,
        label="mean ± std over seeds",
    )
    left.set_ylabel("test error (%)")
    left.set_title("this run (grey: single seeds)")
    left.legend(fontsize=8)
    diffs = [
        r for r in rows if _baseline(r["cell"]) in by_cell and r["cell"] != _baseline(r["cell"])
    ]
    dx = range(len(diffs))
    ours, bars, paper = [], [], []
    for r in diffs:
        base = by_cell[_baseline(r["cell"])]
        ours.append(r["mean"] - base["mean"])
        bars.append(2 * _diff_se(r, base, sd) if math.isfinite(sd) else 0.0)
        paper.append(r["paper"] - base["paper"])
    right.axhline(0.0, color="black", lw=0.8)
    right.errorbar(
        dx, ours, yerr=bars, fmt="o", color="tab:blue", capsize=4, label="this run: mean ± 2 SE"
    )
    right.scatter(dx, paper, color="tab:red", marker="_", s=300, zorder=3, label="paper")
    right.set_ylabel("difference to CE / CE+KD baseline (points)")
    right.set_title("effect of the explanation term")
    right.legend(fontsize=8)
    for ax, labels, pos in ((left, names, xs), (right, [r["cell"] for r in diffs], dx)):
        ax.set_xticks(list(pos), labels, rotation=45, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"WRN-40-2 → WRN-16-2 student, profile {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------- cost model
def _train_images(cfg: dict[str, Any]) -> int:
    data = cfg["data"]
    full = 50_000 if data.get("source") != "synthetic" else int(data["synthetic_size"])
    n = full - int(data.get("val_size") or 0)
    return min(n, int(data["train_subset"])) if data.get("train_subset") else n


def _cached_methods(cells: Sequence[str], configs: dict[str, dict[str, Any]]) -> list[str]:
    methods = {
        str(configs[c]["loss"]["method"])
        for c in cells
        if configs[c]["loss"].get("method") and configs[c]["loss"].get("teacher_maps") == "cache"
    }
    return sorted(methods)


def cost(profile: Profile, step_times: Path) -> str:
    """Markdown cost model: measured seconds per training image x images x epochs x seeds.

    ``step_times`` is the JSON written by ``benchmarks/bench_distill.py --json``: one training
    step per cell (and ``teacher``, ``precompute``) at one batch size, timed on some machine.
    Times scale per image to the profile's batch size; test passes and checkpointing are left out.
    """
    try:
        record = json.loads(Path(step_times).read_text())
        measured, batch = record["step_s"], int(record["batch"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HarnessError(
            f"cannot read step times from {step_times} ({err}); write them with "
            "`python benchmarks/bench_distill.py --json FILE`"
        ) from err
    configs = {
        cell: compose(profile.cell_overrides(cell, profile.seeds[0])) for cell in profile.cells
    }
    teacher_cfg = compose(profile.teacher_overrides())
    rows: list[tuple[str, int, int, int, float | None, str]] = []
    n_teacher = _train_images(teacher_cfg)
    rows.append(
        (
            "teacher",
            1,
            int(teacher_cfg["trainer"]["max_epochs"]),
            n_teacher,
            measured.get("teacher"),
            "",
        )
    )
    for method in _cached_methods(profile.cells, configs):
        key = "precompute" if method == "shapcam" else f"precompute {method}"
        rows.append((f"cached teacher maps ({method})", 1, 1, n_teacher, measured.get(key), ""))
    for cell, cfg in configs.items():
        note = (
            "profile overrides the preset (timed with its defaults)"
            if profile.method_extra(cell)
            else ""
        )
        rows.append(
            (
                cell,
                len(profile.seeds),
                int(cfg["trainer"]["max_epochs"]),
                _train_images(cfg),
                measured.get(cell),
                note,
            )
        )
    lines = [
        f"Cost model for profile `{profile.name}` from {step_times} (measured at batch {batch}"
        f" on {record.get('machine', {}).get('cpu', 'an unnamed machine')}, "
        f"{record.get('date', 'undated')}): hours = s/step / {batch} x images x epochs x runs.",
        "",
        "| run | runs | epochs | images | s/step (measured) | h per run | h total | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    total, missing = 0.0, []
    for name, runs, epochs, images, step, note in rows:
        if step is None:
            missing.append(name)
            lines.append(
                f"| {name} | {runs} | {epochs} | {images} | not measured | — | — | {note} |"
            )
            continue
        hours = step / batch * images * epochs / 3600
        total += hours * runs
        lines.append(
            f"| {name} | {runs} | {epochs} | {images} | {step:.3f} | {hours:.2f} | "
            f"{hours * runs:.2f} | {note} |"
        )
    lines += ["", f"**Total: {total:.1f} h** of sequential training (test passes excluded)."]
    if missing:
        lines.append(f"Not measured, so not in the total: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.harness", description=__doc__)
    parser.add_argument("command", choices=["run", "report", "status", "cost"])
    parser.add_argument(
        "--profile", default="cpu-mini", help="a name in configs/harness/ or a .yaml"
    )
    parser.add_argument("--n-jobs", type=int, default=None, help="cells trained at once")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--results-dir", default=None, help="default: the profile's (results)")
    parser.add_argument(
        "--step-times",
        default=str(ROOT / "benchmarks" / "results" / "step_times_cpu.json"),
        help="cost: JSON from benchmarks/bench_distill.py --json",
    )
    args = parser.parse_args(argv)
    try:
        profile = Profile.load(args.profile, results_dir=args.results_dir)
        if args.command == "run":
            failures = run(profile, args.n_jobs, args.dry_run)
            print(f"report: {report(profile)}")
            if failures:
                print(failure_summary(failures), file=sys.stderr)
                return 1
        elif args.command == "report":
            print(report(profile).read_text())
        elif args.command == "cost":
            print(cost(profile, Path(args.step_times)))
        else:
            if holder := running_holder(profile.out):
                print(f"a harness run is in progress in {profile.out} ({holder})")
            pending = pending_cells(profile)
            for seed, cells in pending.items():
                print(f"seed {seed}: pending {cells}")
            if not pending:
                print(f"every run of profile {profile.name!r} is finished")
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
