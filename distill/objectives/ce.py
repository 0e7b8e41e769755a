"""Cross-entropy on the true labels: the classification part of every student objective."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from distill.objectives import register_objective
from distill.objectives.base import Objective, StudentOutputs, Term

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@register_objective("ce")
class CrossEntropy(Objective):
    """``CE(z_s, y)``, term ``ce``, always on. Its weight is 1, or ``1 - loss.kd.beta`` with
    Hinton KD (the attention-transfer convention ``(1 - beta) CE + beta KD``)."""

    @classmethod
    def active(cls, loss: LossConfig) -> bool:
        return True

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        kd = self.loss.kd
        weight = 1 - kd.beta if kd.enabled else 1.0
        return [Term("ce", F.cross_entropy(student.logits, batch["label"]), weight)]
