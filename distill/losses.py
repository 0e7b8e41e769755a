"""Loss terms of explanation-guided distillation.

The student objective is::

    L = classification + alpha * || N(L_s) - N(L_t) ||^2

where ``L_s`` / ``L_t`` are the student's / teacher's class activation maps of the true class,
``N`` a per-sample normalization and the squared norm is summed over positions and averaged over
the batch. The classification part is cross-entropy, or with Hinton KD the attention-transfer
convention ``(1 - beta) * CE + beta * T^2 * KL(p_t^T || p_s^T)`` (KL averaged over the batch).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

import cams
from cams.utils import NORMALIZATIONS


class LossConfigError(ValueError):
    """A loss option is invalid (negative alpha, unknown normalization, mismatched map shapes)."""


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as float; raise if it is negative or not finite."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not math.isfinite(value) or value < 0:
        raise LossConfigError(
            f"loss.alpha must be a finite number >= 0, got {alpha!r}; set e.g. loss.alpha=1.0"
        )
    return value


def explanation_loss(student_maps: Tensor, teacher_maps: Tensor, norm: str = "l2") -> Tensor:
    """``mean_b sum_p (N(L_s)_bp - N(L_t)_bp)^2`` for maps of shape (B, h, w).

    ``norm`` is one of :data:`cams.utils.NORMALIZATIONS` (:func:`cams.normalize`): ``"l2"``
    (flatten and divide by the L2 norm, as attention transfer does), ``"minmax"`` (per-map
    rescale to [0, 1]) or ``"none"``. The teacher maps are detached.
    """
    if norm not in NORMALIZATIONS:
        raise LossConfigError(f"unknown map normalization {norm!r}; choose one of {NORMALIZATIONS}")
    if student_maps.shape != teacher_maps.shape:
        raise LossConfigError(
            f"student maps {tuple(student_maps.shape)} and teacher maps "
            f"{tuple(teacher_maps.shape)} differ in shape: choose target layers with the same "
            "resolution (loss.student_layer / loss.teacher_layer)"
        )
    diff = cams.normalize(student_maps, norm) - cams.normalize(teacher_maps.detach(), norm)
    return diff.flatten(1).pow(2).sum(1).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD term ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def map_agreement(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Per-sample cosine similarity of flattened maps, (B,); 0 where a map is all zero."""
    return F.cosine_similarity(student_maps.flatten(1), teacher_maps.flatten(1), dim=1, eps=1e-12)
