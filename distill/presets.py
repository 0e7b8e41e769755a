"""The loss presets (``configs/loss/<name>.yaml``) and the table cells derived from them.

A CAM method registered in :data:`cams.METHODS` becomes trainable by two preset files,
``configs/loss/<method>.yaml`` and ``<method>_kd.yaml``; the harness's table cells, the
benchmark rows and the preset tests are read from here, so no other list needs an edit.
"""

from __future__ import annotations

from pathlib import Path

import cams

__all__ = ["LOSS_DIR", "loss_presets", "table_methods"]

LOSS_DIR = Path(__file__).resolve().parents[1] / "configs" / "loss"


def loss_presets() -> list[str]:
    """Every selectable ``loss=...`` preset (files starting with ``_`` are shared parts)."""
    return sorted(p.stem for p in LOSS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def table_methods() -> list[str]:
    """``ce`` and every registered CAM method that has both presets (``m`` and ``m_kd``), in
    registry order: the rows of the paper's table."""
    presets = set(loss_presets())
    return ["ce", *(m for m in cams.METHODS if {m, f"{m}_kd"} <= presets)]
