"""Hinton knowledge distillation from the teacher's logits (``loss.kd``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from distill.losses import kd_loss
from distill.objectives import register_objective
from distill.objectives.base import Objective, StudentOutputs, Term, check_domain, finite

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@dataclass
class KDConfig:
    """Hinton KD (attention-transfer convention):
    ``(1 - beta) * CE + beta * T^2 * KL(softmax(t / T) || softmax(s / T))``."""

    enabled: bool = False
    temperature: float = 4.0  # T > 0
    beta: float = 0.9  # KD weight in [0, 1]; the CE weight is 1 - beta


@register_objective("kd")
class HintonKD(Objective):
    """``T^2 KL(p_t^T || p_s^T)`` (batch mean), term ``kd``, weight ``beta``; the CE weight
    becomes ``1 - beta`` (:mod:`distill.objectives.ce`)."""

    Config = KDConfig
    teacher = ("logits",)

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        kd = loss.kd
        check_domain("kd.beta", kd.beta, finite(kd.beta) and 0 <= kd.beta <= 1, "in [0, 1]")
        check_domain(
            "kd.temperature", kd.temperature, finite(kd.temperature) and kd.temperature > 0, "> 0"
        )

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        value = kd_loss(student.logits, teacher["logits"], self.cfg.temperature)
        return [Term("kd", value, self.cfg.beta)]
