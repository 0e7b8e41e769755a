"""Progress bar showing the loss terms: ``train/<term>`` running means of the current epoch.

:class:`TermsProgressBar` is Lightning's ``TQDMProgressBar`` whose postfix holds, besides the
values logged with ``prog_bar=True`` (``train/err``, ``val/err``), the running epoch mean of
every named loss term (``ClassifierModule.train_means``: ``ce``, ``kd``, ``cam``, ...,
``map_agreement``), read from the metric's local state (no collective call, safe on rank 0 of
DDP). Lightning's ``v_num`` (the logger version, always 0 in a run directory) is dropped.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

__all__ = ["TermsProgressBar", "running_terms"]


def running_terms(module: pl.LightningModule) -> dict[str, float]:
    """``{term: running mean}`` of the module's ``train_means`` updated this epoch."""
    out: dict[str, float] = {}
    for name, metric in getattr(module, "train_means", {}).items():
        weight = getattr(metric, "weight", None)
        if metric.update_count and weight is not None and float(weight) > 0:
            out[name] = float(metric.mean_value / weight)
    return out


class TermsProgressBar(TQDMProgressBar):
    """TQDM bar with the loss terms' running means (4 significant digits) and no ``v_num``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.training:
            metrics.update({k: f"{v:.4g}" for k, v in running_terms(pl_module).items()})
        return metrics
