"""The cost model of a profile: measured seconds per training step (``benchmarks/
bench_distill.py --json``) x images x epochs x runs, with the teacher-output memo, as a markdown
table.

With the memo (:mod:`distill.teacher.memo`) a step costs ``step_s`` when its teacher outputs are
memo hits and ``step_s_online`` when they are computed. The harness trains a seed's cells one after
another on the same (image, view) stream, so the first cell of a seed that needs a memo table
(the teacher logits, or one method's maps) fills it and the later cells of that seed hit it on
every step. A run that fills draws each image's view uniformly from ``V`` views once per epoch, so
in epoch ``e`` a draw misses with probability ``(1 - 1/V)^(D + e)``, ``D`` being the draws per
image of earlier seeds that filled the same table.

The step times were measured for WRN-16-2 students of a WRN-40-2 teacher. For the pairs of a
profile with ``pairs`` they are scaled by forward FLOPs at 32x32 (an estimate, not a measurement;
:func:`flops_scale`): the student's part of a step (its memo-hit time) by ``F(student) /
F(WRN-16-2)``, the teacher's part (online minus memo-hit time, the teacher run, the precomputed
maps) by ``F(teacher) / F(WRN-40-2)``, with ``F`` the forward FLOPs of one 32x32 image counted by
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from distill.harness.profiles import HarnessError, Profile
from distill.harness.runs import compose

VIEWS = 162  # pad 4: 9 x 9 crop offsets x 2 flips (distill.teacher.memo.num_views)
MEASURED = ("wrn16_2", "wrn40_2")  # the student and teacher the step times were measured with


@cache
def forward_flops(name: str, num_classes: int = 10) -> int:
    """FLOPs of one forward pass of registered model ``name`` on one 32x32 image (eval mode),
    as ``torch.utils.flop_counter.FlopCounterMode`` counts them (a multiply-add is 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distill.models import build_model

    net = build_model(name, num_classes=num_classes).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops())


def _model(cfg: dict[str, Any]) -> tuple[str, int]:
    """The registry name and class count of a composed run config's model."""
    from distill.models import model_name

    classes = cfg["data"].get("num_classes", 10)
    return model_name(cfg["model"]), int(classes) if isinstance(classes, int) else 10


def flops_scale(student: tuple[str, int], teacher: tuple[str, int]) -> tuple[float, float]:
    """The step-time factors of a pair: ``(F(student) / F(wrn16_2), F(teacher) / F(wrn40_2))``
    with ``F`` = :func:`forward_flops` (the measured models at 10 classes)."""
    return (
        forward_flops(*student) / forward_flops(MEASURED[0]),
        forward_flops(*teacher) / forward_flops(MEASURED[1]),
    )


