"""The table of a profile's results (the columns are described in docs/harness.md): test errors
per cell (mean ± sd over seeds, seed noise pooled over the cells, paired differences to ``ce`` and
``ce_kd`` with 95 % t intervals, the fidelity columns of ``metrics.json``, the paper's value and,
at reduced scale, the rank correlation with the paper) written as ``table.md``, ``table.csv``,
``chart.png`` and a map figure (``explain.png``) under the results folder.

Paired difference of cell ``c`` to baseline ``b`` over the seeds ``S`` both finished (seeds share
the data order, so seed ``s``'s runs are a pair): ``d_s = e_c,s - e_b,s``, mean ``d̄``, sample sd
``s_d``, interval ``d̄ ± t_{0.975, |S|-1} · s_d / sqrt(|S|)`` (``scipy.stats.t``)."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.harness.profiles import HarnessError, Profile, table_cells
from distill.harness.runs import config_mismatch, deviation, read_metrics

# metrics.json keys shown as columns of table.md (every fidelity_*/faithfulness_* key is in the CSV)
FIDELITY_COLUMNS: dict[str, str] = {
    "fidelity_top1_agreement": "agree",
    "fidelity_kl_teacher_student": "KL(t‖s)",
    "fidelity_map_cosine_gradcam": "cos Grad-CAM",
    "fidelity_map_cosine_own": "cos own",
    "faithfulness_adcc": "ADCC",
}
FIDELITY_PREFIXES = ("fidelity_", "faithfulness_")
BASELINES = ("ce", "ce_kd")  # the paired differences' references


class NoRunsError(HarnessError):
    """No finished run of the profile's configuration: nothing to report (exit status 1)."""


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


def _profile_dirs(profile: Profile) -> list[tuple[str, Path, list[str]]]:
    """``(name, run dir, overrides)`` of the teacher and every cell x seed of the profile."""
    dirs = [("teacher", profile.teacher_dir, profile.teacher_overrides())]
    dirs += [
        (f"{c}-s{s}", profile.run_dir(c, s), profile.cell_overrides(c, s))
        for c in profile.cells
        for s in profile.seeds
    ]
    return dirs


def other_config_runs(profile: Profile) -> list[tuple[str, Path, str]]:
    """Runs whose saved config differs from the profile's (``name, run dir, how``): a run of
    another configuration (e.g. one made before the profile gained keys). ``status`` and
    ``report`` list them and leave them out; ``run`` refuses to train into them."""
    return [(n, d, m) for n, d, o in _profile_dirs(profile) if (m := config_mismatch(d, o))]


