"""The cost model of a profile: measured seconds per training step (``benchmarks/
bench_distill.py --json``) x images x epochs x runs, as a markdown table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.harness.profiles import HarnessError, Profile
from distill.harness.runs import compose


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