def _scaled(
    hit_s: dict[str, float], online_s: dict[str, float], s: float, t: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Step times scaled per part: memo-hit steps (the student's work) by ``s``, the teacher's
    extra work (online - hit; the teacher run and precompute entirely) by ``t``."""
    teacher_only = {k for k in hit_s if k == "teacher" or k.startswith("precompute")}
    hit = {k: v * (t if k in teacher_only else s) for k, v in hit_s.items()}
    online = {
        k: v * t if k in teacher_only else hit_s.get(k, v) * s + (v - hit_s.get(k, v)) * t
        for k, v in online_s.items()
    }
    return hit, online


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


def memo_tables(loss: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The memo tables a run with this ``loss`` config reads (the teacher outputs its objectives
    read: ``logits``, ``maps-<method>`` for online CAM maps, ``at``, ``catkd``, ...), and those
    its misses fill (with the logits: every teacher pass gives them)."""
    from distill.objectives import teacher_needs  # imports torch: only when costing

    if not loss.get("teacher_memo", True):
        return set(), set()
    online = loss.get("teacher_maps") == "online"
    needs = {
        f"maps-{loss['method']}" if name == "maps" else name
        for name in teacher_needs(loss)
        if name != "maps" or online
    }
    return needs, (needs | {"logits"}) if needs else set()


def miss_fraction(prior_draws: int, epochs: int, views: int = VIEWS) -> float:
    """Mean over epochs of the probability that an epoch's view of an image was never drawn
    before (``prior_draws`` draws per image by earlier runs, then one per epoch of this run)."""
    keep = 1 - 1 / views
    return sum(keep ** (prior_draws + e) for e in range(epochs)) / max(epochs, 1)


def all_channel_scorecam(loss: dict[str, Any]) -> bool:
    """Score-CAM scoring all K channels: K student forwards per step by definition."""
    student = {**loss.get("cam", {}), **loss.get("student_cam", {})}
    return loss.get("method") == "scorecam" and student.get("max_channels") is None


def _read(step_times: Path) -> tuple[dict[str, Any], dict[str, float], dict[str, float], int]:
    try:
        record = json.loads(Path(step_times).read_text())
        measured, batch = record["step_s"], int(record["batch"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HarnessError(
            f"cannot read step times from {step_times} ({err}); write them with "
            "`python benchmarks/bench_distill.py --json FILE`"
        ) from err
    return record, measured, record.get("step_s_online", measured), batch


def cost(profile: Profile, step_times: Path) -> str:
    """Markdown cost model: measured seconds per training image x images x epochs x seeds.

    ``step_times`` is the JSON written by ``benchmarks/bench_distill.py --json``: one training
    step per cell (and ``teacher``, ``precompute``) at one batch size, timed on some machine;
    with ``--memo`` it holds memo-hit (``step_s``) and computed-teacher (``step_s_online``) times.
    Times scale per image to the profile's batch size; test passes and checkpointing are left out.
    """
    return estimate(profile, step_times)[0]


def estimate(profile: Profile, step_times: Path) -> tuple[str, float]:
    """:func:`cost`'s table and its total hours (for a pair of a profile with ``pairs``, with
    the step times scaled by forward FLOPs: the module docstring)."""
    record, hit_s, online_s, batch = _read(step_times)
    configs = {
        cell: compose(profile.cell_overrides(cell, profile.seeds[0])) for cell in profile.cells
    }
    teacher_cfg = compose(profile.teacher_overrides())
    scale_note = ""
    if profile.pair is not None:
        student, teacher = _model(configs[profile.cells[0]]), _model(teacher_cfg)
        s, t = flops_scale(student, teacher)
        hit_s, online_s = _scaled(hit_s, online_s, s, t)
        scale_note = (
            f"Estimate, not a measurement: the step times (measured with {MEASURED[0]} students "
            f"of a {MEASURED[1]} teacher) are scaled by forward FLOPs at 32x32 "
            f"(torch.utils.flop_counter.FlopCounterMode): student {student[0]} "
            f"{forward_flops(*student) / 1e6:.1f} MFLOPs = {s:.2f} x {MEASURED[0]}'s, teacher "
            f"{teacher[0]} {forward_flops(*teacher) / 1e6:.1f} MFLOPs = {t:.2f} x "
            f"{MEASURED[1]}'s (student part of a step x {s:.2f}, teacher part x {t:.2f})."
        )
    n_teacher = _train_images(teacher_cfg)
    rows = [
        _row(
            "teacher",
            [hit_s.get("teacher")],
            int(teacher_cfg["trainer"]["max_epochs"]),
            n_teacher,
            batch,
            "",
        )
    ]
    for method in _cached_methods(profile.cells, configs):
        key = "precompute" if method == "shapcam" else f"precompute {method}"
        rows.append(
            _row(f"cached teacher maps ({method})", [hit_s.get(key)], 1, n_teacher, batch, "")
        )
    rows += _cell_rows(profile, configs, hit_s, online_s, batch)
    text, total = _table(profile, record, step_times, batch, rows)
    return (f"{text}{scale_note}\n" if scale_note else text), total


def total_line(name: str, totals: Sequence[tuple[str, float]]) -> str:
    """The sum over the pairs of a profile with ``pairs`` (``totals``: pair, hours)."""
    each = ", ".join(f"{pair} {hours:.1f} h" for pair, hours in totals)
    return (
        f"**Total over the {len(totals)} pairs of profile `{name}`: "
        f"{sum(h for _, h in totals):.1f} h** of sequential training ({each})."
    )


def _cell_rows(
    profile: Profile,
    configs: dict[str, dict[str, Any]],
    hit_s: dict[str, float],
    online_s: dict[str, float],
    batch: int,
) -> list[dict[str, Any]]:
    """One row per cell; a cell's runs differ in memo hits (seed-major order, as the harness)."""
    steps: dict[str, list[float | None]] = {cell: [] for cell in profile.cells}
    hits: dict[str, list[float]] = {cell: [] for cell in profile.cells}
    filled_by_seeds: dict[str, int] = {}  # table -> earlier seeds that filled it
    for _ in profile.seeds:
        filled_now: set[str] = set()
        for cell, cfg in configs.items():
            needs, fills = memo_tables(cfg["loss"])
            epochs = int(cfg["trainer"]["max_epochs"])
            missing = needs - filled_now
            miss = max(
                (miss_fraction(filled_by_seeds.get(t, 0) * epochs, epochs) for t in missing),
                default=0.0,
            )
            hit, online = hit_s.get(cell), online_s.get(cell)
            step = None if hit is None or online is None else miss * online + (1 - miss) * hit
            steps[cell].append(step if needs else online)
            hits[cell].append(1 - miss if needs else float("nan"))
            filled_now |= fills
        for table in filled_now:
            filled_by_seeds[table] = filled_by_seeds.get(table, 0) + 1
    rows = []
    for cell, cfg in configs.items():
        note = (
            "profile overrides the preset (timed with its defaults)"
            if profile.method_extra(cell)
            else ""
        )
        row = _row(
            cell, steps[cell], int(cfg["trainer"]["max_epochs"]), _train_images(cfg), batch, note
        )
        row["memo_hits"] = hits[cell]
        row["scorecam_all"] = all_channel_scorecam(cfg["loss"])
        rows.append(row)
    return rows


def _row(
    name: str, steps: list[float | None], epochs: int, images: int, batch: int, note: str
) -> dict[str, Any]:
    known = None if None in steps else [float(s) for s in steps if s is not None]
    hours = None if known is None else [s / batch * images * epochs / 3600 for s in known]
    return {
        "name": name,
        "runs": len(steps),
        "epochs": epochs,
        "images": images,
        "steps": known,
        "hours": hours,
        "note": note,
        "memo_hits": [],
        "scorecam_all": False,
    }


def _table(
    profile: Profile,
    record: dict[str, Any],
    step_times: Path,
    batch: int,
    rows: list[dict[str, Any]],
) -> tuple[str, float]:
    machine = record.get("machine", {})
    flags = ", ".join(k for k in ("bf16", "channels_last", "memo") if machine.get(k)) or "fp32"
    lines = [
        f"Cost model for profile `{profile.name}` from {step_times} (measured at batch {batch}"
        f" on {machine.get('cpu', 'an unnamed machine')}, {flags}, "
        f"{record.get('date', 'undated')}): hours = s/step / {batch} x images x epochs, per run.",
        "",
        "| run | runs | epochs | images | s/step (mean over runs) | memo hits | h per run "
        "| h total | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    total = without_scorecam = 0.0
    missing = []
    for row in rows:
        head = f"| {row['name']} | {row['runs']} | {row['epochs']} | {row['images']} |"
        if row["hours"] is None:
            missing.append(row["name"])
            lines.append(f"{head} not measured | — | — | — | {row['note']} |")
            continue
        hits = [h for h in row["memo_hits"] if h == h]
        hit_text = f"{100 * sum(hits) / len(hits):.0f} %" if hits else "—"
        step = sum(row["steps"]) / len(row["steps"])
        run_total = sum(row["hours"])
        total += run_total
        without_scorecam += 0.0 if row["scorecam_all"] else run_total
        lines.append(
            f"{head} {step:.3f} | {hit_text} | {run_total / row['runs']:.2f} | {run_total:.2f} "
            f"| {row['note']} |"
        )
    scorecam = [r["name"] for r in rows if r["scorecam_all"]]
    lines += ["", f"**Total: {total:.1f} h** of sequential training (test passes excluded)."]
    if scorecam:
        lines.append(
            f"**Without the all-channel Score-CAM cells ({', '.join(scorecam)}): "
            f"{without_scorecam:.1f} h.**"
        )
    if missing:
        lines.append(f"Not measured, so not in the total: {', '.join(missing)}.")
    return "\n".join(lines) + "\n", total
