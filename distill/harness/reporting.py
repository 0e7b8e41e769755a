"""The table of a profile's results: test errors per cell (mean, std, seed noise pooled over the
cells, differences to the paper and to the CE / CE+KD baseline) written as ``table.md``,
``table.csv`` and ``chart.png`` under the results folder."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.harness.profiles import HarnessError, Profile
from distill.harness.runs import config_mismatch, deviation, read_metrics

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


def rerun_command(profile: Profile, profile_arg: str | None = None) -> str:
    """The ``run`` command line of this profile (``profile_arg``: how ``--profile`` named it)."""
    command = f"python -m distill.harness run --profile {profile_arg or profile.name}"
    if profile.results_dir != "results":
        command += f" --results-dir {profile.results_dir}"
    return command


def collect(profile: Profile) -> list[dict[str, Any]]:
    """One row per cell: errors of the seeds that ran as the profile asks (NaN kept: a diverged
    run is a result), mean, std, missing seeds, diverged seeds, excluded runs (seed, run dir, how
    it differs: :func:`~distill.harness.runs.deviation`), paper value. Runs whose saved config
    differs from the profile raise :class:`HarnessError`."""
    check_report_configs(profile)
    rows = []
    for cell in profile.cells:
        errors, missing, diverged, excluded, wall = [], [], [], [], 0.0
        for seed in profile.seeds:
            run_dir = profile.run_dir(cell, seed)
            metrics = read_metrics(run_dir)
            if metrics is None or metrics.get("test_error") is None:
                missing.append(seed)
                continue
            wall += float(metrics.get("wall_seconds") or 0.0)
            if why := deviation(run_dir, profile.cell_overrides(cell, seed)):
                excluded.append((seed, run_dir, why))
                continue
            errors.append(float(metrics["test_error"]))
            if not math.isfinite(errors[-1]):
                diverged.append(seed)
        mean, std = _mean_std(errors) if errors else (float("nan"), float("nan"))
        rows.append(
            {
                "cell": cell,
                "errors": errors,
                "mean": mean,
                "std": std,
                "missing": missing,
                "diverged": diverged,
                "excluded": excluded,
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
    rows = [r for r in rows if math.isfinite(r["mean"])]  # a diverged cell has no seed noise
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
    if not math.isfinite(row["mean"]) or not math.isfinite(base["mean"]):
        return "" if row.get("diverged") else f"baseline {base['cell']} diverged"
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


class _Footnotes:
    """Markdown footnotes ``[^n]``, numbered as they are referenced."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        self.texts.append(text)
        return f"[^{len(self.texts)}]"

    def lines(self) -> list[str]:
        return [f"[^{n}]: {text}" for n, text in enumerate(self.texts, 1)]


def _seeds(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _error_cell(row: dict[str, Any], notes: _Footnotes, rerun: str) -> str:
    """``mean ± std``; ``NaN (diverged: seed 1)`` when a seed's test error is NaN; a footnote
    per diverged run (its run directory) and per run left out of the mean (what differs, and how
    to train it as the profile asks)."""
    if row["diverged"]:
        text = f"NaN (diverged: {_seeds(row['diverged'])})"
    else:
        text = f"{_fmt(row['mean'])} ± {_fmt(row['std'])}" if row["errors"] else "—"
    for seed in row["diverged"]:
        run_dir = row["run_dirs"][seed]
        text += notes.ref(
            f"`{row['cell']}` seed {seed}: test error NaN, the run diverged ({run_dir}); the "
            "cell's mean is NaN, not the mean of its other seeds."
        )
    for seed, run_dir, why in row["excluded"]:
        text += notes.ref(
            f"`{row['cell']}` seed {seed} is not in the mean: {why} ({run_dir}). To train it as "
            f"the profile asks: `mv {run_dir} {run_dir}.set-aside && {rerun}`."
        )
    return text


def _note(row: dict[str, Any], base: dict[str, Any] | None, sd: float) -> str:
    parts = [_noise_note(row, base, sd)] if base else []
    if row["excluded"]:
        seeds = [seed for seed, _, _ in row["excluded"]]
        parts.append(f"{_seeds(seeds)} not in the mean: differs from the profile")
    if row["missing"]:
        parts.append(f"missing seeds {row['missing']}")
    return "; ".join(p for p in parts if p)


def _teacher_lines(
    profile: Profile, teacher: dict[str, Any], notes: _Footnotes
) -> tuple[list[str], str]:
    """The footer's teacher sentence, and a warning above the table when the teacher differs
    from the profile (every distilled cell then does too; it cannot be left out of a mean)."""
    error = teacher.get("test_error")
    value = float("nan") if error is None else float(error)
    nan = error is not None and not math.isfinite(value)
    shown = "NaN (diverged)" if nan else f"{_fmt(value)}%"
    why = deviation(profile.teacher_dir, profile.teacher_overrides())
    if why is None:
        return [], f"Teacher test error: {shown}."
    ref = notes.ref(
        f"The teacher ({profile.teacher_dir}) {why}. To train the table as the profile asks, "
        f"run it into another results folder (`--results-dir NEW`)."
    )
    warning = f"**The teacher differs from the profile{ref}: so do the cells distilled from it.**"
    return [warning, ""], f"Teacher test error: {shown}{ref}."


def report(profile: Profile, profile_arg: str | None = None) -> Path:
    """Write table.md, table.csv and chart.png under results/<profile>/ (``profile_arg``: how
    ``--profile`` named the profile, for the rerun commands in the footnotes)."""
    rows = collect(profile)
    for row in rows:
        row["run_dirs"] = {s: profile.run_dir(row["cell"], s) for s in profile.seeds}
    by_cell = {r["cell"]: r for r in rows}
    sd, dof = pooled_sd(rows)
    notes, rerun = _Footnotes(), rerun_command(profile, profile_arg)
    teacher = read_metrics(profile.teacher_dir) or {}
    warning, teacher_line = _teacher_lines(profile, teacher, notes)
    profile.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Student test error (%), profile `{profile.name}`",
        "",
        profile.description.strip(),
        "",
        *warning,
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
                "diverged_seeds",
                "excluded_seeds",
                "excluded_why",
            ]
        )
        for row in rows:
            base = by_cell.get(_baseline(row["cell"]))
            diff_base = row["mean"] - base["mean"] if base else float("nan")
            note = _note(row, base, sd)
            lines.append(
                f"| {row['cell']} | {len(row['errors'])} | {_error_cell(row, notes, rerun)} | "
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
                    " ".join(map(str, row["diverged"])),
                    " ".join(str(seed) for seed, _, _ in row["excluded"]),
                    "; ".join(f"seed {seed}: {why}" for seed, _, why in row["excluded"]),
                ]
            )
    total = sum(r["wall_seconds"] for r in rows) + float(teacher.get("wall_seconds") or 0.0)
    lines += [
        "",
        f"{teacher_line} Training wall time of the finished runs (teacher + cells, fit + "
        f"test, without precompute): {total / 60:.1f} min.",
        "",
        _noise_footer(sd, dof, len(profile.seeds)),
    ]
    if notes.texts:
        lines += ["", *notes.lines()]
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
