"""Decoupled knowledge distillation (DKD; Zhao et al., CVPR 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distill.objectives import register_objective
from distill.objectives.base import (
    Objective,
    StudentOutputs,
    Term,
    check_domain,
    exact,
    finite,
    upcast,
)

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@dataclass
class DKDConfig:
    """``loss.dkd``: published defaults for WRN-40-2 -> WRN-16-2 (mdistiller; beta = 8 for the
    other CIFAR-100 pairs)."""

    enabled: bool = False
    alpha: float = 1.0  # TCKD weight
    beta: float = 6.0  # NCKD weight
    temperature: float = 4.0
    warmup: int = 20  # epochs of linear warm-up: w = min(epoch / warmup, 1), epochs from 1


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 KL(teacher || student)`` averaged over the batch.

    With ``p = softmax(z / T)``: TCKD compares the binary distributions ``b = (p_y, 1 - p_y)``
    (target vs the rest); NCKD the distributions over the non-target classes,
    ``p_hat = softmax(z / T)`` with the target class left out (its logit lowered by 1000 before
    the softmax, as the authors do). The teacher's logits are detached.
    """
    with exact(student_logits):
        s, t = upcast(student_logits) / temperature, upcast(teacher_logits.detach()) / temperature
        target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, labels.view(-1, 1), True)
        p_s, p_t = s.softmax(1), t.softmax(1)
        b_s = torch.stack([p_s[target], p_s.masked_fill(target, 0).sum(1)], 1)
        b_t = torch.stack([p_t[target], p_t.masked_fill(target, 0).sum(1)], 1)
        tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
        log_q_s = (s - 1000.0 * target).log_softmax(1)
        log_q_t = (t - 1000.0 * target).log_softmax(1)
        nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()
    return tckd * temperature**2, nckd * temperature**2


def warmup_factor(epoch: int, warmup: int) -> float:
    """``min(epoch / warmup, 1)`` with epochs counted from 1 (``epoch`` here counts from 0)."""
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


@register_objective("dkd")
class DKD(Objective):
    """``w (alpha TCKD + beta NCKD)`` added to CE (:func:`dkd_terms`), terms ``tckd`` and
    ``nckd`` with weights ``w alpha`` and ``w beta``; ``w = min(epoch / warmup, 1)`` ramps the
    term in over the first ``warmup`` epochs (the epoch is the trainer's, so a resumed run
    continues the ramp)."""

    Config = DKDConfig
    teacher = ("logits",)

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        c = loss.dkd
        check_domain("dkd.alpha", c.alpha, finite(c.alpha) and c.alpha >= 0, "a number >= 0")
        check_domain("dkd.beta", c.beta, finite(c.beta) and c.beta >= 0, "a number >= 0")
        check_domain(
            "dkd.temperature", c.temperature, finite(c.temperature) and c.temperature > 0, "> 0"
        )
        check_domain("dkd.warmup", c.warmup, c.warmup >= 0, "an integer >= 0 (0: no warm-up)")

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        c = self.cfg
        tckd, nckd = dkd_terms(student.logits, teacher["logits"], batch["label"], c.temperature)
        w = warmup_factor(epoch, c.warmup)
        return [Term("tckd", tckd, w * c.alpha), Term("nckd", nckd, w * c.beta)]