def check_report_configs(profile: Profile) -> None:
    """Refuse runs whose saved config differs from the profile, naming every mismatch."""
    bad = [m for _, _, m in other_config_runs(profile)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise HarnessError(
            f"runs made with a different config than profile {profile.name!r}: "
            f"{'; '.join(bad[:3])}{more}"
        )


def rerun_command(profile: Profile, profile_arg: str | None = None) -> str:
    """The ``run`` command line of this profile (``profile_arg``: how ``--profile`` named it)."""
    name = profile.name.removesuffix(f"/{profile.pair}") if profile.pair else profile.name
    command = f"python -m distill.harness run --profile {profile_arg or name}"
    if profile.pair:
        command += f" --pair {profile.pair}"
    if profile.results_dir != "results":
        command += f" --results-dir {profile.results_dir}"
    return command


def _fidelity_means(per_seed: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds of every ``fidelity_*``/``faithfulness_*`` number in ``metrics.json``."""
    keys = sorted({k for m in per_seed for k in m if k.startswith(FIDELITY_PREFIXES)})
    out = {}
    for key in keys:
        values = [float(m[key]) for m in per_seed if isinstance(m.get(key), int | float)]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def collect(profile: Profile) -> list[dict[str, Any]]:
    """One row per cell: errors of the seeds that ran as the profile asks (NaN kept: a diverged
    run is a result; ``by_seed`` maps seed -> error for the paired differences), mean, std,
    missing seeds, diverged seeds, excluded runs (seed, run dir, how it differs:
    :func:`~distill.harness.runs.deviation`), runs of another configuration (``other``, not
    counted), fidelity means over the counted seeds, paper value."""
    other = {d for _, d, _ in other_config_runs(profile)}
    rows = []
    for cell in profile.cells:
        errors, missing, diverged, excluded, wall = [], [], [], [], 0.0
        by_seed, fid, others = {}, [], []
        for seed in profile.seeds:
            run_dir = profile.run_dir(cell, seed)
            if run_dir in other:
                others.append(seed)
                continue
            metrics = read_metrics(run_dir)
            if metrics is None or metrics.get("test_error") is None:
                missing.append(seed)
                continue
            wall += float(metrics.get("wall_seconds") or 0.0)
            if why := deviation(run_dir, profile.cell_overrides(cell, seed)):
                excluded.append((seed, run_dir, why))
                continue
            errors.append(float(metrics["test_error"]))
            by_seed[seed] = errors[-1]
            fid.append(metrics)
            if not math.isfinite(errors[-1]):
                diverged.append(seed)
        mean, std = _mean_std(errors) if errors else (float("nan"), float("nan"))
        rows.append(
            {
                "cell": cell,
                "errors": errors,
                "by_seed": by_seed,
                "mean": mean,
                "std": std,
                "missing": missing,
                "diverged": diverged,
                "excluded": excluded,
                "other": others,
                "fidelity": _fidelity_means(fid),
                "paper": PAPER_ERRORS.get(cell, math.nan) if profile.pair is None else math.nan,
                "wall_seconds": wall,
            }
        )
    return rows


def paired_diff(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, float, int]:
    """``row`` minus ``base`` paired by seed: ``(mean, low, high, n)`` with the 95 % t interval
    over the ``n`` seeds both have (module doc); the interval is NaN for ``n < 2``, everything
    for ``n == 0`` or when a seed of either diverged (NaN error)."""
    from scipy import stats

    seeds = [s for s in row["by_seed"] if s in base["by_seed"]]
    diffs = [row["by_seed"][s] - base["by_seed"][s] for s in seeds]
    n = len(diffs)
    if n == 0 or not all(map(math.isfinite, diffs)):  # a diverged seed: NaN, as the cell's mean
        return float("nan"), float("nan"), float("nan"), n
    mean, sd = _mean_std(diffs)
    if n < 2:
        return mean, float("nan"), float("nan"), 1
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def rank_correlation(rows: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """Spearman's rank correlation of the cells' mean errors with the paper's, over the cells
    both have (finite), and their number; NaN below 3 cells."""
    from scipy import stats

    both = [r for r in rows if math.isfinite(r["mean"]) and math.isfinite(r["paper"])]
    if len(both) < 3:
        return float("nan"), len(both)
    rho = stats.spearmanr([r["mean"] for r in both], [r["paper"] for r in both]).statistic
    return float(rho), len(both)


def best_cam_cells(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table-4 CAM cell with the lowest mean error without KD and the one with KD (chosen
    at report time; cells without a finite mean are not candidates)."""
    best = []
    for kd in (False, True):
        cands = [
            r
            for r in rows
            if r["cell"] not in BASELINES
            and r["cell"].endswith("_kd") == kd
            and math.isfinite(r["mean"])
        ]
        if cands:
            best.append(min(cands, key=lambda r: r["mean"])["cell"])
    return best


def _baseline(cell: str) -> str:
    return "ce_kd" if cell.endswith("_kd") else "ce"


# a cell whose seeds spread more than this many times the other cells' pooled sd is unstable
# (3 seeds against ~30 pooled degrees of freedom: variance ratio 9, F-test p ~ 0.001)
UNSTABLE_RATIO = 3.0


def pooled_sd(rows: Sequence[dict[str, Any]], exclude: Sequence[str] = ()) -> tuple[float, int]:
    """Seed-noise standard deviation pooled over every cell with two or more seeds (but the
    cells named in ``exclude``), and its degrees of freedom:
    ``sqrt(sum_cells sum_seeds (e - mean_cell)^2 / sum_cells (n - 1))``.

    One protocol's cells share the same seed noise, so pooling gives a far steadier estimate
    than each cell's own standard deviation from a handful of seeds. ``(nan, 0)`` without
    repeated seeds.
    """
    # a diverged cell has no seed noise; an unstable one (see unstable_cells) has its own
    rows = [r for r in rows if math.isfinite(r["mean"]) and r["cell"] not in exclude]
    squares = sum(sum((e - r["mean"]) ** 2 for e in r["errors"]) for r in rows)
    dof = sum(max(len(r["errors"]) - 1, 0) for r in rows)
    return (math.sqrt(squares / dof), dof) if dof else (float("nan"), 0)


def unstable_cells(rows: Sequence[dict[str, Any]], ratio: float = UNSTABLE_RATIO) -> list[str]:
    """Cells whose seed standard deviation exceeds ``ratio`` times the noise pooled over the
    other cells: a seed that collapsed (e.g. to chance level) is not seed noise, and pooling it
    would hide every real difference in the table behind one unstable method."""
    unstable = []
    for row in rows:
        if len(row["errors"]) < 2 or not math.isfinite(row["mean"]):
            continue
        others, _ = pooled_sd([r for r in rows if r["cell"] != row["cell"]])
        if math.isfinite(others) and _mean_std(row["errors"])[1] > ratio * others:
            unstable.append(row["cell"])
    return unstable


def _diff_se(row: dict[str, Any], base: dict[str, Any], sd: float) -> float:
    """Standard error of ``row``'s mean minus ``base``'s mean for seed noise ``sd``."""
    return sd * math.sqrt(1 / max(len(row["errors"]), 1) + 1 / max(len(base["errors"]), 1))


def _noise_note(row: dict[str, Any], base: dict[str, Any], sd: float) -> str:
    """Whether ``row``'s difference to its baseline exceeds 2 standard errors of a difference
    of means (:func:`_diff_se` with the pooled seed noise ``sd``)."""
    if row["cell"] == base["cell"] or not row["errors"] or not base["errors"]:
        return ""
    if row.get("unstable") or base.get("unstable"):
        cell = row if row.get("unstable") else base
        return f"{cell['cell']}: seeds unstable (sd {cell['std']:.2f})"
    if not math.isfinite(row["mean"]) or not math.isfinite(base["mean"]):
        return "" if row.get("diverged") else f"baseline {base['cell']} diverged"
    if not math.isfinite(sd):
        return "single seeds: noise unknown"
    beyond = abs(row["mean"] - base["mean"]) > 2 * _diff_se(row, base, sd)
    return "beyond 2 standard errors" if beyond else "within seed noise"


def _noise_footer(sd: float, dof: int, seeds: int, unstable: Sequence[str] = ()) -> str:
    if not dof:
        return "Seed noise: unknown (no cell has two seeds)."
    threshold = 2 * sd * math.sqrt(2 / seeds)
    left_out = (
        f" Left out of the pool as unstable (seed sd over {UNSTABLE_RATIO:g} times that of the "
        f"other cells, e.g. a seed collapsed): {', '.join(f'`{c}`' for c in unstable)}; their "
        "differences get no noise verdict."
        if unstable
        else ""
    )
    return (
        f"Seed noise: standard deviation {sd:.2f} points, pooled over the cells ({dof} degrees "
        f"of freedom).{left_out} A difference to the baseline is noted as beyond noise when it "
        f"exceeds 2 standard errors of a difference of means ({threshold:.2f} points for {seeds} "
        f"vs {seeds} seeds); with many cells a few such notes arise by chance alone."
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


def _interval(d: tuple[float, float, float, int]) -> str:
    """``+1.20 [-0.40, +2.80]`` (mean and 95 % interval), ``+1.20`` for one pair, ``—`` for none."""
    mean, low, high, _ = d
    if not math.isfinite(mean):
        return "—"
    if not math.isfinite(low):
        return _fmt(mean, True)
    return f"{_fmt(mean, True)} [{_fmt(low, True)}, {_fmt(high, True)}]"


def _fid(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"


def paper_columns(profile: Profile) -> list[str]:
    """The paper's columns of ``profile``'s table: its value and our difference at full scale
    (profile ``paper``), its value for reference at reduced scale, none for a pair of a
    multi-pair profile (the paper measured only WRN-40-2 -> WRN-16-2 on CIFAR-10)."""
    if profile.pair is not None:
        return []
    return ["paper", "diff to paper"] if profile.name == "paper" else ["paper"]


def _header(paper: list[str]) -> list[str]:
    cols = ["cell", "seeds", "error (mean ± sd)", "Δ ce [95% CI]", "Δ ce_kd [95% CI]"]
    cols += [*FIDELITY_COLUMNS.values(), *paper]
    cols.append("note")
    return [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]


def _md_row(
    row: dict[str, Any],
    by_cell: dict[str, Any],
    sd: float,
    paper_cols: list[str],
    notes: _Footnotes,
    rerun: str,
) -> str:
    base = by_cell.get(_baseline(row["cell"]))
    diffs = [
        "" if b == row["cell"] else _interval(paired_diff(row, by_cell[b])) if b in by_cell else "—"
        for b in BASELINES
    ]
    fid = [_fid(row["fidelity"].get(k)) for k in FIDELITY_COLUMNS]
    paper = [_fmt(row["paper"]), _fmt(row["mean"] - row["paper"], True)][: len(paper_cols)]
    cols = [row["cell"], str(len(row["errors"])), _error_cell(row, notes, rerun), *diffs, *fid]
    return f"| {' | '.join([*cols, *paper, _note(row, base, sd)])} |"


CSV_HEADER = [
    "table",
    "cell",
    "n_seeds",
    "errors",
    "mean",
    "std",
    *(f"{k}_{b}" for b in BASELINES for k in ("diff", "diff_low", "diff_high", "n_pairs")),
    "paper",
    "diff_paper",
    "baseline",
    "diff_baseline",
    "note",
    "missing_seeds",
    "diverged_seeds",
    "excluded_seeds",
    "excluded_why",
    "other_config_seeds",
]


def _csv_row(
    table: str, row: dict[str, Any], by_cell: dict[str, Any], sd: float, fid_keys: list[str]
) -> list[Any]:
    base = by_cell.get(_baseline(row["cell"]))
    pairs = []
    for b in BASELINES:
        d = paired_diff(row, by_cell[b]) if b in by_cell else (math.nan,) * 3 + (0,)
        pairs += list(d)
    return [
        table,
        row["cell"],
        len(row["errors"]),
        " ".join(f"{e:.2f}" for e in row["errors"]),
        row["mean"],
        row["std"],
        *pairs,
        row["paper"],
        row["mean"] - row["paper"],
        _baseline(row["cell"]),
        row["mean"] - base["mean"] if base else float("nan"),
        _note(row, base, sd),
        " ".join(map(str, row["missing"])),
        " ".join(map(str, row["diverged"])),
        " ".join(str(seed) for seed, _, _ in row["excluded"]),
        "; ".join(f"seed {seed}: {why}" for seed, _, why in row["excluded"]),
        " ".join(map(str, row["other"])),
        *(row["fidelity"].get(k, float("nan")) for k in fid_keys),
    ]


def _split(profile: Profile, rows: list[dict[str, Any]]) -> tuple[list, list]:
    """Table 4's rows (the table cells of the profile) and the baselines table's rows (``ce``,
    ``ce_kd``, the profile's other cells, the best CAM cells), or ``[]`` when it lists none."""
    table = set(table_cells())
    first = [r for r in rows if r["cell"] in table]
    extra = [r for r in rows if r["cell"] not in table]
    if not extra:
        return first, []
    by_cell = {r["cell"]: r for r in rows}
    names = [b for b in BASELINES if b in by_cell] + [r["cell"] for r in extra]
    names += best_cam_cells(first)
    return first, [by_cell[n] for n in names]


def _teacher_faithfulness(teacher: dict[str, Any]) -> str:
    found = {k: v for k, v in teacher.items() if k.startswith("faithfulness_")}
    if not found:
        return ""
    text = ", ".join(
        f"{k.removeprefix('faithfulness_')} {_fid(float(v))}" for k, v in found.items()
    )
    return f" Teacher faithfulness (own Grad-CAM maps): {text}."


def _teacher_row(teacher: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher as a table row (its error and faithfulness numbers; no seeds, no pairs)."""
    error = teacher.get("test_error")
    if error is None:
        return None
    fid = _fidelity_means([teacher])
    return {
        **{k: [] for k in ("missing", "diverged", "excluded", "other")},
        "cell": "teacher",
        "errors": [float(error)],
        "by_seed": {},
        "mean": float(error),
        "std": float("nan"),
        "fidelity": fid,
        "paper": float("nan"),
    }


def _other_lines(other: list[tuple[str, Path, str]]) -> list[str]:
    if not other:
        return []
    return [
        f"**{len(other)} run(s) of another configuration, listed here and not counted:** "
        + "; ".join(why for _, _, why in other),
        "",
    ]


def report(profile: Profile, profile_arg: str | None = None, figure: bool = True) -> Path:
    """Write table.md, table.csv, chart.png and (``figure``: when the teacher and a seed's
    students have checkpoints) explain.png under results/<profile>/ (``profile_arg``: how
    ``--profile`` named the profile, for the rerun commands in the footnotes). Raises
    :class:`NoRunsError`, writing nothing, when no run of the profile's configuration finished
    (runs that differ from the profile count as found: the table footnotes them)."""
    rows = collect(profile)
    other = other_config_runs(profile)
    if not any(r["errors"] or r["excluded"] for r in rows):  # excluded: finished, footnoted
        listed = f"; {len(other)} run(s) of another configuration: " if other else ""
        if other:
            listed += ", ".join(str(d) for _, d, _ in other[:3])
            listed += f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise NoRunsError(
            f"no finished run of profile {profile.name!r} in {profile.out}{listed}; train them "
            f"with `{rerun_command(profile, profile_arg)}`"
        )
    for row in rows:
        row["run_dirs"] = {s: profile.run_dir(row["cell"], s) for s in profile.seeds}
    by_cell = {r["cell"]: r for r in rows}
    unstable = unstable_cells(rows)
    for row in rows:
        row["unstable"] = row["cell"] in unstable
    sd, dof = pooled_sd(rows, unstable)
    paper = paper_columns(profile)
    notes, rerun = _Footnotes(), rerun_command(profile, profile_arg)
    teacher_other = any(n == "teacher" for n, _, _ in other)
    teacher = {} if teacher_other else read_metrics(profile.teacher_dir) or {}
    warning, teacher_line = _teacher_lines(profile, teacher, notes)
    first, second = _split(profile, rows)
    profile.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Student test error (%), profile `{profile.name}`",
        "",
        profile.description.strip(),
        "",
        *warning,
        *_other_lines(other),
        *_header(paper),
        *(_md_row(r, by_cell, sd, paper, notes, rerun) for r in first),
    ]
    teacher_row = _teacher_row(teacher)
    if teacher_row:  # no pairs, no noise note: its faithfulness beside the students'
        lines.append(_md_row(teacher_row, {}, sd, paper, notes, rerun))
    if second:
        lines += [
            "",
            "## Baselines",
            "",
            "`ce`, `ce_kd`, the profile's baseline cells and the best CAM cells of the table "
            "above (lowest mean error without and with KD, chosen now).",
            "",
            *_header(paper),
            *(_md_row(r, by_cell, sd, paper, notes, rerun) for r in second),
        ]
    teachers = [teacher_row] if teacher_row else []
    fid_keys = sorted({k for r in [*rows, *teachers] for k in r["fidelity"]})
    with open(profile.out / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_HEADER, *fid_keys])
        for table, group in (("table4", first), ("baselines", second), ("teacher", teachers)):
            for row in group:
                writer.writerow(_csv_row(table, row, by_cell, sd, fid_keys))
    total = sum(r["wall_seconds"] for r in rows) + float(teacher.get("wall_seconds") or 0.0)
    lines += [
        "",
        f"{teacher_line}{_teacher_faithfulness(teacher)} Training wall time of the finished "
        f"runs (teacher + cells, fit + test, without precompute): {total / 60:.1f} min.",
        "",
        _noise_footer(sd, dof, len(profile.seeds), unstable),
    ]
    if paper == ["paper"]:  # reduced scale
        rho, n = rank_correlation(first)
        shown = f"{rho:+.2f}" if math.isfinite(rho) else "— (fewer than 3 cells)"
        lines += [
            "",
            f"Reduced scale: the paper's errors are shown for reference only; the ranking of "
            f"the cells against the paper's: Spearman ρ = {shown} over {n} cells.",
        ]
    if figure and (fig := _map_figure(profile, first + second)):
        lines += ["", fig]
    if notes.texts:
        lines += ["", *notes.lines()]
    (profile.out / "table.md").write_text("\n".join(lines) + "\n")
    heading = f"pair {profile.pair}" if profile.pair else "WRN-40-2 → WRN-16-2"
    _chart(rows, profile.out / "chart.png", f"{heading} student, profile {profile.name}", sd)
    return profile.out / "table.md"


def _map_figure(profile: Profile, rows: list[dict[str, Any]]) -> str:
    """``explain.png``: the teacher's and the students' Grad-CAM maps of one seed (the first
    whose every reported cell has a checkpoint, else the seed with most) on the same test
    images (:func:`distill.explain.explain_figure`); the markdown line linking it, or ``""``
    when the teacher or every student lacks a checkpoint."""
    ckpt = "checkpoints/last.ckpt"
    if not (profile.teacher_dir / ckpt).exists():
        return ""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    have = {s: [c for c in cells if (profile.run_dir(c, s) / ckpt).exists()] for s in profile.seeds}
    seed = max(profile.seeds, key=lambda s: len(have[s]))
    if not have[seed]:
        return ""
    from distill.explain import explain_figure

    students = {c: profile.run_dir(c, seed) for c in have[seed]}
    try:
        explain_figure(
            profile.teacher_dir, students, methods=["gradcam"], out_path=profile.out / "explain.png"
        )
    except Exception as err:  # a figure must not cost the table: say why it is missing
        print(f"warning: no map figure ({type(err).__name__}: {err})", file=sys.stderr)
        return f"No map figure: {type(err).__name__}: {err}"
    return (
        f"Maps: [explain.png](explain.png) — the teacher's and seed {seed}'s students' Grad-CAM "
        "maps on the same test images; per-student agreement in explain.md."
    )


def _unstable_points(
    rows: list[dict[str, Any]], values: list[float]
) -> list[tuple[int, float, str]]:
    """``(x, value, cell)`` of the unstable cells among ``rows`` plotted at ``values``."""
    pairs = zip(rows, values, strict=True)
    return [(x, v, r["cell"]) for x, (r, v) in enumerate(pairs) if r.get("unstable")]


def _focus(ax: Any, values: list[float], off: list[tuple[int, float, str]]) -> None:
    """Scale ``ax`` to ``values`` (the stable cells) and write each unstable cell's value at the
    edge it lies beyond, so that one collapsed cell does not flatten the others."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = 0.15 * (high - low) or 1.0
    ax.set_ylim(low - pad, high + 1.8 * pad)
    for x, value, cell in off:
        if low - pad <= value <= high + 1.8 * pad:
            continue
        y = high + 1.2 * pad if value > high else low - 0.6 * pad
        ax.annotate(
            f"{cell}: {value:.1f}\n(off scale)", (x, y), ha="center", fontsize=7, color="tab:red"
        )


def _chart(rows: list[dict[str, Any]], path: Path, title: str, sd: float) -> None:
    """Left: every seed's test error and the cell mean ± std. Middle: each cell's difference to
    its baseline (mean ± 2 standard errors from the pooled seed noise) beside the paper's.
    Right, when the runs recorded them: the fidelity fractions (top-1 agreement, map cosines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_keys = [
        k
        for k in ("fidelity_top1_agreement", "fidelity_map_cosine_gradcam", "faithfulness_adcc")
        if any(math.isfinite(r["fidelity"].get(k, math.nan)) for r in rows)
    ]
    by_cell = {r["cell"]: r for r in rows}
    names = [r["cell"] for r in rows]
    xs = range(len(rows))
    panels = 3 if fid_keys else 2
    fig, axes = plt.subplots(1, panels, figsize=(max(5 * panels, 1.2 * len(rows) * 1.5), 4.5))
    left, right = axes[0], axes[1]
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
    if any(r.get("unstable") for r in rows):  # scale to the stable cells, mark the others
        stable = [r for r in rows if not r.get("unstable") and r["errors"]]
        means = [r["mean"] for r in rows]
        _focus(left, [e for r in stable for e in r["errors"]], _unstable_points(rows, means))
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
        own = r["std"] if r.get("unstable") else sd  # not in the pool
        bars.append(2 * _diff_se(r, base, own) if math.isfinite(own) else 0.0)
        paper.append(r["paper"] - base["paper"])
    right.axhline(0.0, color="black", lw=0.8)
    right.errorbar(
        dx, ours, yerr=bars, fmt="o", color="tab:blue", capsize=4, label="this run: mean ± 2 SE"
    )
    if any(r.get("unstable") for r in diffs):
        ends = [
            d + sign * b
            for r, d, b in zip(diffs, ours, bars, strict=True)
            for sign in (-1, 1)
            if not r.get("unstable") and math.isfinite(d)
        ]
        _focus(right, [*ends, 0.0], _unstable_points(diffs, ours))
    if any(map(math.isfinite, paper)):  # none for a pair the paper did not measure
        right.scatter(dx, paper, color="tab:red", marker="_", s=300, zorder=3, label="paper")
    right.set_ylabel("difference to CE / CE+KD baseline (points)")
    right.set_title("effect of the explanation term")
    right.legend(fontsize=8)
    for ax, labels, pos in ((left, names, xs), (right, [r["cell"] for r in diffs], dx)):
        ax.set_xticks(list(pos), labels, rotation=45, ha="right")
        ax.grid(axis="y", alpha=0.3)
    if fid_keys:
        ax = axes[2]
        for i, key in enumerate(fid_keys):
            values = [r["fidelity"].get(key, math.nan) for r in rows]
            ax.scatter([x + 0.2 * (i - 1) for x in xs], values, s=18, label=key)
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set_ylabel("fraction (mean over seeds)")
        ax.set_title("fidelity to the teacher")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
