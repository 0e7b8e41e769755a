"""The loss presets (``configs/loss/<name>.yaml``) and the table cells derived from them.

A CAM method registered in :data:`cams.METHODS` becomes trainable by two preset files,
``configs/loss/<method>.yaml`` and ``<method>_kd.yaml``; a distillation objective registered in
:data:`distill.objectives.OBJECTIVES` (a baseline such as DKD) by ``configs/loss/<name>.yaml``
and, where the method is defined with Hinton KD, ``<name>_kd.yaml``. The harness's table cells,
the benchmark rows and the preset tests are read from here, so no other list needs an edit.
"""

from __future__ import annotations

from pathlib import Path

import cams

__all__ = ["LOSS_DIR", "baseline_presets", "loss_presets", "table_methods"]

LOSS_DIR = Path(__file__).resolve().parents[1] / "configs" / "loss"


def loss_presets() -> list[str]:
    """Every selectable ``loss=...`` preset (files starting with ``_`` are shared parts)."""
    return sorted(p.stem for p in LOSS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def table_methods() -> list[str]:
    """``ce`` and every registered CAM method that has both presets (``m`` and ``m_kd``), in
    registry order: the rows of the paper's table."""
    presets = set(loss_presets())
    return ["ce", *(m for m in cams.METHODS if {m, f"{m}_kd"} <= presets)]


def baseline_presets() -> list[str]:
    """The presets of the registered objectives other than CE, KD and the CAM term (``at``,
    ``at_kd``, ``catkd``, ``dkd``, ...): ``<objective>`` and ``<objective>_kd``."""
    from distill.objectives import BUILT_IN, OBJECTIVES

    names = set(OBJECTIVES) - set(BUILT_IN)
    return [p for p in loss_presets() if p.removesuffix("_kd") in names]
