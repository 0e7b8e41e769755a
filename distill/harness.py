"""Reproduction harness for the Shap-CAM paper's CIFAR-10 table (WRN-40-2 -> WRN-16-2).

``python -m distill.harness run --profile cpu-mini`` trains (or reuses) the teacher, precomputes the
cached teacher maps, and trains every cell of the table for every seed through ``train.py``
(Hydra multirun, so ``--launcher joblib`` runs cells in parallel). Finished runs are skipped,
interrupted runs resume from ``last.ckpt``, and a run directory made with a different configuration
is refused. ``python -m distill.harness report --profile cpu-mini`` writes
``results/<profile>/table.md``, ``table.csv`` and ``chart.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
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
        path = Path(directory) / f"{name}.yaml"
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
        """Overrides for this cell's CAM method only (e.g. reduced permutations); spell them
        ``++key=value`` so a multirun's first composition (with the default loss) accepts them."""
        return list(self.method_overrides.get(cell.removesuffix("_kd"), []))

    def cell_overrides(self, cell: str, seed: int) -> list[str]:
        ckpt = self.teacher_dir / "checkpoints" / "last.ckpt"
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
def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed training config for ``overrides`` (without run-location keys)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    data = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in data.items() if k not in IGNORED_KEYS}


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text())
    return {k: v for k, v in data.items() if k not in IGNORED_KEYS}


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_same_config(run_dir: Path, overrides: Sequence[str]) -> None:
    """Refuse a run directory whose saved config differs from what the profile asks for."""
    found = saved_config(run_dir)
    if found is None:
        return
    diff = _diff_keys(compose(overrides), found)
    if diff:
        raise HarnessError(
            f"{run_dir} holds a run with a different config (differs in {', '.join(diff[:8])}); "
            "it is not reused or merged: move it away, or run this profile into another "
            "results folder"
        )


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- running
def _python(args: Sequence[str], dry_run: bool) -> None:
    cmd = [sys.executable, *args]
    print("$", " ".join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "1"})


def run_teacher(profile: Profile, dry_run: bool = False) -> None:
    overrides = profile.teacher_overrides()
    check_same_config(profile.teacher_dir, overrides)
    if read_metrics(profile.teacher_dir) is not None:
        print(f"teacher: finished, reusing {profile.teacher_dir}")
        return
    _python(["train.py", *overrides], dry_run)


def run_precompute(profile: Profile, pending: dict[int, list[str]], dry_run: bool = False) -> None:
    """Precompute teacher maps for every method whose pending cells read them from the cache
    (none once those cells are finished: a finished table needs no teacher checkpoint)."""
    methods = sorted({c.removesuffix("_kd") for cells in pending.values() for c in cells} - {"ce"})
    for method in methods:
        overrides = profile.cell_overrides(method, profile.seeds[0])
        if compose(overrides)["loss"]["teacher_maps"] == "cache":
            where = f"hydra.run.dir={profile.out / 'precompute' / method}"
            _python(["-m", "distill.precompute", *overrides, *profile.precompute, where], dry_run)


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
    profile: Profile, pending: dict[int, list[str]], n_jobs: int, dry_run: bool = False
) -> None:
    """One Hydra multirun per seed and group of cells sharing their method overrides."""
    for seed, cells in pending.items():
        groups: dict[tuple[str, ...], list[str]] = {}
        for cell in cells:
            groups.setdefault(tuple(profile.method_extra(cell)), []).append(cell)
        for members in groups.values():
            overrides = [
                o
                for o in profile.cell_overrides(members[0], seed)
                if not o.startswith(("loss=", "run_name="))
            ]
            sweep = [
                f"loss={','.join(members)}",
                "run_name=${loss.name}-s${seed}",
                f"hydra.sweep.dir={profile.out / 'runs'}",
                "hydra.sweep.subdir=${run_name}",
            ]
            if n_jobs > 1:
                sweep += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}"]
            _python(["train.py", "-m", *overrides, *sweep], dry_run)


def run(profile: Profile, n_jobs: int | None = None, dry_run: bool = False) -> None:
    """The whole protocol, resumable: teacher, cached maps, every cell x seed."""
    pending = pending_cells(profile)
    if not pending:
        print(f"every run of profile {profile.name!r} is finished")
        return
    run_teacher(profile, dry_run)
    run_precompute(profile, pending, dry_run)
    run_cells(profile, pending, n_jobs or profile.n_jobs, dry_run)


# --------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def collect(profile: Profile) -> list[dict[str, Any]]:
    """One row per cell: errors per seed, mean, std, missing seeds, paper value."""
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
    parser.add_argument("--profile", default="cpu-mini")
    parser.add_argument("--n-jobs", type=int, default=None, help="parallel cells (joblib launcher)")
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
            run(profile, args.n_jobs, args.dry_run)
            print(f"report: {report(profile)}")
        elif args.command == "report":
            print(report(profile).read_text())
        elif args.command == "cost":
            print(cost(profile, Path(args.step_times)))
        else:
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
